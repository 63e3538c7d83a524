"""Benchmark of the training sampler's memory (issue #13): peak RSS with 120 sources vs 4 sources of the
same total rows, each in a fresh process, for the streaming sampler as it is and, as the peer, the sampler
as it was (one whole shard per source held as Python rows; taken from git, commit ``PEER``), in the same run.

Rows look like fine-tuning rows: a 60-character query, a 300-character positive, 7 negatives of 300
characters; shards of at most 50,000 rows (configs/ingest.yaml's ``shard_rows``) in row groups of
``ROW_GROUP_ROWS``, as the data stage writes them. Every process draws the same number of batches.

    .venv/bin/python bench/bench_sampler.py --rows 240000 --steps 1500
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEER = "f834595"  # the last commit with the whole-shard sampler
SHARD_ROWS = 50_000


def write_data(base: Path, sources: int, rows: int) -> list[dict]:
    """``sources`` recipes of ``rows // sources`` rows each; returns their (name, files, rows)."""
    import numpy as np
    import pyarrow.parquet as pq

    from kalm.core.schema import row_id, rows_to_table
    from kalm.core.storage import ROW_GROUP_ROWS

    rng = np.random.default_rng(0)
    words = np.array(["".join(rng.choice(list("abcdefghij"), 6)) for _ in range(2000)])

    def text(n_words: int, k: int) -> list[str]:
        return [" ".join(w) for w in words[rng.integers(0, len(words), (k, n_words))]]

    per = rows // sources
    out = []
    for s in range(sources):
        name = f"src{s:03d}"
        files = []
        for f, start in enumerate(range(0, per, SHARD_ROWS)):
            n = min(SHARD_ROWS, per - start)
            q, p, negs = text(9, n), text(43, n), text(43, n * 7)
            table = rows_to_table(
                [
                    {
                        "id": row_id(f"{name}{start + i}", p[i]),
                        "query": q[i],
                        "pos": [p[i]],
                        "neg": negs[i * 7 : (i + 1) * 7],
                        "instruction": "Retrieve the passage",
                        "symmetric": False,
                        "category": name,
                        "task_type": "retrieval",
                        "recipe": name,
                        "stage": "finetune",
                        "lang": "en",
                        "neg_labels": [],
                        "label": "",
                    }
                    for i in range(n)
                ]
            )
            path = base / name / f"part-{f:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS)
            files.append(str(path))
        out.append({"name": name, "files": files, "rows": per})
    return out


def peer_module(tmp: Path):  # type: ignore[no-untyped-def]
    """The sampler module of commit PEER, imported from a temporary file."""
    code = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{PEER}:kalm/training/sampler.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = tmp / "old_sampler.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("old_sampler", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_sampler"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def child(args: argparse.Namespace) -> None:
    """One measurement: build the sampler over the sources in ``args.spec`` and draw ``args.steps``."""
    spec = json.loads(Path(args.spec).read_text())
    if args.which == "peer":
        mod = peer_module(Path(args.spec).parent)
    else:
        import kalm.training.sampler as mod
    sources = [mod.ShardSource(s["name"], s["files"], s["rows"], float(s["rows"])) for s in spec]
    from kalm.data.slots import peak_rss_mb  # VmHWM: this process's own (ru_maxrss survives exec)

    base_rss = peak_rss_mb()
    sampler = mod.HomogeneousSampler(sources, per_device=32, world=2, rank=0, group_size=8, seed=0)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        sampler.next_batch()
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    print(
        json.dumps(
            {
                "rss_mb": round(peak, 1),
                "rss_before_mb": round(base_rss, 1),
                "ms_per_step": round(1000 * dt / args.steps, 2),
                "buffer_mb": round(getattr(sampler, "peak_buffer_bytes", 0) / 2**20, 1),
                "window_reads": getattr(sampler, "reads", None),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=240_000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--which", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="kalm-bench-sampler-"))
    try:
        results: dict[str, dict] = {}
        for n in (4, 120):
            t0 = time.perf_counter()
            spec = write_data(tmp / f"s{n}", n, args.rows)
            (tmp / f"s{n}.json").write_text(json.dumps(spec))
            took = time.perf_counter() - t0
            print(f"# {n} sources x {args.rows // n} rows written in {took:.0f} s", flush=True)
        for which in ("ours", "peer"):
            for n in (4, 120):
                cmd = [sys.executable, __file__, "--child", "--which", which, "--steps", str(args.steps)]
                cmd += ["--spec", str(tmp / f"s{n}.json")]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results[f"{which} {n}"] = json.loads(out.strip().splitlines()[-1])
                print(f"{which:5s} {n:3d} sources: {results[f'{which} {n}']}", flush=True)
        for which in ("ours", "peer"):
            a, b = results[f"{which} 120"], results[f"{which} 4"]
            print(
                f"{which}: peak RSS 120 vs 4 sources {a['rss_mb']:.0f} / {b['rss_mb']:.0f} MB = "
                f"{a['rss_mb'] / b['rss_mb']:.2f}x (goal <= 1.3x for ours)"
            )
        ours, peer = results["ours 120"], results["peer 120"]
        print(
            f"ours vs peer at 120 sources: {ours['rss_mb'] / peer['rss_mb']:.2f}x RSS, "
            f"{ours['ms_per_step'] / peer['ms_per_step']:.2f}x time per step"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
