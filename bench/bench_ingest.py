"""Benchmark of the data stage (issue #2): ingest -> dedup -> shards on a generated source, and near-dup
speed against datasketch's MinHashLSH (and rensa, if installed) on the same rows, in the same run.

    .venv/bin/python bench/bench_ingest.py --rows 1000000 --sizes 250000,1000000 --peer-rows 30000

Prints rows/s and peak RSS per size (each in a fresh subprocess), then the near-dup ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "river",
    "mountain",
    "lantern",
    "copper",
    "violet",
    "harbor",
    "meadow",
    "quartz",
    "falcon",
    "orchard",
    "tundra",
    "saffron",
    "glacier",
    "ember",
    "willow",
    "canyon",
    "marble",
    "thistle",
    "cobalt",
    "prairie",
    "beacon",
    "cedar",
    "delta",
    "fjord",
    "garnet",
    "hazel",
    "indigo",
    "juniper",
    "kelp",
    "lagoon",
    "mesa",
    "nectar",
    "onyx",
    "pebble",
    "quill",
    "reef",
    "sable",
    "timber",
    "umber",
    "vale",
    "wharf",
    "yarrow",
    "zephyr",
]


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """~5% exact duplicates (case/space changes), ~5% near duplicates (two edits), the rest distinct."""
    rng = random.Random(seed)
    kept: list[tuple[str, str]] = []
    with path.open("w") as f:
        for i in range(rows):
            r = rng.random()
            if kept and r < 0.05:
                q, a = rng.choice(kept)
                rec = {"question": "  " + q.upper(), "answer": a}
            elif kept and r < 0.10:
                q, a = rng.choice(kept)
                j = rng.randrange(20, len(a) - 20)
                rec = {"question": q, "answer": a[:j] + "#" + a[j + 1 : j + 9] + "%" + a[j + 10 :]}
            else:
                q = f"q{i} " + " ".join(rng.choices(WORDS, k=8)) + "?"
                a = " ".join(rng.choices(WORDS, k=40)) + f" ({i})"
                rec = {"question": q, "answer": a}
                if len(kept) < 50_000:
                    kept.append((q, a))
            f.write(json.dumps(rec) + "\n")


RECIPE = """name: bench
category: bench
stage: pretrain
task_type: retrieval
source: {format: jsonl, path: "src.jsonl"}
fields: {query: question, pos: answer}
"""


def run_one(workdir: Path) -> None:
    """Child process: ingest the recipe in ``workdir``; print JSON with timing and peak RSS."""
    from kalm.core.storage import DataRoot
    from kalm.data.config import IngestConfig
    from kalm.data.ingest import run_ingest_recipe
    from kalm.data.recipes import load_recipe_file

    lr = load_recipe_file(workdir / "bench.yaml")
    t = time.perf_counter()
    m = run_ingest_recipe(lr, DataRoot.from_uri(str(workdir / "data")), IngestConfig(), force=True).manifest
    dt = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "rows_in": m["rows_in"],
                "rows_out": m["rows_out"],
                "drops": m["drops"],
                "seconds": dt,
                "peak_mb": peak_mb,
            }
        )
    )


def near_dup_peers(src: Path, n: int) -> dict[str, float]:
    """Near-dup throughput on the same first ``n`` rows: ours vs datasketch (vs rensa if installed)."""
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    from kalm.data import minhash
    from kalm.data.normalize import normalize_text

    texts = []
    with src.open() as f:
        for _, line in zip(range(n), f, strict=False):
            r = json.loads(line)
            texts.append(normalize_text(r["question"]) + " \x1f " + normalize_text(r["answer"]))
    out: dict[str, float] = {}
    p = minhash.MinHashParams()
    t = time.perf_counter()
    sig = minhash.signatures(texts, p)
    labels = minhash.duplicate_clusters(minhash.band_hashes(sig, *p.lsh_shape()), sig, p.threshold)
    ours_dups = int((~minhash.first_of_clusters(labels)).sum())
    out["ours_rows_per_s"] = n / (time.perf_counter() - t)

    t = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    ds_dups = 0
    for i, text in enumerate(texts):
        m = MinHash(num_perm=128)
        m.update_batch([text[j : j + 5].encode() for j in range(max(1, len(text) - 4))])
        if lsh.query(m):
            ds_dups += 1
        else:
            lsh.insert(str(i), m)
    out["datasketch_rows_per_s"] = n / (time.perf_counter() - t)
    out["ours_near_dups"], out["datasketch_near_dups"] = ours_dups, ds_dups
    try:
        from rensa import RMinHash, RMinHashLSH

        t = time.perf_counter()
        rl = RMinHashLSH(threshold=0.8, num_perm=128, num_bands=16)
        r_dups = 0
        for i, text in enumerate(texts):
            rm = RMinHash(num_perm=128, seed=1)
            rm.update([text[j : j + 5] for j in range(max(1, len(text) - 4))])
            if rl.query(rm):
                r_dups += 1
            else:
                rl.insert(i, rm)
        out["rensa_rows_per_s"] = n / (time.perf_counter() - t)
        out["rensa_near_dups"] = r_dups
    except ImportError:
        pass
    del np
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the largest generated source")
    ap.add_argument("--sizes", default="250000,1000000", help="comma-separated source sizes to ingest")
    ap.add_argument("--peer-rows", type=int, default=30_000, help="rows for the datasketch comparison")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_one(Path(args.child))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="kalm-bench-") as tmp:
        for size in sizes:
            work = Path(tmp) / f"n{size}"
            work.mkdir()
            (work / "bench.yaml").write_text(RECIPE)
            t = time.perf_counter()
            generate(work / "src.jsonl", size)
            gen_s = time.perf_counter() - t
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(work)], capture_output=True, text=True, check=True
            )
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["size"] = size
            r["rows_per_s"] = r["rows_in"] / r["seconds"]
            results.append(r)
            print(
                f"ingest {size:>9,} rows: {r['rows_per_s']:>9,.0f} rows/s  "
                f"peak RSS {r['peak_mb']:>7,.0f} MB  "
                f"out {r['rows_out']:,}  drops {r['drops']}  (generation {gen_s:.0f} s)",
                flush=True,
            )
        peers = near_dup_peers(Path(tmp) / f"n{sizes[0]}" / "src.jsonl", args.peer_rows)
    print(
        f"near-dup on the same {args.peer_rows:,} rows: ours {peers['ours_rows_per_s']:,.0f} rows/s "
        f"({peers['ours_near_dups']} dups), "
        f"datasketch MinHashLSH {peers['datasketch_rows_per_s']:,.0f} rows/s "
        f"({peers['datasketch_near_dups']} dups)"
    )
    print(f"RATIO ours/datasketch near-dup: {peers['ours_rows_per_s'] / peers['datasketch_rows_per_s']:.1f}x")
    if "rensa_rows_per_s" in peers:
        print(
            f"RATIO ours/rensa near-dup: {peers['ours_rows_per_s'] / peers['rensa_rows_per_s']:.1f}x "
            f"(rensa {peers['rensa_rows_per_s']:,.0f} rows/s, {peers['rensa_near_dups']} dups)"
        )
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(
            f"memory: {a['peak_mb']:.0f} MB at {a['size']:,} rows -> "
            f"{b['peak_mb']:.0f} MB at {b['size']:,} rows "
            f"({(b['peak_mb'] - a['peak_mb']) * 1024 / max(1, b['size'] - a['size']):.2f} KB per extra row)"
        )


if __name__ == "__main__":
    main()
