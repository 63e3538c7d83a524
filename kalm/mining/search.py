"""Top-k inner-product search of queries against the candidate pool (unit vectors: inner product = cosine).

Backends, chosen by ``index.backend: auto``:

- ``faiss-gpu``: when ``faiss.get_num_gpus() > 0`` (the optional ``faiss-gpu`` extra), the index sharded over
  every GPU (exact, float32);
- ``torch``: GPUs but no faiss-gpu: the pool sharded over every GPU, exact matmul + ``topk`` on each
  (:func:`topk_tiled`: the pool in tiles, each tile's top-k merged into a running top-k, so the score matrix
  never exceeds a fixed budget), the shards' lists merged exactly (:func:`merge_topk`);
- ``faiss``: the CPU default, ``IndexFlatIP`` (exact).

``index.type: ivf`` builds an ``IndexIVFFlat`` (nlist lists, nprobe probed) on FAISS CPU or GPU, for pools
too big for exact search.

>>> s = build_searcher(np.eye(3, dtype=np.float32), IndexSpec())
>>> scores, ids = s.search(np.eye(3, dtype=np.float32)[:1], k=2)
>>> ids.tolist()
[[0, 1]]
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kalm.core.errors import KalmError
from kalm.mining.config import IndexSpec

log = logging.getLogger(__name__)

FAISS_GPU_MAX_K = 2048  # faiss-gpu refuses larger k
IVF_POINTS_PER_LIST = 39  # FAISS warns below ~39 training points per centroid


def _faiss() -> Any:
    import faiss

    return faiss


def choose_backend(requested: str) -> str:
    """``auto`` -> faiss-gpu when FAISS sees GPUs, torch when only torch does, else faiss (CPU)."""
    if requested != "auto":
        return requested
    faiss = _faiss()
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        return "faiss-gpu"
    import torch

    return "torch" if torch.cuda.is_available() else "faiss"


TILE_BYTES = 1 << 30  # the torch backend's score tile (queries x pool rows x 4 bytes) at most


def topk_tiled(q: Any, pool: Any, k: int, tile_bytes: int = TILE_BYTES) -> tuple[Any, Any]:
    """Exact top-k of ``q @ pool.T`` (torch tensors, one device) without the full score matrix: queries in
    blocks and the pool in tiles whose scores fit ``tile_bytes``; each tile's top-k is merged with the
    running one (:func:`merge_topk`). -> (scores (n, k) float32, ids (n, k) int64), best first."""
    import torch

    n, size = q.shape[0], pool.shape[0]
    k = min(int(k), size)
    q_block = max(1, min(n, 4096))
    p_tile = max(k, tile_bytes // (4 * q_block))  # 4,096 queries x 65,536 pool rows at 1 GiB
    scores = torch.empty((n, k), dtype=torch.float32, device=q.device)
    ids = torch.empty((n, k), dtype=torch.int64, device=q.device)
    with torch.inference_mode():
        for s in range(0, n, q_block):
            qs = q[s : s + q_block]
            best: tuple[Any, Any] | None = None
            for t in range(0, size, p_tile):
                sims = (qs @ pool[t : t + p_tile].T).float()
                top = torch.topk(sims, min(k, sims.shape[1]), dim=1)
                part = (top.values, top.indices + t)
                best = part if best is None else merge_topk([best, part], k)
            assert best is not None
            scores[s : s + len(qs)], ids[s : s + len(qs)] = best
    return scores, ids


def merge_topk(parts: list[tuple[Any, Any]], k: int) -> tuple[Any, Any]:
    """Exact merge of per-shard top-k lists (scores, global ids), e.g. from pool tiles, GPUs or nodes: the
    k best of their union, best first (ties: the lower shard first, as one search over the whole pool)."""
    import torch

    vals = torch.cat([p[0] for p in parts], dim=1)
    idx = torch.cat([p[1] for p in parts], dim=1)
    top = torch.topk(vals, min(k, vals.shape[1]), dim=1)
    return top.values, torch.gather(idx, 1, top.indices)


@dataclass
class Searcher:
    """A built index; ``search`` returns (scores (n, k) float32, ids (n, k) int64) best first, -1 padded."""

    backend: str
    index: Any
    size: int
    query_batch: int = 4096
    params: dict[str, Any] = field(default_factory=dict)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), self.size)
        n = len(queries)
        scores = np.empty((n, k), dtype=np.float32)
        ids = np.empty((n, k), dtype=np.int64)
        if n == 0 or k == 0:
            return scores, ids
        if self.backend == "faiss-gpu" and k > FAISS_GPU_MAX_K:
            raise KalmError(f"faiss-gpu retrieves at most {FAISS_GPU_MAX_K} per query; search depth is {k}")
        for s in range(0, n, self.query_batch):  # queries may be a memmap: one batch in memory at a time
            part = np.ascontiguousarray(queries[s : s + self.query_batch], dtype=np.float32)
            if self.backend == "torch":
                scores[s : s + len(part)], ids[s : s + len(part)] = self._torch_search(part, k)
            else:
                d, i = self.index.search(part, k)
                scores[s : s + len(part)], ids[s : s + len(part)] = d, i
        return scores, ids

    def _torch_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``index``: [(first pool id, pool slice on its device)], one slice per GPU; each slice's top-k
        (tiled), merged exactly on the CPU."""
        import torch

        parts = []
        for first, pool in self.index:
            values, indices = topk_tiled(torch.from_numpy(q).to(pool.device), pool, k)
            parts.append((values.cpu(), indices.cpu() + first))
        values, indices = parts[0] if len(parts) == 1 else merge_topk(parts, k)
        return values.numpy(), indices.numpy().astype(np.int64)

    def lineage(self) -> dict[str, Any]:
        return {"backend": self.backend, "size": self.size, **self.params}


