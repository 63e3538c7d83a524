"""Benchmark of mining's host memory (issue #13): peak anonymous RSS of one ``run_mine_recipe`` over a pool of
N and of 2N texts, for mining as it is (pool vectors in a local memmap, searched in ``search.block_mb``
blocks) and, as the peer in the same run, mining as it was before (commit ``PEER``: the pool's vectors held
in memory twice plus FAISS's copy), each in a fresh process.

The encoder is all-MiniLM-L6-v2 (384 dims, fp32), but nothing is encoded: the embedding cache is filled up
front with random unit vectors under the model's key, so both sides measure lookup, search and sampling
only. Rows: a query, one positive and their share of the pool as negatives (the pool: all of those).
Anonymous RSS (RssAnon, sampled every 2 ms) is what a machine must hold; the memmap's pages are file-backed
and evictable, so VmHWM (which counts them) is printed beside it.

    .venv/bin/python bench/bench_mine_memory.py --pool 300000 --queries 3000
    .venv/bin/python bench/bench_mine_memory.py --pool-source corpus --peer ec0c4fc

``--pool-source corpus``: the rows have one positive each and no negatives, and the pool is a JSONL corpus
file (``pool.source: corpus``) of the other texts, as large pools are mined (the recipe's rows then hold
only their own texts). ``--peer``: the commit to compare with (default ``01d0878``; ``ec0c4fc`` is the
last commit that held the pool's texts as Python strings).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEER = "01d0878"  # the last commit that held the pool's vectors in memory (--peer)


def write_data(base: Path, pool: int, queries: int, source: str = "recipe") -> None:
    """A mixture of ``queries`` rows, each with one positive and ``pool / queries - 1`` negatives (the
    pool: all of them), and the embedding cache filled for every text the miner will look up."""
    import numpy as np

    from kalm.core.hashing import hash_obj
    from kalm.core.layout import MANIFEST, embedding_cache_dir, mixture_dir
    from kalm.core.schema import row_id, rows_to_table
    from kalm.core.storage import DataRoot
    from kalm.mining.cache import KEY_BYTES, EmbeddingStore, text_key
    from kalm.mining.encode import load_encoder

    enc = load_encoder("minilm", None, precision="fp32")
    rng = np.random.default_rng(0)
    per_row = max(1, pool // queries)  # texts per row: 1 positive + the rest negatives
    rows: list[dict[str, Any]] = []
    all_texts: list[str] = []
    for i in range(queries):
        texts = [f"document {i}-{j} " + " ".join(map(str, rng.integers(0, 10**6, 8))) for j in range(per_row)]
        all_texts += texts
        rows.append(
            {
                "id": row_id(f"r{i}", texts[0]),
                "query": f"query {i} " + " ".join(map(str, rng.integers(0, 10**6, 4))),
                "pos": texts[:1],
                "neg": texts[1:] if source == "recipe" else [],
                "instruction": "",
                "symmetric": False,
                "category": "bench",
                "task_type": "retrieval",
                "recipe": "bench",
                "stage": "finetune",
                "lang": "en",
                "neg_labels": [],
                "label": "",
            }
        )
    root = DataRoot.from_uri(str(base))
    rel = mixture_dir("finetune", "bench")
    root.write_parquet(f"{rel}/part-00000.parquet", rows_to_table(rows))
    root.write_json(
        f"{rel}/{MANIFEST}",
        {
            "recipe": "bench",
            "stage": "finetune",
            "rows_in": len(rows),
            "rows_out": len(rows),
            "drops": {},
            "files": [{"name": "part-00000.parquet", "rows": len(rows)}],
            "input_fingerprint": hash_obj([r["id"] for r in rows]),
            "schema_version": 1,
        },
    )
    texts = [t for r in rows for t in r["pos"] + r["neg"]]
    pos_at = np.arange(0, len(texts), per_row)
    if source == "corpus":  # the negatives become the corpus file; the pool: corpus, then the positives
        positives = {r["pos"][0] for r in rows}
        corpus = [t for t in all_texts if t not in positives]
        root.write_bytes("corpus.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in corpus).encode())
        texts = corpus + [r["pos"][0] for r in rows]
        pos_at = len(corpus) + np.arange(len(rows))
    texts += [enc.format_query(r["query"], r["instruction"]) for r in rows]
    vecs = rng.standard_normal((len(texts), enc.dim)).astype(np.float32)
    q_at = len(texts) - len(rows)
    vecs[pos_at] = vecs[q_at:] + 0.3 * vecs[pos_at]  # each positive near its query
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store = EmbeddingStore(root, embedding_cache_dir(enc.key), enc.dim)
    for s in range(0, len(texts), 8192):
        keys = np.array([text_key(t) for t in texts[s : s + 8192]], dtype=f"S{KEY_BYTES}")
        store.put(keys, vecs[s : s + 8192])


class AnonPeak:
    """Peak RssAnon of this process, sampled in a thread."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]))
            time.sleep(0.002)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return round(self.peak / 1024, 1)


