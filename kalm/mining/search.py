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
        q = np.ascontiguousarray(queries, dtype=np.float32)
        for s in range(0, n, self.query_batch):
            part = q[s : s + self.query_batch]
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