def build_searcher(pool: np.ndarray, spec: IndexSpec, query_batch: int = 4096) -> Searcher:
    """Index the pool vectors (N, D) float32 for inner-product search; ``params`` records what was built."""
    if len(pool) == 0:
        raise KalmError("empty candidate pool: nothing to index")
    pool = np.ascontiguousarray(pool, dtype=np.float32)
    n, dim = pool.shape
    backend = choose_backend(spec.backend)
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            raise KalmError("index.backend 'torch' searches on CUDA, and no CUDA device is available")
        if spec.type != "flat":
            raise KalmError("index.backend 'torch' is exact search only: use index.type 'flat'")
        gpus = torch.cuda.device_count()
        bounds = np.linspace(0, n, gpus + 1).astype(int)  # the pool sharded over every GPU of the node
        slices = [
            (int(a), torch.from_numpy(pool[a:b]).to(f"cuda:{i}"))
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
            if b > a  # fewer vectors than GPUs: some get none
        ]
        return Searcher("torch", slices, n, query_batch, {"type": "flat", "shards": gpus})
    faiss = _faiss()
    params: dict[str, Any] = {"type": spec.type}
    if spec.type == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = max(1, min(spec.nlist, n // IVF_POINTS_PER_LIST))
        if nlist != spec.nlist:
            log.warning("ivf: nlist %d clamped to %d for a pool of %d vectors", spec.nlist, nlist, n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(pool)
        index.nprobe = min(spec.nprobe, nlist)
        params.update(nlist=nlist, nprobe=int(index.nprobe), nlist_requested=spec.nlist)
    if backend == "faiss-gpu":
        if getattr(faiss, "get_num_gpus", lambda: 0)() == 0:
            raise KalmError("index.backend 'faiss-gpu' requested, but faiss sees no GPU (install faiss-gpu)")
        co = faiss.GpuMultipleClonerOptions()
        co.shard = True  # each GPU holds a slice of the pool; results are merged exactly
        co.useFloat16 = False
        index = faiss.index_cpu_to_all_gpus(index, co=co)
        params["gpus"] = int(faiss.get_num_gpus())
        if spec.type == "ivf":
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", params["nprobe"])
    index.add(pool)
    return Searcher(backend, index, n, query_batch, params)


@dataclass
class BlockSearch:
    """What :func:`search_blocks` found: per query the ``k`` best (scores, global pool ids), best first."""

    scores: np.ndarray
    ids: np.ndarray
    lineage: dict[str, Any]


def block_rows(dim: int, block_mb: float, size: int) -> int:
    """Pool rows per block: ``block_mb`` MiB of float32 vectors (at least one row, at most the pool).

    >>> block_rows(384, 1024, 10_000_000)
    699050
    """
    return max(1, min(size, int(block_mb * (1 << 20)) // (4 * max(1, dim))))


def search_blocks(
    pool: np.ndarray, queries: np.ndarray, k: int, spec: IndexSpec, query_batch: int, rows: int
) -> BlockSearch:
    """Top-k of every query over a pool searched ``rows`` vectors at a time (``pool`` and ``queries`` may be
    memmaps): each block is indexed on its own (on every GPU of the node when there are GPUs), searched for
    all queries, and merged exactly into the running top-k (:func:`merge_sorted`), so host memory holds one
    block and its index, never the pool. ``ivf`` builds one index (trained on at most one block's worth of
    evenly spaced vectors), filled block by block: an IVF-Flat index holds the pool's vectors itself."""
    size, n = len(pool), len(queries)
    k = min(int(k), size)
    blocks = [(a, min(size, a + rows)) for a in range(0, size, rows)]
    if spec.type == "ivf":
        step = max(1, math.ceil(size / rows))
        searcher = build_searcher(np.ascontiguousarray(pool[::step], dtype=np.float32), spec, query_batch)
        if size > rows:  # trained on a sample: filled with the whole pool, block by block
            searcher = _refill(searcher, pool, blocks)
        scores, ids = searcher.search(queries, k)
        return BlockSearch(scores, ids, {**searcher.lineage(), "blocks": len(blocks), "block_rows": rows})
    best_s = np.full((n, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((n, 0), dtype=np.int64)
    lineage: dict[str, Any] = {}
    for a, b in blocks:
        searcher = build_searcher(np.ascontiguousarray(pool[a:b], dtype=np.float32), spec, query_batch)
        s, i = searcher.search(queries, min(k, b - a))
        best_s, best_i = merge_sorted(best_s, best_i, s, i + a, k)
        lineage = searcher.lineage()
        del searcher
    lineage.update(size=size, blocks=len(blocks), block_rows=rows)
    return BlockSearch(best_s, best_i, lineage)


def _refill(searcher: Searcher, pool: np.ndarray, blocks: list[tuple[int, int]]) -> Searcher:
    """An IVF searcher trained on a sample, emptied and filled with every block of the pool in order."""
    searcher.index.reset()
    for a, b in blocks:
        searcher.index.add(np.ascontiguousarray(pool[a:b], dtype=np.float32))
    searcher.size = len(pool)
    return searcher


def merge_sorted(
    best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int, batch: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two best-first top-k lists per row (a running one and a later block's), best first;
    equal scores keep the running list's (lower) ids first, as one search over the whole pool would."""
    n, k = len(s), min(k, best_s.shape[1] + s.shape[1])
    out_s = np.empty((n, k), dtype=np.float32)
    out_i = np.empty((n, k), dtype=np.int64)
    for r in range(0, n, batch):  # the sort's temporaries stay small
        vals = np.concatenate([best_s[r : r + batch], s[r : r + batch]], axis=1)
        idx = np.concatenate([best_i[r : r + batch], i[r : r + batch]], axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")[:, :k]
        out_s[r : r + batch] = np.take_along_axis(vals, order, axis=1)
        out_i[r : r + batch] = np.take_along_axis(idx, order, axis=1)
    return out_s, out_i


def pair_scores(
    pool: np.ndarray, queries: np.ndarray, q_idx: np.ndarray, p_idx: np.ndarray, rows: int
) -> np.ndarray:
    """Inner products ``queries[q_idx[j]] . pool[p_idx[j]]`` for every pair j, reading the pool one block of
    ``rows`` vectors at a time (both may be memmaps)."""
    out = np.empty(len(q_idx), dtype=np.float32)
    order = np.argsort(p_idx, kind="stable")
    p_sorted = p_idx[order]
    for a in range(0, len(pool), rows):
        lo, hi = np.searchsorted(p_sorted, [a, a + rows])
        if lo == hi:
            continue
        sel = order[lo:hi]
        block = np.asarray(pool[a : a + rows], dtype=np.float32)
        uq, where = np.unique(q_idx[sel], return_inverse=True)  # sorted: the memmap is read in order
        qv = np.asarray(queries[uq], dtype=np.float32)
        out[sel] = np.einsum("ij,ij->i", qv[where.reshape(-1)], block[p_idx[sel] - a])
    return out


def search_sharded(
    executor: Any, path: str, pool_rows: int, queries: tuple[int, int], k: int, spec: IndexSpec, rows: int
) -> BlockSearch:
    """:func:`search_blocks` with the pool split into one contiguous range of blocks per worker of the data
    stage's engine (local processes, or Ray across nodes, a GPU each with ``executor.gpus``); every worker
    reads its range and the queries from the vector file at ``path`` (``queries``: first row and count after
    the pool's ``pool_rows``; on several nodes the file must be on a folder every node mounts) and returns
    its top-k; the ranges' lists are merged exactly, in range order."""
    blocks = math.ceil(pool_rows / rows)
    units = max(1, min(executor.workers, blocks))
    cuts = [min(pool_rows, round(u * blocks / units) * rows) for u in range(units + 1)]
    threads = max(1, (os.cpu_count() or 1) // units) if executor.kind == "local" else 0
    common = {"path": path, "pool_rows": pool_rows, "queries": list(queries), "k": k, "rows": rows}
    calls = [
        {"unit": f"search-{u}", "a": a, "b": b, "index": spec.model_dump(), "threads": threads, **common}
        for u, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))
    ]
    parts = executor.map(search_unit, calls)
    best_s, best_i = parts[0]["scores"], parts[0]["ids"]
    for p in parts[1:]:
        best_s, best_i = merge_sorted(best_s, best_i, p["scores"], p["ids"], k)
    lineage = {**parts[0]["lineage"], "size": pool_rows, "blocks": blocks, "block_rows": rows}
    return BlockSearch(best_s, best_i, {**lineage, "units": units, "executor": executor.kind})


def search_unit(
    unit: str,
    path: str,
    pool_rows: int,
    queries: list[int],
    a: int,
    b: int,
    k: int,
    index: dict[str, Any],
    rows: int,
    threads: int,
) -> dict[str, Any]:
    """One worker's share of :func:`search_sharded`: pool rows [a, b) of the vector file against the queries;
    ids are global pool ids."""
    if threads:
        _faiss().omp_set_num_threads(threads)
    vecs = np.load(path, mmap_mode="r")
    first, n = queries
    q = vecs[pool_rows + first : pool_rows + first + n]
    found = search_blocks(vecs[a:b], q, k, IndexSpec(**index), 4096, rows)
    return {"scores": found.scores, "ids": found.ids + a, "lineage": found.lineage}
