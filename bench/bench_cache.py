"""Benchmark of the mining embedding cache (issue #13): insert time per text as the cache grows, from 10k to
1M texts (synthetic keys and vectors, shards of 8,192 texts as ``embed_texts`` writes them), for the store
as it is and for the store as it was (its key index re-sorted after every shard), in the same run, each
size in a fresh folder; then one lookup of every key.

    .venv/bin/python bench/bench_cache.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kalm.core.storage import DataRoot  # noqa: E402
from kalm.mining.cache import KEY_BYTES, EmbeddingStore  # noqa: E402


class ResortingStore(EmbeddingStore):
    """The peer: the store before the fix, which rebuilt its sorted index after every inserted shard."""

    def put(self, keys: np.ndarray, vecs: np.ndarray) -> None:
        super().put(keys, vecs)
        self._reindex()


def fill(store_cls: type[EmbeddingStore], n: int, dim: int, shard: int, seed: int = 0) -> tuple[float, float]:
    """Seconds per text to insert ``n`` texts, and to look them all up once."""
    rng = np.random.default_rng(seed)
    base = Path(tempfile.mkdtemp(prefix="kalm-bench-cache-"))
    try:
        store = store_cls(DataRoot.from_uri(str(base)), "cache/embeddings/x", dim)
        store.refresh()
        keys = rng.integers(0, 256, size=(n, KEY_BYTES), dtype=np.uint8).view(f"S{KEY_BYTES}").ravel()
        t0 = time.perf_counter()
        for s in range(0, n, shard):
            k = keys[s : s + shard]
            store.put(k, rng.standard_normal((len(k), dim), dtype=np.float32))
        insert = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        _, found, _ = store.lookup(keys[: min(n, 20_000)])
        look = (time.perf_counter() - t0) / min(n, 20_000)
        assert found.all()
        return insert, look
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--shard", type=int, default=8192)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    print(
        "| texts | insert µs/text (now) | insert µs/text (re-sort per shard) | ratio | lookup µs/text (now) |"
    )
    print("|---:|---:|---:|---:|---:|")
    first = 0.0
    fill(EmbeddingStore, args.shard, args.dim, args.shard)  # warm-up: imports, the first Parquet write
    for n in sizes:
        now, look = fill(EmbeddingStore, n, args.dim, args.shard)
        old, _ = fill(ResortingStore, n, args.dim, args.shard)
        first = first or now
        print(
            f"| {n:,} | {now * 1e6:.1f} | {old * 1e6:.1f} | {old / now:.2f}x | {look * 1e6:.1f} |", flush=True
        )
    last, _ = fill(EmbeddingStore, sizes[-1], args.dim, args.shard)
    print(f"insert time per text, {sizes[-1]:,} vs {sizes[0]:,} texts (now): {last / first:.2f}x")


if __name__ == "__main__":
    main()
