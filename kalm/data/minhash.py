"""Vectorised MinHash (one-permutation hashing with optimal densification) and LSH near-dedup.

Why not datasketch or rensa row by row: both need one Python call per row (and rensa a Python list of
shingle strings), which caps them at ~2k and ~13k rows/s here (ENV.md). This module hashes every
character n-gram of a whole batch in a few NumPy passes and builds all signatures at once. The estimator
is one-permutation hashing (Li et al., 2012) with optimal densification (Shrivastava, ICML 2017): each
shingle hash picks one of ``num_perm`` bins and the bin keeps its minimum; empty bins borrow from a bin
chosen by a fixed per-bin random sequence, which keeps the estimate of Jaccard similarity unbiased.
LSH parameters (bands x rows) come from datasketch's optimiser for the threshold, and every candidate
pair from a band collision is verified on the signatures before two rows are merged.

Example::

    sig = signatures(["the quick brown fox", "the quick brown fox!", "something else"])
    estimated_jaccard(sig[0], sig[1]) > 0.8   # True
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

_PRIME = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime, the rolling polynomial base
_EMPTY = np.uint32(0xFFFFFFFF)

_jit: Any
try:  # the same maths compiled (one pass per text); the NumPy code below is the reference and fallback
    from kalm.data import minhash_jit as _jit
except ImportError:  # pragma: no cover - numba is a dependency; a trimmed install still works
    _jit = None


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the bits of a uint64 array (in place safe, returns new)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class MinHashParams:
    """Signature and LSH settings. ``bands * rows <= num_perm``."""

    num_perm: int = 128
    ngram: int = 5
    threshold: float = 0.8
    seed: int = 1

    def lsh_shape(self) -> tuple[int, int]:
        """(bands, rows) minimising weighted FP+FN probability, via datasketch's own optimiser."""
        return _lsh_shape(self.threshold, self.num_perm)


@functools.lru_cache(maxsize=64)
def _lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """Cached: the optimiser integrates numerically (~0.1 s a call, and its import ~0.8 s)."""
    from datasketch.lsh import _optimal_param

    b, r = _optimal_param(threshold, num_perm, 0.5, 0.5)
    return int(b), int(r)


def _fmix32(h: np.ndarray) -> None:
    """MurmurHash3's 32-bit finaliser, in place (few passes, no temporaries: this is the hot loop)."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)


def _ascii_codes(texts: pa.Array | pa.ChunkedArray, ngram: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The code points (uint8) and lengths of an Arrow string array without leaving Arrow, when every
    text is ASCII (its UTF-8 bytes are its code points), none is null and none is shorter than ``ngram``;
    else None."""
    col = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    col = col.cast(pa.large_string())
    n = len(col)
    if col.null_count or n == 0:
        return None
    off = np.frombuffer(col.buffers()[1], np.int64, count=n + 1, offset=col.offset * 8)
    lens = np.diff(off)
    if int(lens.min()) < ngram:
        return None
    data = col.buffers()[2]
    codes = np.frombuffer(data, np.uint8, count=int(off[-1] - off[0]), offset=int(off[0])) if data else None
    if codes is None or int(codes.max()) >= 128:
        return None
    return codes, lens


