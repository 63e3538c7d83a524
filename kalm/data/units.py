"""The work units of the partitioned data stage (driven by :mod:`kalm.data.distributed`): each is a
module-level function of plain, picklable arguments that reads its inputs from the data root, writes its
files, then its completion marker, and returns the marker. Units never pass data through the executor.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from kalm.core.errors import KalmError
from kalm.core.schema import ROW_SCHEMA
from kalm.core.storage import DataRoot
from kalm.data import minhash
from kalm.data.config import IngestConfig
from kalm.data.fastpath import CONTROL_ASCII, WS_RUN, fast_rows
from kalm.data.ingest import READER_SKIPS, _label_rows, _pair_rows, near_text
from kalm.data.mixtures import EvalIndex
from kalm.data.normalize import comparison_form
from kalm.data.partitions import Partition, read_partition
from kalm.data.readers import resolve_files
from kalm.data.recipes import LoadedRecipe, load_recipe_file
from kalm.data.slots import (
    id_hashes,
    peak_rss_mb,
    read_sig,
    read_slots,
    reset_peak_rss,
    sig_array,
    write_sig,
    write_slots,
)

log = logging.getLogger(__name__)
ENGINE_VERSION = 3  # 3: intermediates carry xxh3_128 checksums, signatures their low 16 bits
SLOTS = 256  # hash classes of the reduce (a hash's top 8 bits): units take contiguous ranges of them
ROW_BITS, PART_BITS = 28, 24  # and 12 bits of recipe rank: 64 in all
MAX_ROWS_PER_PARTITION = 1 << ROW_BITS
MAX_PARTITIONS = 1 << PART_BITS
MAX_RECIPES = 1 << (64 - ROW_BITS - PART_BITS)
U64 = pa.uint64()


def work_root(stage: str) -> str:
    return f"work/{stage}"


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
    """Write the unit's marker (last: it says every file above is whole), with the unit's peak RSS."""
    info["peak_rss_mb"] = peak_rss_mb()
    root.write_json(_marker(d, unit), info)
    return info


def _put(
    root: DataRoot, d: str, name: str, table: pa.Table, files: list[dict[str, Any]], final: bool = False
) -> None:
    """Write one unit file: zstd and sha256 for what is published, lz4 and xxh3_128 for intermediates (hashes
    and signatures do not compress; zstd and sha256 would spend the time for nothing)."""
    info = root.write_parquet(
        f"{d}/{name}",
        table,
        compression="zstd" if final else "lz4",
        checksum="sha256" if final else "xxh3_128",
    )
    files.append({"name": name, "rows": table.num_rows, **info})


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


def ref(d: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A file another unit reads: its path and the size and checksum its writer recorded."""
    return {**entry, "name": f"{d}/{entry['name']}"}


def read_ref(root: DataRoot, ref: dict[str, Any]) -> pa.Table:
    """Read a unit's file, verified against its marker's size and checksum (a one-line error if changed)."""
    return root.read_parquet_checked(ref["name"], ref)