def child(args: argparse.Namespace) -> None:
    if args.which != "ours":
        sys.path.insert(0, args.which)  # the peer's tree before this checkout's
    import kalm
    from kalm.core.storage import DataRoot
    from kalm.data.slots import peak_rss_mb
    from kalm.mining.config import MineConfig
    from kalm.mining.encode import load_encoder
    from kalm.mining.mine import run_mine_recipe

    enc = load_encoder("minilm", None, precision="fp32")
    extra: dict[str, Any] = {"search": {"block_mb": args.block_mb}}
    if args.pool_source == "corpus":
        extra["pool"] = {"source": "corpus", "corpus": "corpus.jsonl"}
    try:
        cfg = MineConfig.model_validate({"precision": "fp32", **extra})
    except ValueError:  # a peer from before search blocks (01d0878)
        extra.pop("search")
        cfg = MineConfig.model_validate({"precision": "fp32", **extra})
    root = DataRoot.from_uri(args.root)
    meter = AnonPeak()
    t0 = time.perf_counter()
    res = run_mine_recipe(root, "finetune", "bench", "minilm", cfg, True, encoder=enc)
    took = time.perf_counter() - t0
    anon = meter.stop()
    m = res.manifest
    out = {
        "anon_mb": anon,
        "hwm_mb": peak_rss_mb(),
        "seconds": round(took, 1),
        "rows_out": m["rows_out"],
        "pool": m["pool"]["size"],
        "encoded": m["encode"]["encoded"],
        "index": m["index"],
        "kalm": str(Path(kalm.__file__).parent),
    }
    print(json.dumps(out))


def peer_tree(tmp: Path, commit: str) -> Path:
    """The ``kalm`` package of ``commit``, extracted to ``tmp/peer``."""
    dest = tmp / "peer"
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "kalm", "configs"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=int, default=300_000, help="pool texts of the smaller run (N)")
    ap.add_argument("--queries", type=int, default=3000)
    ap.add_argument("--block-mb", type=float, default=32.0)
    ap.add_argument("--pool-source", choices=("recipe", "corpus"), default="recipe")
    ap.add_argument("--peer", default=PEER, help="the commit to compare with")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--which", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="kalm-bench-mine-mem-"))
    try:
        peer = peer_tree(tmp, args.peer)
        results: dict[str, dict] = {}
        for n in (args.pool, 2 * args.pool):
            t0 = time.perf_counter()
            write_data(tmp / f"p{n}", n, args.queries, args.pool_source)
            print(
                f"# pool of {n} texts, {args.queries} queries: cache filled in "
                f"{time.perf_counter() - t0:.0f} s"
            )
            for which in ("ours", "peer"):
                cmd = [sys.executable, __file__, "--child", "--root", str(tmp / f"p{n}")]
                cmd += ["--which", "ours" if which == "ours" else str(peer), "--block-mb", str(args.block_mb)]
                cmd += ["--pool-source", args.pool_source]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
                if proc.returncode:
                    sys.exit(f"{which} at pool {n} failed:\n{proc.stderr[-3000:]}")
                results[f"{which} {n}"] = r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{which:4s} pool {n:8d}: {json.dumps(r)}", flush=True)
        n1, n2 = args.pool, 2 * args.pool
        vec_mb = n2 * 384 * 4 / 2**20
        for which in ("ours", "peer"):
            a, b = results[f"{which} {n2}"], results[f"{which} {n1}"]
            print(
                f"{which}: peak anonymous RSS at pool {n2} / {n1}: "
                f"{a['anon_mb']:.0f} / {b['anon_mb']:.0f} MB "
                f"(+{a['anon_mb'] - b['anon_mb']:.0f} MB for {vec_mb / 2:.0f} MB more vectors); "
                f"time {a['seconds']:.1f} / {b['seconds']:.1f} s"
            )
        o, p = results[f"ours {n2}"], results[f"peer {n2}"]
        same = o["rows_out"] == p["rows_out"]
        print(
            f"ours vs peer at pool {n2}: {o['anon_mb'] / p['anon_mb']:.2f}x peak anonymous RSS, "
            f"{o['seconds'] / p['seconds']:.2f}x time; rows out {o['rows_out']} vs {p['rows_out']}"
            f"{'' if same else ' (DIFFER)'}; the pool's vectors: {vec_mb:.0f} MB"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
