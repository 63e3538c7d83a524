"""The partitioned data stage: every recipe of a stage ingested, deduplicated (exact and near, across all
recipes) and decontaminated in work units that run on any executor (:mod:`kalm.data.executors`).

Identity is data: each recipe's source is split into partitions from its sorted file listing
(:mod:`kalm.data.partitions`), and row ``i`` of partition ``p`` of the recipe ranked ``k`` (by name) in
the stage has the key ``k << 44 | p << 24 | i``. The smallest key is the first row in recipe-name, file and
line order: the row a duplicate cluster keeps (what the single-process engine keeps too).

Units, each writing its files, then a marker listing them (a unit is done when its marker's files are
intact: a rerun after a crash, of a worker or of the driver, redoes only unfinished units)::

    sign     one per partition: read, map, clean, MinHash; write rows, signatures, exact-hash
             shard files and LSH band-bucket files           work/<stage>/sign/<recipe>/<fp>/
    exact    one per hash shard: rows with equal ids -> the smallest key keeps the row
    bands    one per (band, bucket shard): buckets are whole in one unit; star edges from each bucket's
             smallest key, exact copies counted once (never k^2 pairs, never a blown-up bucket)
    verify1  one per partition: attach the signatures of the edges' smaller end
    verify2  one per partition: attach the other end's, keep pairs with estimated Jaccard >= threshold
    cluster  one: connected components of the verified edges; the smallest key survives
    apply    one per partition: drop its rows (reason and the recipe that lost them), split off held-out
             rows, decontaminate against the eval index; write the final shard
                                                             work/<stage>/reduce/<fp>/
    publish  in the driver: each recipe's shards become mixtures/<stage>/<recipe>/ (one shard per
             partition, named by it: the same rows in the same shards whatever the executor)

Memory per unit is bounded by one partition (sign, verify, apply) or one hash/bucket shard of the
stage's keys (exact, bands: 16-24 bytes per row over ``exact_shards`` or ``bands * bucket_shards``); the
cluster unit holds only the verified near-duplicate edges. Reasons: ``exact_dup`` / ``near_dup`` (the
survivor is in the same recipe), ``cross_recipe_dup`` / ``cross_recipe_near_dup`` (in another: counted in
the recipe that lost the row), ``contaminated``; precedence exact > near > contamination.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from kalm.core.errors import KalmError
from kalm.core.hashing import hash_obj
from kalm.core.layout import MANIFEST, holdout_dir, mixture_dir, mixture_root
from kalm.core.results import StageResult
from kalm.core.schema import ROW_SCHEMA, SCHEMA_VERSION
from kalm.core.storage import DataRoot, read_manifest
from kalm.data import minhash
from kalm.data.config import IngestConfig
from kalm.data.executors import Executor
from kalm.data.ingest import READER_SKIPS, _is_holdout, _label_rows, _pair_rows, ingest_fingerprint, near_text
from kalm.data.mixtures import EvalIndex, load_eval_texts
from kalm.data.partitions import Partition, plan_partitions, read_partition
from kalm.data.fastpath import fast_rows
from kalm.data.readers import resolve_files, source_fingerprint
from kalm.data.recipes import LoadedRecipe, load_recipe_file

log = logging.getLogger(__name__)
ENGINE_VERSION = 1
ROW_BITS, PART_BITS = 24, 20
MAX_ROWS_PER_PARTITION = 1 << ROW_BITS
U64 = pa.uint64()


def work_root(stage: str) -> str:
    return f"work/{stage}"


def gkey(rank: int, part: int, row: np.ndarray) -> np.ndarray:
    return (
        (np.uint64(rank) << np.uint64(ROW_BITS + PART_BITS))
        | (np.uint64(part) << np.uint64(ROW_BITS))
        | row.astype(np.uint64)
    )


def gpart(keys: np.ndarray) -> np.ndarray:
    """The global partition of each key: (rank, partition) packed, as in the key's top bits."""
    return keys >> np.uint64(ROW_BITS)


def near_params(cfg: IngestConfig) -> minhash.MinHashParams:
    n = cfg.near_dedup
    return minhash.MinHashParams(num_perm=n.num_perm, ngram=n.ngram, threshold=n.threshold, seed=n.seed)


# -- markers -----------------------------------------------------------------------------------------
def _marker(d: str, unit: str) -> str:
    return f"{d}/_markers/{unit}.json"


def done(root: DataRoot, d: str, unit: str) -> dict[str, Any] | None:
    """A unit's marker when the unit finished and its files are still intact, else None."""
    m = _marker(d, unit)
    if not root.exists(m):
        return None
    info = root.read_json(m)
    if root.files_intact(d, info.get("files", [])):
        return None
    return info