# -- units -------------------------------------------------------------------------------------------
def sign_unit(
    unit: str, root_uri: str, recipe_path: str, part: dict[str, Any], cfg: dict[str, Any], out: str
) -> dict[str, Any]:
    """Read one partition; write its rows, signatures, exact-hash shards, band buckets and held-out rows."""
    reset_peak_rss()
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
        texts = pa.array([near_text(row, label) for row in rows], pa.string())
        del rows
    if table.num_rows >= MAX_ROWS_PER_PARTITION:
        raise KalmError(
            f"{lr.name}: {table.num_rows} rows in one partition (at most {MAX_ROWS_PER_PARTITION - 1}): "
            "lower partition_bytes, or split the source into more files"
        )
    idh = id_hashes(table.column("id"))
    # as ingest._is_holdout: the id's first 8 hex digits mod 10,000
    frac = lr.recipe.holdout
    ho = (
        ((idh >> np.uint64(32)) % np.uint64(10_000)) < frac * 10_000 if frac > 0 else np.zeros(len(idh), bool)
    )
    files: list[dict[str, Any]] = []
    if ho.any():
        _put(root, out, f"{p.label}.holdout.parquet", table.filter(pa.array(ho)), files)
        table = table.filter(pa.array(~ho))
        idh = idh[~ho]
        texts = texts.filter(pa.array(~ho))
    n = table.num_rows
    local = (np.uint64(p.index) << np.uint64(ROW_BITS)) | np.arange(n, dtype=np.uint64)
    _put(root, out, f"{p.label}.rows.parquet", table, files)
    top = np.uint64(64 - 8)  # the slot of a hash: its top 8 bits (uniform, independent of low-bit uses)
    write_slots(
        root,
        out,
        f"{p.label}.exact.arrow",
        {"idh": idh, "key": local},
        (idh >> top).astype(np.int64),
        SLOTS,
        files,
    )
    if c.near_dedup.enabled and n:
        mp = near_params(c)
        step = 8192  # in chunks: the shingle arrays of a whole partition would not stay in cache
        sig = np.concatenate([minhash.signatures(texts[i : i + step], mp) for i in range(0, n, step)])
        del texts
        bands, band_rows = mp.lsh_shape()
        bh = minhash.band_hashes(sig, bands, band_rows)
        write_sig(root, out, f"{p.label}.sig.arrow", sig, files)
        del sig
        # band-major: slot = band * SLOTS + the band hash's top 8 bits
        slot = (np.arange(bands, dtype=np.int64)[:, None] * SLOTS + (bh.T >> top).astype(np.int64)).ravel()
        write_slots(
            root,
            out,
            f"{p.label}.bands.arrow",
            {"band_key": bh.T.ravel(), "idh": np.tile(idh, bands), "key": np.tile(local, bands)},
            slot,
            bands * SLOTS,
            files,
        )
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


def _gather(root: DataRoot, sources: list[tuple[dict[str, Any], int]], slots: range) -> dict[str, np.ndarray]:
    """The ``slots`` of every (sign file, recipe rank), concatenated in that order, their local ``key``
    turned into the global key."""
    parts: dict[str, list[np.ndarray]] = {}
    for ref, rank in sources:
        cols = read_slots(root, ref, slots)
        cols["key"] = cols["key"] | (np.uint64(rank) << np.uint64(ROW_BITS + PART_BITS))
        for k, v in cols.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _shared(by: np.ndarray, *cols: np.ndarray) -> tuple[np.ndarray, ...]:
    """The rows of ``cols`` whose ``by`` value occurs more than once, in their order (one unstable sort
    finds them, so the exact sorts that follow see only the few rows that can collide)."""
    order = np.argsort(by)
    s = by[order]
    eq = s[1:] == s[:-1]
    multi = np.zeros(len(by), dtype=bool)
    multi[1:] |= eq
    multi[:-1] |= eq
    keep = np.sort(order[multi])
    return tuple(c[keep] for c in cols)


def _heads(start: np.ndarray, key: np.ndarray) -> np.ndarray:
    """For rows sorted by group (``start`` marks each group's first row): the group's first key, per row."""
    return key[np.maximum.accumulate(np.where(start, np.arange(len(key)), 0))]


def exact_unit(
    unit: str, root_uri: str, out: str, sources: list[tuple[dict[str, Any], int]], slots: list[int]
) -> dict[str, Any]:
    """One range of id-hash slots: rows sharing an id keep the smallest key; the others are exact
    duplicates."""
    reset_peak_rss()
    root = DataRoot.from_uri(root_uri)
    if (info := done(root, out, unit)) is not None:
        return info
    files: list[dict[str, Any]] = []
    t = _gather(root, sources, range(*slots))
    dups = 0
    idh, key = _shared(t["idh"], t["idh"], t["key"]) if t else (np.empty(0, np.uint64),) * 2
    del t
    if len(key):
        order = np.lexsort((key, idh))
        idh, key = idh[order], key[order]
        first = np.concatenate([[True], idh[1:] != idh[:-1]])
        canon = _heads(first, key)
        d = ~first
        dups = int(d.sum())
        if dups:
            drop = pa.table({"key": pa.array(key[d], U64), "canon": pa.array(canon[d], U64)})
            _put_split(root, out, f"exact/{unit}", drop, gpart(key[d]), files)
    return _finish(root, out, unit, {"dups": dups, "files": files})


