"""Compiled kernels for :mod:`kalm.data.minhash`: the same signatures and band hashes, bit for bit, in one
pass per text instead of ~25 NumPy passes over every window of a batch.

The NumPy code in ``minhash`` defines the maths and stays the fallback where Numba does not import; these
kernels only change how fast it runs (``tests/test_normalize_minhash.py`` checks them equal on ASCII,
non-ASCII, short and empty texts). Every step mirrors its NumPy twin:

- shingle hash: ``h = seed·0x9E3779B1``; for each of the n code points ``h = h·0x01000193 ^ cp``, all in
  uint32; then MurmurHash3's fmix32;
- bin ``h mod k`` (``h & (k-1)`` for a power of two), value ``h div k``; a bin keeps its minimum value;
- optimal densification: an empty bin takes the value of the first donor of its fixed sequence that a
  shingle filled; a row none of whose donors is filled takes the minimum of its filled bins;
- band hash: ``h = (b+1)·0x9E3779B97F4A7C15``; for each of the band's rows ``h = h·FNV64 ^ slot``; then
  splitmix64's finaliser.

Compiled on first use and cached on disk (``cache=True``); ``nogil``: the calling thread releases the GIL.
Measured on the bench's 340-character texts: 1.4 us a text for the signature (the NumPy code: 8), 0.15 us
for its band hashes (1.1).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def window_hashes(cps: np.ndarray, ngram: int, start: np.uint32) -> np.ndarray:  # pragma: no cover - compiled
    """The uint32 hash of every window of ``ngram`` code points of ``cps`` (windows straddling two texts
    included: the caller skips them). Every uint32 product is truncated explicitly (Numba computes it in
    64 bits)."""
    total = cps.shape[0] - ngram + 1
    out = np.empty(max(total, 0), dtype=np.uint32)
    prime = np.uint32(0x01000193)
    s32 = np.uint32(start)
    for i in range(total):
        x = s32
        if ngram == 5:  # the default, unrolled: a third faster than the loop
            x = np.uint32(x * prime) ^ np.uint32(cps[i])
            x = np.uint32(x * prime) ^ np.uint32(cps[i + 1])
            x = np.uint32(x * prime) ^ np.uint32(cps[i + 2])
            x = np.uint32(x * prime) ^ np.uint32(cps[i + 3])
            x = np.uint32(x * prime) ^ np.uint32(cps[i + 4])
        else:
            for j in range(ngram):
                x = np.uint32(x * prime) ^ np.uint32(cps[i + j])
        x ^= x >> np.uint32(16)  # MurmurHash3's fmix32
        x = np.uint32(x * np.uint32(0x85EBCA6B))
        x ^= x >> np.uint32(13)
        x = np.uint32(x * np.uint32(0xC2B2AE35))
        out[i] = x ^ (x >> np.uint32(16))
    return out


@njit(cache=True, nogil=True)
def signatures_kernel(
    cps: np.ndarray, lens: np.ndarray, ngram: int, start: np.uint32, k: int, donors: np.ndarray
) -> np.ndarray:  # pragma: no cover - compiled
    """``cps``: the code points of the texts, concatenated (each at least ``ngram`` long: short ones are
    NUL-padded by the caller); ``lens``: their lengths; ``start``: the hash's initial value (from the
    seed); ``donors``: (attempts, k) densification table. Returns (n, k) uint32 signatures.

    Every window hashed in one flat pass, then per text a branchless minimum per bin (a compare-and-branch
    mispredicts often enough to cost 3-4x here), then densification."""
    n = lens.shape[0]
    empty = np.uint32(0xFFFFFFFF)
    sig = np.full((n, k), empty, dtype=np.uint32)
    filled = np.zeros(k, dtype=np.bool_)
    pow2 = (k & (k - 1)) == 0
    shift = 0
    while (1 << shift) < k:
        shift += 1
    mask, kk, sh = np.uint32(k - 1), np.uint32(k), np.uint32(shift)
    h = window_hashes(cps, ngram, start)
    at = 0
    for r in range(n):
        row = sig[r]
        for i in range(at, at + lens[r] - ngram + 1):
            x = h[i]
            if pow2:
                b, v = x & mask, np.uint32(x >> sh)
            else:
                b, v = x % kk, np.uint32(x // kk)
            row[b] = min(row[b], v)
        at += lens[r]
        # densification (the donors are bins a shingle filled, never densified ones)
        holes = 0
        for b in range(k):
            filled[b] = row[b] != empty
            if not filled[b]:
                holes += 1
        if holes == 0:
            continue
        low = empty
        for b in range(k):
            if filled[b] and row[b] < low:
                low = row[b]
        for b in range(k):
            if filled[b]:
                continue
            value = low
            for a in range(donors.shape[0]):
                d = donors[a, b]
                if filled[d]:
                    value = row[d]
                    break
            row[b] = value
    return sig


@njit(cache=True, nogil=True)
def band_hashes_kernel(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:  # pragma: no cover - compiled
    """(n, num_perm) uint32 -> (bands, n) uint64 (band-major, as the NumPy version builds it)."""
    n = sig.shape[0]
    out = np.empty((bands, n), dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    golden = np.uint64(0x9E3779B97F4A7C15)
    for r in range(n):
        for b in range(bands):
            h = np.uint64(b + 1) * golden
            for j in range(rows):
                h = (h * prime) ^ np.uint64(sig[r, b * rows + j])
            h ^= h >> np.uint64(30)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(27)
            h *= np.uint64(0x94D049BB133111EB)
            out[b, r] = h ^ (h >> np.uint64(31))
    return out