def code_points(
    texts: Sequence[str] | pa.Array | pa.ChunkedArray, ngram: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(cps, lens)``: the code points of the texts, concatenated (uint8 for an Arrow array of ASCII texts,
    read in place without Python strings; else uint32), and the int64 length of each. Texts shorter than
    ``ngram`` (including empty ones) are padded with NUL so they give exactly one shingle."""
    fast = _ascii_codes(texts, ngram) if isinstance(texts, pa.Array | pa.ChunkedArray) else None
    if fast is not None:
        return fast
    if not isinstance(texts, list):
        texts = texts.to_pylist() if isinstance(texts, pa.Array | pa.ChunkedArray) else list(texts)
    n = len(texts)
    padded = [t if len(t) >= ngram else t + "\x00" * (ngram - len(t)) for t in texts]
    lens = np.fromiter(map(len, padded), dtype=np.int64, count=n)
    return np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32), lens


def _start(seed: int) -> int:
    return seed * 0x9E3779B1 & 0xFFFFFFFF


def shingle_hashes(
    texts: Sequence[str] | pa.Array | pa.ChunkedArray, ngram: int, seed: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Hash every character n-gram of every text (one pass per n-gram position, in place).

    Returns ``(hashes, lens)``: uint32 hashes of shape ``(W,)`` over all windows of the concatenated
    texts (the last ``ngram - 1`` windows of each text straddle into the next one), and the int64 length
    of each (padded) text (:func:`code_points`).
    """
    cps, lens = code_points(texts, ngram)
    n_win = int(lens.sum()) - ngram + 1
    h = np.full(n_win, np.uint32(_start(seed)), dtype=np.uint32)
    for j in range(ngram):
        h *= np.uint32(0x01000193)  # FNV-1a 32-bit prime
        h ^= cps[j : j + n_win]
    _fmix32(h)
    return h, lens


def _densify_table(num_perm: int, seed: int, attempts: int = 64) -> np.ndarray:
    """For each bin j, a fixed random sequence of donor bins (the same for every set)."""
    rng = np.random.default_rng(seed + 7919)
    return rng.integers(0, num_perm, size=(attempts, num_perm))


def signatures(
    texts: Sequence[str] | pa.Array | pa.ChunkedArray, params: MinHashParams | None = None
) -> np.ndarray:
    """MinHash signatures, uint32 array of shape ``(len(texts), num_perm)`` (compiled where Numba imports:
    the same values as :func:`signatures_numpy`)."""
    p = params or MinHashParams()
    if len(texts) == 0:
        return np.empty((0, p.num_perm), dtype=np.uint32)
    if _jit is None:
        return signatures_numpy(texts, p)
    cps, lens = code_points(texts, p.ngram)
    table = _densify_table(p.num_perm, p.seed)
    return _jit.signatures_kernel(cps, lens, p.ngram, np.uint32(_start(p.seed)), p.num_perm, table)


def signatures_numpy(texts: Sequence[str] | pa.Array | pa.ChunkedArray, params: MinHashParams) -> np.ndarray:
    """The reference: every window of the batch hashed in a few NumPy passes, bins filled with
    ``np.minimum.at``."""
    p = params
    n, k = len(texts), p.num_perm
    if n == 0:
        return np.empty((0, k), dtype=np.uint32)
    hashes, lens = shingle_hashes(texts, p.ngram, p.seed)
    # each window's bin in a flat (n + 1) x k array: its row's offset plus hash mod k; the windows that
    # straddle two texts go to the spare last row
    flat = np.repeat(np.arange(0, n * k, k, dtype=np.intp), lens)[: len(hashes)]  # intp: no index casts
    ends = np.cumsum(lens)
    for d in range(1, p.ngram):
        idx = ends - d
        flat[idx[idx < len(hashes)]] = n * k
    if k & (k - 1) == 0:  # a power of two: mask and shift (the row offset is a multiple of k: | adds)
        flat |= hashes & np.uint32(k - 1)
        vals = hashes >> np.uint32(k.bit_length() - 1)
    else:
        flat += hashes % np.uint32(k)
        vals = hashes // np.uint32(k)
    flat_sig = np.full((n + 1) * k, _EMPTY, dtype=np.uint32)
    np.minimum.at(flat_sig, flat, vals)
    sig = flat_sig[: n * k].reshape(n, k)
    flat_sig = flat_sig[: n * k]
    holes = np.flatnonzero(flat_sig == _EMPTY)  # empty bins, as flat indices row * k + bin
    if holes.size:
        table = _densify_table(k, p.seed)
        filled = flat_sig != _EMPTY
        rows_k, bins = holes - holes % k, holes % k
        for attempt in range(table.shape[0]):
            if holes.size == 0:
                break
            donor = rows_k + table[attempt, bins]
            ok = filled[donor]  # donors are bins filled by shingles, never by densification
            flat_sig[holes[ok]] = flat_sig[donor[ok]]
            holes, rows_k, bins = holes[~ok], rows_k[~ok], bins[~ok]
        # Extremely rare leftovers: take the row's minimum over filled bins (deterministic).
        if holes.size:
            row_min = np.where(filled.reshape(n, k), sig, _EMPTY).min(axis=1)
            flat_sig[holes] = row_min[holes // k]
    return sig


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature slots; works row-wise on 2-D arrays."""
    return np.asarray((a == b).mean(axis=-1))


def band_hashes(sig: np.ndarray, bands: int, rows: int, chunk: int = 8192) -> np.ndarray:
    """uint64 array ``(n, bands)``: one hash per band of ``rows`` signature slots (band index mixed in).
    Computed band-major (the result is a transposed view: its ``.T`` is contiguous); compiled where Numba
    imports, the same values as :func:`band_hashes_numpy`."""
    if _jit is None:
        return band_hashes_numpy(sig, bands, rows, chunk)
    return _jit.band_hashes_kernel(np.ascontiguousarray(sig), bands, rows).T


def band_hashes_numpy(sig: np.ndarray, bands: int, rows: int, chunk: int = 8192) -> np.ndarray:
    """The reference: in row chunks that stay in cache, one NumPy pass per slot."""
    n = sig.shape[0]
    out = np.empty((bands, n), dtype=np.uint64)
    with np.errstate(over="ignore"):
        seeds = [np.uint64(b + 1) * np.uint64(0x9E3779B97F4A7C15) for b in range(bands)]
        for i in range(0, n, chunk):
            s64 = np.ascontiguousarray(sig[i : i + chunk, : bands * rows].T, dtype=np.uint64)  # slot-major
            for b in range(bands):
                h = np.full(s64.shape[1], seeds[b], dtype=np.uint64)
                for j in range(rows):
                    h *= _PRIME
                    h ^= s64[b * rows + j]
                out[b, i : i + chunk] = _mix64(h)
    return out.T


class RowSource(Protocol):
    """Anything indexable by an int array that returns signature rows (an array, a memmap view)."""

    def __getitem__(self, idx: np.ndarray, /) -> np.ndarray: ...


def duplicate_clusters(
    bands: np.ndarray, sig: np.ndarray | RowSource, threshold: float, chunk: int = 1_000_000
) -> np.ndarray:
    """Cluster label per row: rows joined by a band collision *and* verified similarity >= threshold.

    ``bands``: ``(n, B)`` band hashes; ``sig``: ``(n, num_perm)`` signatures (an np.memmap is fine: only
    candidate rows are touched). Returns int labels whose smallest member is the first row of each cluster.
    """
    n = bands.shape[0]
    src_all, dst_all = [], []
    for band in range(bands.shape[1]):
        col = bands[:, band]
        order = np.argsort(col, kind="stable")
        sorted_col = col[order]
        same = sorted_col[1:] == sorted_col[:-1]
        if not same.any():
            continue
        # star edges: every member of a bucket to the bucket's first (lowest-index) member
        group_start = np.concatenate([[True], ~same])
        head = order[np.maximum.accumulate(np.where(group_start, np.arange(n), 0))]
        members = np.nonzero(~group_start)[0]
        src_all.append(head[members])
        dst_all.append(order[members])
    if not src_all:
        return np.arange(n)
    src = np.concatenate(src_all)
    dst = np.concatenate(dst_all)
    pairs = np.unique(np.stack([np.minimum(src, dst), np.maximum(src, dst)], axis=1), axis=0)
    keep = np.zeros(len(pairs), dtype=bool)
    for i in range(0, len(pairs), chunk):
        a, b = pairs[i : i + chunk, 0], pairs[i : i + chunk, 1]
        keep[i : i + chunk] = estimated_jaccard(np.asarray(sig[a]), np.asarray(sig[b])) >= threshold
    pairs = pairs[keep]
    if len(pairs) == 0:
        return np.arange(n)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return np.asarray(labels)


def first_of_clusters(labels: np.ndarray) -> np.ndarray:
    """Boolean keep-mask: True for the first (lowest-index) row of each cluster."""
    _, first = np.unique(labels, return_index=True)
    keep = np.zeros(len(labels), dtype=bool)
    keep[first] = True
    return keep