def bands_unit(
    unit: str, root_uri: str, out: str, sources: list[tuple[dict[str, Any], int]], slots: list[int]
) -> dict[str, Any]:
    """One band's range of bucket-hash slots (buckets are whole in it): candidate edges from each bucket's
    smallest key to its other members."""
    reset_peak_rss()
    root = DataRoot.from_uri(root_uri)
    if (info := done(root, out, unit)) is not None:
        return info
    files: list[dict[str, Any]] = []
    t = _gather(root, sources, range(*slots))
    edges, biggest = 0, 0
    bk, idh, key = (
        _shared(t["band_key"], t["band_key"], t["idh"], t["key"]) if t else (np.empty(0, np.uint64),) * 3
    )
    del t
    if len(key):
        order = np.lexsort((key, idh, bk))
        bk, idh, key = bk[order], idh[order], key[order]
        # exact copies share every band: one member per id (its smallest key, the exact survivor)
        distinct = np.concatenate([[True], (bk[1:] != bk[:-1]) | (idh[1:] != idh[:-1])])
        bk, key = bk[distinct], key[distinct]
        order = np.lexsort((key, bk))
        bk, key = bk[order], key[order]
        start = np.concatenate([[True], bk[1:] != bk[:-1]])
        head = _heads(start, key)
        m = ~start
        edges = int(m.sum())
        if edges:
            sizes = np.diff(np.concatenate([np.nonzero(start)[0], [len(start)]]))
            biggest = int(sizes.max())
            e = pa.table({"a": pa.array(head[m], U64), "b": pa.array(key[m], U64)})
            _put_split(root, out, f"bands/{unit}", e, gpart(head[m]), files)
    return _finish(root, out, unit, {"edges": edges, "largest_bucket": biggest, "files": files})


def comparison_forms(texts: list[str]) -> list[str]:
    """:func:`kalm.data.normalize.comparison_form` of each text, vectorised for ASCII texts (whose NFKC form
    is themselves and whose case fold is their lower case); others through the Python function."""
    s = pl.Series(texts, dtype=pl.Utf8)
    fast = (
        s.str.replace_all(CONTROL_ASCII, "").str.to_lowercase().str.replace_all(WS_RUN, " ").str.strip_chars()
    ).to_list()
    ascii_ = (s.str.len_bytes() == s.str.len_chars()).to_list()
    return [f if a else comparison_form(t) for t, f, a in zip(texts, fast, ascii_, strict=True)]


def _sig_of(root: DataRoot, ref: dict[str, Any], keys: np.ndarray, num_perm: int) -> np.ndarray:
    """Signatures of ``keys`` (all in the partition whose signature file is ``ref``)."""
    sig = read_sig(root, ref, num_perm)
    return sig[(keys & np.uint64(MAX_ROWS_PER_PARTITION - 1)).astype(np.int64)]


VERIFY_CHUNK = 1 << 18  # edges a verify1 unit holds at once (with their signatures: ~140 MB)


