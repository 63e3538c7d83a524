"""Unit tests: normalisation and the vectorised MinHash / LSH near-dedup, checked against exact Jaccard."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest

from kalm.data import minhash
from kalm.data.normalize import has_invalid_unicode, normalize_text


def test_normalize_nfc_controls_whitespace() -> None:
    assert normalize_text("  Cafe\u0301\x07  au\tlait \u200b") == "Café au lait"
    assert normalize_text("a \n\n  b  c", keep_newlines=True) == "a\nb c"
    assert normalize_text("\x00\x01 ") == ""


def test_invalid_unicode_detected() -> None:
    bad = b"ok \xff".decode("utf-8", errors="surrogateescape")
    assert has_invalid_unicode(bad) and not has_invalid_unicode("ok é")


def _shingles(t: str, n: int = 5) -> set[str]:
    return {t[i : i + n] for i in range(len(t) - n + 1)} or {t}


def _jaccard(a: str, b: str) -> float:
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_signature_estimates_jaccard() -> None:
    rng = random.Random(0)
    base = ["".join(rng.choices(string.ascii_lowercase + " ", k=300)) for _ in range(300)]
    other = []
    for t in base:
        chars = list(t)
        for _ in range(rng.randint(0, 40)):
            chars[rng.randrange(len(chars))] = rng.choice("xyz")
        other.append("".join(chars))
    sig_a = minhash.signatures(base)
    sig_b = minhash.signatures(other)
    est = minhash.estimated_jaccard(sig_a, sig_b)
    true = np.array([_jaccard(a, b) for a, b in zip(base, other, strict=True)])
    err = est - true
    assert abs(err.mean()) < 0.01  # unbiased
    assert err.std() < 0.05  # ~ sqrt(J(1-J)/128)


def test_signatures_deterministic_and_batch_independent() -> None:
    texts = ["alpha beta gamma delta", "x", "", "another text entirely here"]
    one = minhash.signatures(texts)
    two = np.vstack([minhash.signatures([t]) for t in texts])
    assert np.array_equal(one, two)


@pytest.mark.parametrize("threshold", [0.7, 0.8, 0.9])
def test_duplicate_clusters_find_planted_near_dups(threshold: float) -> None:
    rng = random.Random(1)
    base = ["".join(rng.choices(string.ascii_lowercase + "  ", k=300)) for i in range(400)]
    dups = [t[:150] + "!" + t[151:] for t in base[:100]]  # one-character edit: Jaccard ~0.97
    texts = base + dups
    p = minhash.MinHashParams(threshold=threshold)
    sig = minhash.signatures(texts, p)
    labels = minhash.duplicate_clusters(minhash.band_hashes(sig, *p.lsh_shape()), sig, threshold)
    keep = minhash.first_of_clusters(labels)
    # every planted duplicate collapses into its original; originals stay
    assert keep[:400].all()
    found = sum(labels[i] == labels[400 + i] for i in range(100))
    # LSH is probabilistic: at J~0.97 the (bands, rows) chosen for 0.7/0.8 catch ~all; 0.9 is stricter
    assert found >= (100 if threshold < 0.9 else 85)
    assert (~keep[400:]).sum() == found


def test_distinct_texts_are_not_merged() -> None:
    rng = random.Random(2)
    texts = ["".join(rng.choices(string.ascii_letters, k=200)) for _ in range(500)]
    p = minhash.MinHashParams()
    sig = minhash.signatures(texts, p)
    labels = minhash.duplicate_clusters(minhash.band_hashes(sig, *p.lsh_shape()), sig, 0.8)
    assert minhash.first_of_clusters(labels).all()


@pytest.mark.parametrize("num_perm,ngram,seed", [(128, 5, 1), (100, 3, 7)])
def test_compiled_kernels_equal_the_numpy_reference(num_perm: int, ngram: int, seed: int) -> None:
    """The Numba kernels (minhash_jit) give the NumPy reference's signatures and band hashes bit for bit:
    ASCII texts read in place from Arrow (uint8), non-ASCII and short or empty texts (uint32, NUL-padded),
    a bin count that is not a power of two, rows that need densification."""
    import pyarrow as pa

    assert minhash._jit is not None  # numba is a dependency: the compiled path is what runs
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "délta", "日本語", "x", "", "ab", "zeta"]
    mixed = [" ".join(rng.choices(words, k=rng.randint(0, 30))) for _ in range(600)]
    plain = [t.encode("ascii", "ignore").decode() + " padding" for t in mixed]
    p = minhash.MinHashParams(num_perm=num_perm, ngram=ngram, seed=seed)
    bands, rows = p.lsh_shape()
    for texts in (mixed, pa.array(plain), pa.array(mixed)):
        sig = minhash.signatures(texts, p)
        assert np.array_equal(sig, minhash.signatures_numpy(texts, p))
        bh = minhash.band_hashes(sig, bands, rows)
        assert np.array_equal(bh, minhash.band_hashes_numpy(sig, bands, rows)) and bh.T.flags.c_contiguous