def _finish(root: DataRoot, d: str, unit: str, info: dict[str, Any]) -> dict[str, Any]:
    """Write the unit's marker (last: it says every file above is whole), with the peak RSS of the process
    that ran it (a worker, or the driver with one local worker)."""
    info["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    root.write_json(_marker(d, unit), info)
    return info


def _put(root: DataRoot, d: str, name: str, table: pa.Table, files: list[dict[str, Any]]) -> None:
    files.append({"name": name, "rows": table.num_rows, **root.write_parquet(f"{d}/{name}", table)})


def _put_split(
    root: DataRoot, d: str, prefix: str, table: pa.Table, by: np.ndarray, files: list[dict[str, Any]]
) -> list[int]:
    """Write ``table`` split by the integer ``by`` (sorted first) as ``<prefix>/<value>.parquet``."""
    if len(by) == 0:
        return []
    order = np.argsort(by, kind="stable")
    by, table = by[order], table.take(pa.array(order))
    values, starts = np.unique(by, return_index=True)
    ends = [*starts[1:].tolist(), len(by)]
    for v, a, b in zip(values.tolist(), starts.tolist(), ends, strict=True):
        _put(root, d, f"{prefix}/{v}.parquet", table.slice(a, b - a), files)
    return [int(v) for v in values]


def _ref(d: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A file another unit reads: its path and the size and checksum its writer recorded."""
    return {**entry, "name": f"{d}/{entry['name']}"}


def _read(root: DataRoot, ref: dict[str, Any]) -> pa.Table:
    """Read a unit's file, verified against its marker's size and sha256 (a one-line error if changed)."""
    return root.read_parquet_checked(ref["name"], ref)


# -- units -------------------------------------------------------------------------------------------
def sign_unit(
    unit: str, root_uri: str, recipe_path: str, part: dict[str, Any], cfg: dict[str, Any], out: str
) -> dict[str, Any]:
    """Read one partition; write its rows, signatures, exact-hash shards, band buckets and held-out rows."""
    root, c = DataRoot.from_uri(root_uri), IngestConfig.model_validate(cfg)
    lr, p = load_recipe_file(Path(recipe_path)), Partition(**part)
    if (info := done(root, out, unit)) is not None:
        return info
    stats: Counter[str] = Counter()
    fs = resolve_files(lr.recipe.source, lr.dir)[0] if p.path.startswith("s3://") else pafs.LocalFileSystem()
    fast = fast_rows(lr, p, stats, fs)
    if fast is not None:
        table, texts = fast.table, fast.near_texts
    else:
        records = read_partition(lr, p, stats)
        label = lr.recipe.label_based
        rows = list(_label_rows(lr, records, stats, c) if label else _pair_rows(lr, records, stats))
        table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA) if rows else ROW_SCHEMA.empty_table()
        texts = [near_text(row, label) for row in rows]
        del rows
    if table.num_rows >= MAX_ROWS_PER_PARTITION:
        raise KalmError(
            f"{lr.name}: {table.num_rows} rows in one partition (at most {MAX_ROWS_PER_PARTITION - 1}): "
            "lower partition_bytes"
        )
    ids = table.column("id").to_pylist()
    ho = np.array([_is_holdout(i, lr.recipe.holdout) for i in ids], dtype=bool)
    files: list[dict[str, Any]] = []
    if ho.any():
        _put(root, out, f"{p.label}.holdout.parquet", table.filter(pa.array(ho)), files)
        table = table.filter(pa.array(~ho))
        ids = [i for i, h in zip(ids, ho, strict=True) if not h]
        texts = [t for t, h in zip(texts, ho, strict=True) if not h]
    n = table.num_rows
    local = (np.uint64(p.index) << np.uint64(ROW_BITS)) | np.arange(n, dtype=np.uint64)
    idh = np.array([int(i, 16) for i in ids], dtype=np.uint64)
    _put(root, out, f"{p.label}.rows.parquet", table, files)
    _put_split(
        root,
        out,
        f"{p.label}.exact",
        pa.table({"idh": pa.array(idh, U64), "key": pa.array(local, U64)}),
        idh % np.uint64(c.exact_shards),
        files,
    )
    if c.near_dedup.enabled and n:
        mp = near_params(c)
        step = 8192  # in chunks: the shingle arrays of a whole partition would not stay in cache
        sig = np.concatenate([minhash.signatures(texts[i : i + step], mp) for i in range(0, n, step)])
        bands, band_rows = mp.lsh_shape()
        bh = minhash.band_hashes(sig, bands, band_rows)
        _put(
            root,
            out,
            f"{p.label}.sig.parquet",
            pa.table(
                {
                    "sig": pa.FixedSizeBinaryArray.from_buffers(
                        pa.binary(sig.shape[1] * 4), n, [None, pa.py_buffer(sig.tobytes())]
                    )
                }
            ),
            files,
        )
        unit_of = np.arange(bands, dtype=np.uint64)[None, :] * np.uint64(c.bucket_shards) + bh % np.uint64(
            c.bucket_shards
        )
        bt = pa.table(
            {
                "band_key": pa.array(bh.ravel(), U64),
                "idh": pa.array(np.repeat(idh, bands), U64),
                "key": pa.array(np.repeat(local, bands), U64),
            }
        )
        _put_split(root, out, f"{p.label}.bands", bt, unit_of.ravel(), files)
    reader_skips = sum(stats[k] for k in READER_SKIPS)
    return _finish(
        root,
        out,
        unit,
        {
            "partition": p.to_json(),
            "rows": n,
            "holdout_rows": int(ho.sum()),
            "rows_in": stats["records"] + reader_skips,
            "stats": {k: v for k, v in sorted(stats.items()) if v and k != "records"},
            "files": files,
        },
    )


def _gather(root: DataRoot, sources: list[tuple[dict[str, Any], int]]) -> pa.Table | None:
    """Concatenate (file, recipe rank) pairs, turning their local ``key`` into the global key."""
    tables = []
    for ref, rank in sources:
        t = _read(root, ref)
        k = t.column("key").to_numpy() | (np.uint64(rank) << np.uint64(ROW_BITS + PART_BITS))
        tables.append(t.set_column(t.schema.get_field_index("key"), "key", pa.array(k, U64)))
    return pa.concat_tables(tables) if tables else None


def exact_unit(
    unit: str, root_uri: str, out: str, sources: list[tuple[dict[str, Any], int]]
) -> dict[str, Any]:
    """One hash shard: rows sharing an id keep the smallest key; the others are exact duplicates."""
    root = DataRoot.from_uri(root_uri)
    if (info := done(root, out, unit)) is not None:
        return info
    files: list[dict[str, Any]] = []
    t = _gather(root, sources)
    dups = 0
    if t is not None and t.num_rows:
        idh, key = t.column("idh").to_numpy(), t.column("key").to_numpy()
        order = np.lexsort((key, idh))
        idh, key = idh[order], key[order]
        first = np.concatenate([[True], idh[1:] != idh[:-1]])
        canon = key[np.maximum.accumulate(np.where(first, np.arange(len(key)), 0))]
        d = ~first
        dups = int(d.sum())
        if dups:
            drop = pa.table({"key": pa.array(key[d], U64), "canon": pa.array(canon[d], U64)})
            _put_split(root, out, f"exact/{unit}", drop, gpart(key[d]), files)
    return _finish(root, out, unit, {"dups": dups, "files": files})


def bands_unit(
    unit: str, root_uri: str, out: str, sources: list[tuple[dict[str, Any], int]]
) -> dict[str, Any]:
    """One (band, bucket shard): candidate edges from each bucket's smallest key to its other members."""
    root = DataRoot.from_uri(root_uri)
    if (info := done(root, out, unit)) is not None:
        return info
    files: list[dict[str, Any]] = []
    t = _gather(root, sources)
    edges, biggest = 0, 0
    if t is not None and t.num_rows:
        bk, idh, key = (t.column(c).to_numpy() for c in ("band_key", "idh", "key"))
        order = np.lexsort((key, idh, bk))
        bk, idh, key = bk[order], idh[order], key[order]
        # exact copies share every band: one member per id (its smallest key, the exact survivor)
        distinct = np.concatenate([[True], (bk[1:] != bk[:-1]) | (idh[1:] != idh[:-1])])
        bk, key = bk[distinct], key[distinct]
        order = np.lexsort((key, bk))
        bk, key = bk[order], key[order]
        start = np.concatenate([[True], bk[1:] != bk[:-1]])
        head = key[np.maximum.accumulate(np.where(start, np.arange(len(key)), 0))]
        m = ~start
        edges = int(m.sum())
        if edges:
            sizes = np.diff(np.concatenate([np.nonzero(start)[0], [len(start)]]))
            biggest = int(sizes.max())
            e = pa.table({"a": pa.array(head[m], U64), "b": pa.array(key[m], U64)})
            _put_split(root, out, f"bands/{unit}", e, gpart(head[m]), files)
    return _finish(root, out, unit, {"edges": edges, "largest_bucket": biggest, "files": files})


def _sigs(col: pa.Array | pa.ChunkedArray, num_perm: int) -> np.ndarray:
    """A fixed-size-binary column of signatures as a uint32 array (n, num_perm), without a copy."""
    flat = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    buf = flat.buffers()[1]
    n = len(flat)
    return np.frombuffer(buf, dtype=np.uint32, count=n * num_perm, offset=flat.offset * num_perm * 4).reshape(
        n, num_perm
    )


def _sig_of(root: DataRoot, ref: dict[str, Any], keys: np.ndarray, num_perm: int) -> np.ndarray:
    """Signatures of ``keys`` (all in the partition whose signature file is ``ref``)."""
    sig = _sigs(_read(root, ref).column("sig"), num_perm)
    return sig[(keys & np.uint64(MAX_ROWS_PER_PARTITION - 1)).astype(np.int64)]


def verify1_unit(
    unit: str, root_uri: str, out: str, inputs: list[dict[str, Any]], sig: dict[str, Any], num_perm: int
) -> dict[str, Any]:
    """Edges whose smaller end is in this partition: unique pairs, that end's signature attached, sent on
    to the partition of the other end."""
    root = DataRoot.from_uri(root_uri)
    if (info := done(root, out, unit)) is not None:
        return info
    files: list[dict[str, Any]] = []
    t = pa.concat_tables([_read(root, i) for i in inputs])
    a, b = t.column("a").to_numpy(), t.column("b").to_numpy()
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    a, b = pairs[:, 0], pairs[:, 1]
    sig_a = _sig_of(root, sig, a, num_perm)
    e = pa.table(
        {
            "a": pa.array(a, U64),
            "b": pa.array(b, U64),
            "sig_a": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(num_perm * 4), len(a), [None, pa.py_buffer(np.ascontiguousarray(sig_a).tobytes())]
            ),
        }
    )
    _put_split(root, out, f"v1/{unit}", e, gpart(b), files)
    return _finish(root, out, unit, {"pairs": len(a), "files": files})


def verify2_unit(
    unit: str,
    root_uri: str,
    out: str,
    inputs: list[dict[str, Any]],
    sig: dict[str, Any],
    num_perm: int,
    threshold: float,
) -> dict[str, Any]:
    """Edges whose larger end is in this partition: kept when the signatures agree on >= threshold."""
    root = DataRoot.from_uri(root_uri)
    if (info := done(root, out, unit)) is not None:
        return info
    files: list[dict[str, Any]] = []
    t = pa.concat_tables([_read(root, i) for i in inputs])
    a, b = t.column("a").to_numpy(), t.column("b").to_numpy()
    sig_a = _sigs(t.column("sig_a"), num_perm)
    score = minhash.estimated_jaccard(sig_a, _sig_of(root, sig, b, num_perm))
    ok = score >= threshold
    _put(
        root,
        out,
        f"v2/{unit}.parquet",
        pa.table(
            {"a": pa.array(a[ok], U64), "b": pa.array(b[ok], U64), "score": pa.array(score[ok], pa.float32())}
        ),
        files,
    )
    return _finish(root, out, unit, {"candidates": len(a), "verified": int(ok.sum()), "files": files})


def cluster_unit(unit: str, root_uri: str, out: str, inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Connected components of the verified edges; every member but the smallest key is a near duplicate."""
    root = DataRoot.from_uri(root_uri)
    if (info := done(root, out, unit)) is not None:
        return info
    files: list[dict[str, Any]] = []
    tables = [_read(root, i) for i in inputs]
    t = pa.concat_tables(tables) if tables else None
    dups, biggest = 0, 0
    if t is not None and t.num_rows:
        a, b = t.column("a").to_numpy(), t.column("b").to_numpy()
        nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)  # sorted: index order = key order
        ia, ib = inv[: len(a)], inv[len(a) :]
        g = coo_matrix((np.ones(len(a), dtype=np.int8), (ia, ib)), shape=(len(nodes), len(nodes)))
        _, label = connected_components(g, directed=False)
        first = np.full(label.max() + 1, len(nodes), dtype=np.int64)
        np.minimum.at(first, label, np.arange(len(nodes)))
        canon = nodes[first[label]]
        d = canon != nodes
        dups = int(d.sum())
        biggest = int(np.bincount(label).max())
        drop = pa.table({"key": pa.array(nodes[d], U64), "canon": pa.array(canon[d], U64)})
        _put_split(root, out, "near", drop, gpart(nodes[d]), files)
    return _finish(root, out, unit, {"dups": dups, "largest_cluster": biggest, "files": files})


def apply_unit(
    unit: str,
    root_uri: str,
    out: str,
    rows: dict[str, Any],
    rank: int,
    exact: list[dict[str, Any]],
    near: list[dict[str, Any]],
    index: EvalIndex | None,
    final: str,
) -> dict[str, Any]:
    """Drop this partition's duplicates and contaminated rows; write its final shard."""
    root = DataRoot.from_uri(root_uri)
    if (info := done(root, out, unit)) is not None:
        return info
    table = _read(root, rows)
    n = table.num_rows
    reason = np.zeros(n, dtype=np.int8)  # 0 keep, 1 exact, 2 near, 3 contaminated
    same = np.zeros(n, dtype=bool)
    shift = np.uint64(ROW_BITS + PART_BITS)
    for code, paths in ((1, exact), (2, near)):
        for path in paths:
            d = _read(root, path)
            key, canon = d.column("key").to_numpy(), d.column("canon").to_numpy()
            row = (key & np.uint64(MAX_ROWS_PER_PARTITION - 1)).astype(np.int64)
            fresh = reason[row] == 0
            reason[row[fresh]] = code
            same[row[fresh]] = (canon[fresh] >> shift) == np.uint64(rank)
    if index is not None and n:
        live = np.nonzero(reason == 0)[0]
        q = pc.take(table.column("query"), pa.array(live)).to_pylist()
        f = [(x or [""])[0] for x in pc.take(table.column("pos"), pa.array(live)).to_pylist()]
        bad = index.contaminated(q) | index.contaminated(f)
        reason[live[bad]] = 3
    drops = {
        "exact_dup": int(((reason == 1) & same).sum()),
        "cross_recipe_dup": int(((reason == 1) & ~same).sum()),
        "near_dup": int(((reason == 2) & same).sum()),
        "cross_recipe_near_dup": int(((reason == 2) & ~same).sum()),
        "contaminated": int((reason == 3).sum()),
    }
    files: list[dict[str, Any]] = []
    _put(root, out, final, table.filter(pa.array(reason == 0)), files)
    return _finish(root, out, unit, {"drops": {k: v for k, v in drops.items() if v}, "files": files})


# -- the driver ---------------------------------------------------------------------------------------
@dataclass
class _Recipe:
    lr: LoadedRecipe
    rank: int
    dir: str
    fp: str
    parts: list[Partition]
    markers: dict[int, dict[str, Any]]


def _run(executor: Executor, fn: Any, calls: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    out = executor.map(fn, calls) if calls else []
    if calls:
        log.info(
            "%s: %d unit(s) in %.1f s on %s x%d",
            what,
            len(calls),
            time.perf_counter() - t0,
            executor.kind,
            executor.workers,
        )
    return out


def run_stage_distributed(
    stage: str,
    recipes: Sequence[LoadedRecipe],
    root: DataRoot,
    cfg: IngestConfig,
    executor: Executor,
    *,
    force: bool = False,
    forced: Collection[str] = (),
    eval_texts: Sequence[str] = (),
) -> tuple[list[StageResult], list[StageResult], dict[str, BaseException]]:
    """Build every recipe's mixture of ``stage`` (``force``: all of it again; ``forced``: those recipes'
    partitions again). Returns (ingest results, mixture results, failures by recipe): a recipe whose source
    cannot be read fails alone; the others are built without it."""
    t0 = time.perf_counter()
    failed: dict[str, BaseException] = {}
    wr = work_root(stage)
    cfg_json = cfg.model_dump(mode="json")
    todo: list[_Recipe] = []
    for rank, lr in enumerate(sorted(recipes, key=lambda x: x.name)):
        try:
            parts = plan_partitions(lr, cfg.partition_bytes)
            src = hash_obj(source_fingerprint(lr.recipe.source, lr.dir))
        except KalmError as err:
            failed[lr.name] = err
            continue
        fp = hash_obj(
            {
                "ingest": ingest_fingerprint(lr, cfg, False),
                "source": src,
                "engine": ENGINE_VERSION,
                "parts": [p.to_json() for p in parts],
                "exact_shards": cfg.exact_shards,
                "bucket_shards": cfg.bucket_shards,
            }
        )
        d = f"{wr}/sign/{lr.name}/{fp}"
        if force or lr.name in forced:
            root.delete_dir(d)
        else:
            _sweep_tmp(root, d)
        todo.append(_Recipe(lr, rank, d, fp, parts, {}))
    # 1. sign
    calls: list[dict[str, Any]] = []
    owners: list[_Recipe] = []
    for r in todo:
        for p in r.parts:
            if (m := done(root, r.dir, p.label)) is not None:
                r.markers[p.index] = m
            else:
                calls.append(
                    {
                        "unit": p.label,
                        "root_uri": root.uri,
                        "recipe_path": str(r.lr.path),
                        "part": p.to_json(),
                        "cfg": cfg_json,
                        "out": r.dir,
                    }
                )
                owners.append(r)
    cached_sign = {r.lr.name: len(r.markers) == len(r.parts) for r in todo}
    for r, res in zip(owners, _run_settled(executor, sign_unit, calls, "sign"), strict=True):
        if isinstance(res, BaseException):
            failed.setdefault(r.lr.name, res)
        else:
            r.markers[Partition(**res["partition"]).index] = res
    todo = [r for r in todo if r.lr.name not in failed]
    for r in todo:  # older fingerprints of this recipe: a changed source or config, never read again
        for old in root.list_all_dirs(f"{wr}/sign/{r.lr.name}"):
            if old != r.fp:
                root.delete_dir(f"{wr}/sign/{r.lr.name}/{old}")
    ingested = [_ingest_result(root, r, cached_sign[r.lr.name]) for r in todo]
    # 2. the eval index: configured eval texts, eval tasks, and every recipe's held-out rows
    index = None
    if cfg.decontamination.enabled:
        texts = load_eval_texts(
            root,
            cfg.model_copy(
                update={"decontamination": cfg.decontamination.model_copy(update={"include_holdouts": False})}
            ),
            [],
        ) + list(eval_texts)
        if cfg.decontamination.include_holdouts:
            texts += _holdout_texts(root, todo)
        mp = near_params(cfg)
        index = EvalIndex.build(
            texts,
            cfg.decontamination,
            minhash.MinHashParams(mp.num_perm, mp.ngram, cfg.decontamination.threshold, mp.seed),
        )
    red_fp = hash_obj(
        {
            "sign": [(r.lr.name, r.fp) for r in todo],
            "near": cfg.near_dedup.model_dump(),
            "eval": index.fingerprint if index else None,
            "engine": ENGINE_VERSION,
        }
    )
    red = f"{wr}/reduce/{red_fp}"
    if not force and (same := _unchanged(root, stage, todo, red_fp)) is not None:
        log.info("stage %s: every recipe's partitions and the eval index unchanged, mixtures kept", stage)
        return ingested, same, failed
    for d in root.list_all_dirs(f"{wr}/reduce"):  # a killed run's reduce for other inputs: never resumed
        if d != red_fp:
            root.delete_dir(f"{wr}/reduce/{d}")
    _sweep_tmp(root, red)
    if force:
        root.delete_dir(red)

    # 3. exact, 4. bands, 5. verify, 6. cluster
    def sources(kind: str, unit: int) -> list[tuple[dict[str, Any], int]]:
        """The sign files of one exact or band unit, in (recipe, partition) order."""
        refs = [(_sign_file(r, i, f"{kind}/{unit}.parquet"), r.rank) for r in todo for i in sorted(r.markers)]
        return [(ref, rank) for ref, rank in refs if ref is not None]

    def calls_for(prefix: str, n: int, **extra: Any) -> list[dict[str, Any]]:
        return [{"unit": f"{prefix}{u:04d}", "root_uri": root.uri, "out": red, **extra} for u in range(n)]

    xc = calls_for("x", cfg.exact_shards)
    for c, u in zip(xc, range(cfg.exact_shards), strict=True):
        c["sources"] = sources("exact", u)
    ex = _units(executor, root, red, exact_unit, xc, "exact")
    every = [m for r in todo for m in r.markers.values()] + ex  # every unit's marker, for the report
    stats: dict[str, Any] = {"exact_dups": sum(m["dups"] for m in ex)}
    near_by: dict[int, list[dict[str, Any]]] = {}
    if cfg.near_dedup.enabled:
        mp = near_params(cfg)
        n_units = mp.lsh_shape()[0] * cfg.bucket_shards
        bc = calls_for("b", n_units)
        for c, u in zip(bc, range(n_units), strict=True):
            c["sources"] = sources("bands", u)
        bu = _units(executor, root, red, bands_unit, bc, "bands")
        every += bu
        stats["candidate_edges"] = sum(m["edges"] for m in bu)
        stats["largest_bucket"] = max((m["largest_bucket"] for m in bu), default=0)
        sig_of = {_gp(r.rank, i): _sign_file(r, i, "sig.parquet") for r in todo for i in r.markers}
        common = {"root_uri": root.uri, "out": red, "num_perm": mp.num_perm}
        v1 = _units(
            executor,
            root,
            red,
            verify1_unit,
            [
                {"unit": f"v1-{g}", "inputs": ins, "sig": sig_of[g], **common}
                for g, ins in _route(red, bu, "bands/").items()
            ],
            "verify1",
        )
        v2 = _units(
            executor,
            root,
            red,
            verify2_unit,
            [
                {"unit": f"v2-{g}", "inputs": ins, "sig": sig_of[g], "threshold": mp.threshold, **common}
                for g, ins in _route(red, v1, "v1/").items()
            ],
            "verify2",
        )
        stats["verified_edges"] = sum(m["verified"] for m in v2)
        every += v1 + v2
        inputs = [_ref(red, f) for m in v2 for f in m["files"]]
        cl = _units(
            executor,
            root,
            red,
            cluster_unit,
            [{"unit": "cluster", "root_uri": root.uri, "out": red, "inputs": inputs}],
            "cluster",
        )
        stats.update(near_dups=cl[0]["dups"], largest_cluster=cl[0]["largest_cluster"])
        every += cl
        near_by = _route(red, cl, "near/")
    exact_by = _route(red, ex, "exact/")
    # 7. apply
    calls = []
    for r in todo:
        for i in sorted(r.markers):
            g = _gp(r.rank, i)
            calls.append(
                {
                    "unit": f"a-{r.lr.name}-{Partition(**r.markers[i]['partition']).label}",
                    "root_uri": root.uri,
                    "out": red,
                    "rows": _sign_file(r, i, "rows.parquet"),
                    "rank": r.rank,
                    "exact": exact_by.get(g, []),
                    "near": near_by.get(g, []),
                    "index": index,
                    "final": f"out/{r.lr.name}/part-{i:05d}.parquet",
                }
            )
    applied = _units(executor, root, red, apply_unit, calls, "apply")
    every += applied
    stats["peak_unit_rss_mb"] = max((m.get("peak_rss_mb", 0.0) for m in every), default=0.0)
    # 8. publish
    mixtures: list[StageResult] = []
    k = 0
    for r in todo:
        mine = applied[k : k + len(r.markers)]
        k += len(r.markers)
        if (pub := _publish(root, stage, r, red, mine, red_fp, force)) is not None:
            mixtures.append(pub)
    report = {
        "stage": stage,
        "engine": f"partitioned/{executor.kind}",
        "workers": executor.workers,
        "schema_version": SCHEMA_VERSION,
        "dedup": stats,
        "recipes": {
            m.name: {
                "rows_out": m.rows,
                "drops": m.manifest["drops"],
                "cached": m.cached,
                "input_fingerprint": m.manifest["input_fingerprint"],
            }
            for m in mixtures
        },
        "rows_out": sum(m.rows or 0 for m in mixtures),
        "seconds": round(time.perf_counter() - t0, 3),
        "reduce_fingerprint": red_fp,
    }
    root.write_json(f"{mixture_root(stage)}/{MANIFEST}", report)
    if not cfg.keep_intermediates:
        for d in root.list_all_dirs(f"{wr}/reduce"):
            root.delete_dir(f"{wr}/reduce/{d}")
    log.info("stage %s: %d rows in %d mixture(s), %s", stage, report["rows_out"], len(mixtures), stats)
    return ingested, mixtures, failed


_TMP = re.compile(r".*\.tmp-[0-9a-f]{8}")


def _sweep_tmp(root: DataRoot, d: str) -> None:
    """Remove the half-written files (``<name>.tmp-XXXXXXXX``) a killed unit left in ``d``."""
    sel = pafs.FileSelector(root.path(d), recursive=True, allow_not_found=True)
    for info in root.fs.get_file_info(sel):
        if info.type == pafs.FileType.File and _TMP.fullmatch(info.base_name):
            log.warning("removing %s, left by a killed unit", info.path)
            root.fs.delete_file(info.path)


def _unchanged(root: DataRoot, stage: str, todo: list[_Recipe], red_fp: str) -> list[StageResult] | None:
    """The published mixtures, when the last run of this stage reduced exactly these inputs and every
    mixture it published is still there, intact; else None."""
    rep_path = f"{mixture_root(stage)}/{MANIFEST}"
    if not root.exists(rep_path):
        return None
    rep = root.read_json(rep_path)
    if rep.get("reduce_fingerprint") != red_fp:
        return None
    out = []
    for r in todo:
        if r.lr.name not in rep.get("recipes", {}):
            continue  # left out (0 rows) by that run
        d = mixture_dir(stage, r.lr.name)
        m = read_manifest(root, d)
        if m is None or m.get("input_fingerprint") != rep["recipes"][r.lr.name].get("input_fingerprint"):
            return None
        if root.files_intact(d, m.get("files", [])):
            return None
        out.append(
            StageResult(
                stage="mixture",
                name=r.lr.name,
                outputs=[root.full_uri(d)],
                rows=int(m["rows_out"]),
                cached=True,
                lineage={"input_fingerprint": m["input_fingerprint"]},
                manifest=m,
            )
        )
    return out


def _gp(rank: int, part: int) -> int:
    return (rank << PART_BITS) | part


def _route(d: str, markers: list[dict[str, Any]], prefix: str) -> dict[int, list[dict[str, Any]]]:
    """Files ``<prefix><unit>/<gpart>.parquet`` of unit markers, grouped by their global partition."""
    out: dict[int, list[dict[str, Any]]] = {}
    for m in markers:
        for f in m["files"]:
            if f["name"].startswith(prefix):
                out.setdefault(int(f["name"].rsplit("/", 1)[1].split(".")[0]), []).append(_ref(d, f))
    return {g: sorted(v, key=lambda e: e["name"]) for g, v in sorted(out.items())}


def _run_settled(
    executor: Executor, fn: Any, calls: list[dict[str, Any]], what: str
) -> list[dict[str, Any] | BaseException]:
    """Like :func:`_run`, but a failing unit yields its error instead of failing the others."""
    if not calls:
        return []
    try:
        return list(_run(executor, fn, calls, what))
    except KalmError:
        out: list[dict[str, Any] | BaseException] = []
        for c in calls:  # find which: reruns only the unfinished ones (the others return their marker)
            try:
                out.append(executor.map(fn, [c])[0])
            except KalmError as err:
                out.append(err)
        return out


def _units(
    executor: Executor, root: DataRoot, d: str, fn: Any, calls: list[dict[str, Any]], what: str
) -> list[dict[str, Any]]:
    """Run the units without a valid marker; return every unit's marker in call order."""
    res: list[dict[str, Any] | None] = [done(root, d, c["unit"]) for c in calls]
    todo = [i for i, m in enumerate(res) if m is None]
    for i, m in zip(todo, _run(executor, fn, [calls[i] for i in todo], what), strict=True):
        res[i] = m
    return [m for m in res if m is not None]


def _sign_file(r: _Recipe, i: int, suffix: str) -> dict[str, Any] | None:
    """The reference to a file the sign unit of partition ``i`` wrote (None when it wrote none)."""
    name = f"{Partition(**r.markers[i]['partition']).label}.{suffix}"
    entry = next((f for f in r.markers[i]["files"] if f["name"] == name), None)
    return _ref(r.dir, entry) if entry is not None else None


def _holdouts(root: DataRoot, r: _Recipe) -> list[pa.Table]:
    refs = [_sign_file(r, i, "holdout.parquet") for i in sorted(r.markers)]
    return [_read(root, ref) for ref in refs if ref is not None]


def _holdout_texts(root: DataRoot, todo: list[_Recipe]) -> list[str]:
    texts: list[str] = []
    for r in todo:
        for t in _holdouts(root, r):
            texts += t.column("query").to_pylist() + [p[0] for p in t.column("pos").to_pylist() if p]
    return texts


def _ingest_result(root: DataRoot, r: _Recipe, cached: bool) -> StageResult:
    ms = list(r.markers.values())
    stats: Counter[str] = Counter()
    for m in ms:
        stats.update(m["stats"])
    return StageResult(
        stage="ingest",
        name=r.lr.name,
        outputs=[root.full_uri(r.dir)],
        rows=sum(m["rows"] for m in ms),
        cached=cached,
        lineage={"sign_fingerprint": r.fp, "recipe_file": r.lr.fingerprint},
        manifest={
            "recipe": r.lr.name,
            "rows_in": sum(m["rows_in"] for m in ms),
            "partitions": len(ms),
            "drops": dict(sorted(stats.items())),
            "rows_out": sum(m["rows"] for m in ms),
        },
    )


def _publish(
    root: DataRoot, stage: str, r: _Recipe, red: str, applied: list[dict[str, Any]], red_fp: str, force: bool
) -> StageResult | None:
    """Make the recipe's applied shards its mixture (kept as it is when its rows did not change). A recipe
    left with 0 rows gets no mixture (an old one is removed: nothing stale to train on)."""
    t0 = time.perf_counter()
    out = mixture_dir(stage, r.lr.name)
    files = [f for m in applied for f in m["files"]]
    if sum(f["rows"] for f in files) == 0:
        log.warning(
            "stage %s: %s has 0 rows after ingest and dedup, left out of the mixtures", stage, r.lr.name
        )
        root.delete_dir(out)
        return None
    fp = hash_obj({"sign": r.fp, "shards": [f["sha256"] for f in files], "schema": SCHEMA_VERSION})
    old = read_manifest(root, out)
    cached = (
        not force
        and old is not None
        and old.get("input_fingerprint") == fp
        and not root.files_intact(out, old.get("files", []))
    )
    drops: Counter[str] = Counter()
    for m in r.markers.values():
        drops.update({k: v for k, v in m["stats"].items() if k != "neg_removed"})
    for m in applied:
        drops.update(m["drops"])
    if not cached:
        staging = root.staging_dir(out)
        listed = []
        for f in files:
            name = f["name"].rsplit("/", 1)[1]
            _move(root, f"{red}/{f['name']}", f"{staging}/{name}")
            listed.append({**f, "name": name})
        lrp = r.lr.recipe
        m = {
            "recipe": r.lr.name,
            "stage": stage,
            "category": lrp.category,
            "task_type": lrp.task_type,
            "rows_in": sum(x["rows_in"] for x in r.markers.values()),
            "rows_out": sum(f["rows"] for f in files),
            "drops": dict(sorted((k, v) for k, v in drops.items() if v)),
            "files": listed,
            "input_fingerprint": fp,
            "reduce_fingerprint": red_fp,
            "partitions": len(files),
            "schema_version": SCHEMA_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        root.write_json(f"{staging}/{MANIFEST}", m)
        root.publish_dir(staging, out)
        _publish_holdout(root, r)
        old = m
    assert old is not None
    return StageResult(
        stage="mixture",
        name=r.lr.name,
        outputs=[root.full_uri(out)],
        rows=int(old["rows_out"]),
        cached=cached,
        seconds=round(time.perf_counter() - t0, 3),
        lineage={"input_fingerprint": fp},
        manifest=old,
    )


def _move(root: DataRoot, src: str, dst: str) -> None:
    """A rename on a local root; a copy on S3 (the reduce folder is deleted after the stage)."""
    if not root.is_local:
        root.fs.copy_file(root.path(src), root.path(dst))
        return
    os.makedirs(os.path.dirname(root.path(dst)), exist_ok=True)
    os.replace(root.path(src), root.path(dst))


def _publish_holdout(root: DataRoot, r: _Recipe) -> None:
    tables = _holdouts(root, r)
    ho = holdout_dir(r.lr.name)
    if not tables:
        return
    t = pa.concat_tables(tables)
    _, first = np.unique(np.array(t.column("id").to_pylist()), return_index=True)
    t = t.take(pa.array(np.sort(first)))
    staging = root.staging_dir(ho)
    info = root.write_parquet(f"{staging}/part-00000.parquet", t)
    root.write_json(
        f"{staging}/{MANIFEST}",
        {"rows_out": t.num_rows, "files": [{"name": "part-00000.parquet", "rows": t.num_rows, **info}]},
    )
    root.publish_dir(staging, ho)