def verify1_unit(
    unit: str, root_uri: str, out: str, inputs: list[dict[str, Any]], sig: dict[str, Any], num_perm: int
) -> dict[str, Any]:
    """Edges whose smaller end is in this partition, that end's signature attached, sent on to the
    partition of the other end, each pair once. The signatures are attached in chunks of
    :data:`VERIFY_CHUNK` edges: a popular row (the head of many buckets) never makes the unit hold all of
    its edges with their signatures (16 B an edge, not 528)."""
    reset_peak_rss()
    root = DataRoot.from_uri(root_uri)
    if (info := done(root, out, unit)) is not None:
        return info
    files: list[dict[str, Any]] = []
    sigs = read_sig(root, sig, num_perm)
    low = np.uint64(MAX_ROWS_PER_PARTITION - 1)
    t = pa.concat_tables([read_ref(root, i) for i in inputs])  # 16 B an edge; the signatures come per chunk
    a_all, b_all = t.column("a").to_numpy(), t.column("b").to_numpy()
    del t
    order = np.lexsort((b_all, a_all))  # a pair that collided in several bands: once
    a_all, b_all = a_all[order], b_all[order]
    first = np.concatenate([[True], (a_all[1:] != a_all[:-1]) | (b_all[1:] != b_all[:-1])])
    a_all, b_all = a_all[first], b_all[first]
    sent = len(a_all)
    for chunk, s in enumerate(range(0, sent, VERIFY_CHUNK)):
        a, b = a_all[s : s + VERIFY_CHUNK], b_all[s : s + VERIFY_CHUNK]
        sig_a = np.ascontiguousarray(sigs[(a & low).astype(np.int64)])
        e = pa.table(
            {
                "a": pa.array(a, U64),
                "b": pa.array(b, U64),
                "sig_a": pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(num_perm * sig_a.itemsize), len(a), [None, pa.py_buffer(sig_a)]
                ),
            }
        )
        _put_split(root, out, f"v1/{unit}.{chunk}", e, gpart(b), files)
        del e, sig_a
    return _finish(root, out, unit, {"pairs": sent, "files": files})


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
    reset_peak_rss()
    root = DataRoot.from_uri(root_uri)
    if (info := done(root, out, unit)) is not None:
        return info
    files: list[dict[str, Any]] = []
    t = pa.concat_tables([read_ref(root, i) for i in inputs])
    a, b = t.column("a").to_numpy(), t.column("b").to_numpy()
    sig_a = sig_array(t.column("sig_a"), num_perm)
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
    reset_peak_rss()
    root = DataRoot.from_uri(root_uri)
    if (info := done(root, out, unit)) is not None:
        return info
    files: list[dict[str, Any]] = []
    tables = [read_ref(root, i) for i in inputs]
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
    reset_peak_rss()
    root = DataRoot.from_uri(root_uri)
    if (info := done(root, out, unit)) is not None:
        return info
    table = read_ref(root, rows)
    n = table.num_rows
    reason = np.zeros(n, dtype=np.int8)  # 0 keep, 1 exact, 2 near, 3 contaminated
    same = np.zeros(n, dtype=bool)
    shift = np.uint64(ROW_BITS + PART_BITS)
    for code, paths in ((1, exact), (2, near)):
        for path in paths:
            d = read_ref(root, path)
            key, canon = d.column("key").to_numpy(), d.column("canon").to_numpy()
            row = (key & np.uint64(MAX_ROWS_PER_PARTITION - 1)).astype(np.int64)
            fresh = reason[row] == 0
            reason[row[fresh]] = code
            same[row[fresh]] = (canon[fresh] >> shift) == np.uint64(rank)
    if index is not None and index.keys and n:  # an empty index matches nothing: skip the forms
        live = np.nonzero(reason == 0)[0]
        q = pc.take(table.column("query"), pa.array(live)).to_pylist()
        f = [(x or [""])[0] for x in pc.take(table.column("pos"), pa.array(live)).to_pylist()]
        bad = index.contaminated(comparison_forms(q), forms=True) | index.contaminated(
            comparison_forms(f), forms=True
        )
        reason[live[bad]] = 3
    drops = {
        "exact_dup": int(((reason == 1) & same).sum()),
        "cross_recipe_dup": int(((reason == 1) & ~same).sum()),
        "near_dup": int(((reason == 2) & same).sum()),
        "cross_recipe_near_dup": int(((reason == 2) & ~same).sum()),
        "contaminated": int((reason == 3).sum()),
    }
    files: list[dict[str, Any]] = []
    _put(root, out, final, table.filter(pa.array(reason == 0)), files, final=True)
    return _finish(root, out, unit, {"drops": {k: v for k, v in drops.items() if v}, "files": files})


@dataclass
class SignedRecipe:
    lr: LoadedRecipe
    rank: int
    dir: str
    fp: str
    parts: list[Partition]
    markers: dict[int, dict[str, Any]]


def sign_file(r: SignedRecipe, i: int, suffix: str) -> dict[str, Any] | None:
    """The reference to a file the sign unit of partition ``i`` wrote (None when it wrote none)."""
    name = f"{Partition(**r.markers[i]['partition']).label}.{suffix}"
    entry = next((f for f in r.markers[i]["files"] if f["name"] == name), None)
    return ref(r.dir, entry) if entry is not None else None


def holdouts(root: DataRoot, r: SignedRecipe) -> list[pa.Table]:
    refs = [sign_file(r, i, "holdout.parquet") for i in sorted(r.markers)]
    return [read_ref(root, ref) for ref in refs if ref is not None]
