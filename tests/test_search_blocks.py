"""Mining's pool search in blocks (kalm/mining/search.py): exact against one index, memory bounded by the
block, and the same mined rows whatever the block and pass sizes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kalm.core.storage import DataRoot
from kalm.mining.config import IndexSpec, MineConfig, SearchSpec
from kalm.mining.encode import load_encoder
from kalm.mining.search import build_searcher, merge_sorted, pair_scores, search_blocks
from tests.test_mining import SMALL, all_pairs, make_rows, mine, mined, write_mixture


def unit(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def on_disk(tmp_path: Path, name: str, a: np.ndarray) -> np.ndarray:
    mm = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float32, shape=a.shape)
    mm[:] = a
    return mm


def test_blocks_give_the_one_index_top_k(tmp_path: Path) -> None:
    """A pool in 14 blocks (memmaps, as mining holds them) gives the ids of one flat index over the whole
    pool, and its scores; a block smaller than k and k larger than the pool are handled."""
    rng = np.random.default_rng(0)
    pool, q = unit(rng, 2000), unit(rng, 120)
    want_s, want_i = build_searcher(pool, IndexSpec()).search(q, 40)
    got = search_blocks(on_disk(tmp_path, "p", pool), on_disk(tmp_path, "q", q), 40, IndexSpec(), 32, 150)
    assert (got.ids == want_i).all() and np.allclose(got.scores, want_s, atol=1e-6)
    assert got.lineage["blocks"] == 14 and got.lineage["size"] == 2000
    small = search_blocks(pool, q, 40, IndexSpec(), 4096, 30)  # every block smaller than k
    assert (small.ids == want_i).all()
    assert search_blocks(pool[:25], q, 40, IndexSpec(), 4096, 7).ids.shape == (120, 25)


def test_merge_keeps_lower_ids_first_on_ties() -> None:
    best_s = np.array([[0.9, 0.5]], np.float32)
    best_i = np.array([[3, 4]], np.int64)
    s, i = merge_sorted(best_s, best_i, np.array([[0.9, 0.5]], np.float32), np.array([[10, 11]]), 3)
    assert i.tolist() == [[3, 10, 4]] and s[0].tolist() == pytest.approx([0.9, 0.9, 0.5])


def test_ivf_filled_block_by_block_is_exact_at_full_probe() -> None:
    """IVF trained on a sample (one block's worth), filled with every block: probing every list is exact."""
    rng = np.random.default_rng(1)
    pool, q = unit(rng, 3000), unit(rng, 50)
    want = np.argsort(-(q @ pool.T), axis=1, kind="stable")[:, :20]
    got = search_blocks(pool, q, 20, IndexSpec(type="ivf", nlist=8, nprobe=8), 4096, 400)
    assert (got.ids == want).all() and got.lineage["size"] == 3000 and got.lineage["blocks"] == 8


def test_pair_scores_read_the_pool_by_block() -> None:
    rng = np.random.default_rng(2)
    pool, q = unit(rng, 500), unit(rng, 40)
    qi, pi = rng.integers(0, 40, 300), rng.integers(0, 500, 300)
    got = pair_scores(pool, q, qi, pi, 64)
    assert np.allclose(got, np.einsum("ij,ij->i", q[qi], pool[pi]), atol=1e-6)


class Reads:
    """A pool that records how many vectors each read materialises (what the search holds at once)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.reads = a, []

    def __len__(self) -> int:
        return len(self.a)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.a.shape

    def __getitem__(self, key: slice) -> np.ndarray:
        out = np.array(self.a[key])
        self.reads.append(len(out))
        return out


def test_the_pool_is_read_one_block_at_a_time() -> None:
    """Flat and IVF search and the positives' scores never hold more than one block of the pool."""
    rng = np.random.default_rng(3)
    pool, q = Reads(unit(rng, 5000)), unit(rng, 64)
    search_blocks(pool, q, 10, IndexSpec(), 4096, 512)  # type: ignore[arg-type]
    search_blocks(pool, q, 10, IndexSpec(type="ivf", nlist=4, nprobe=4), 4096, 512)  # type: ignore[arg-type]
    pair_scores(pool, q, rng.integers(0, 64, 100), rng.integers(0, 5000, 100), 512)  # type: ignore[arg-type]
    assert max(pool.reads) == 512 and sum(pool.reads) >= 3 * 5000


def test_mined_rows_do_not_depend_on_block_or_pass_size(tmp_path: Path) -> None:
    """The same recipe mined with the pool in ~6-row blocks and passes of 7 queries: the same rows and
    negatives as one block and one pass; the manifest records the blocks."""
    enc = load_encoder("minilm", None)
    rows = make_rows(all_pairs(20, 6))
    roots = [DataRoot.from_uri(str(tmp_path / name)) for name in ("one", "many")]
    for r in roots:
        write_mixture(r, rows)
    cfg = MineConfig(**SMALL)
    mine(roots[0], enc, cfg)
    small = cfg.model_copy(update={"search": SearchSpec(block_mb=0.01, pass_queries=7)})
    m = mine(roots[1], enc, small)
    assert mined(roots[0]) == mined(roots[1])
    assert m["index"]["blocks"] > 10 and m["index"]["block_rows"] == 6


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the ray extra is not installed")
    from tests.raycluster import ray_cluster

    with ray_cluster(tmp_path_factory.mktemp("ray")) as address:
        yield address


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_pool_search_sharded_over_workers(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """`executor: {kind: local|ray, workers: 2}` (ray: a real cluster on loopback) with a pool of several
    blocks: each worker searches its range of blocks from the vector file, the lists are merged exactly:
    the same mined rows as one process."""
    from kalm.data.executors import ExecutorSpec

    address = request.getfixturevalue("ray_address") if kind == "ray" else None
    enc = load_encoder("minilm", None, precision="fp32")
    rows = make_rows(all_pairs(20, 6))
    roots = [DataRoot.from_uri(str(tmp_path / name)) for name in ("one", "two")]
    search = SearchSpec(block_mb=0.05)  # 34-row blocks
    for r, spec in (
        (roots[0], ExecutorSpec()),
        (roots[1], ExecutorSpec(kind=kind, workers=2, address=address)),
    ):
        write_mixture(r, rows)
        m = mine(r, enc, MineConfig(**SMALL, precision="fp32", search=search, executor=spec))
    assert mined(roots[0]) == mined(roots[1])
    assert m["index"]["units"] == 2 and m["index"]["executor"] == kind and m["index"]["blocks"] > 2
