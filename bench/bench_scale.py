"""Benchmark of the partitioned data stage (issue #12): rows/s per core on a generated recipe with planted
exact (~5%) and near (~5%) duplicates, with 1 and 2 workers, local processes and Ray, against the
single-process engine it replaces (as it is now, ``single``, and as it was when issue #12 was filed,
``issueday``: commit ``ISSUE_DAY``, taken from git) and datatrove's MinHash dedup (LocalPipelineExecutor,
same LSH shape: 9 bands x 13 rows, seed 1), every system on the same files in the same run; precision and
recall on the planted duplicates; peak RSS per worker at several sizes.

    .venv/bin/python bench/bench_scale.py --rows 2000000 --rss-sizes 500000,2000000,8000000

Every measurement runs in a fresh subprocess. Shingles differ where the peers differ: ours are character
5-grams of the comparison form, datatrove's word 5-grams of its normalised text (its only option).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import WORDS  # noqa: E402

# The last commit before issue #12's work: the one-process engine the issue measured ("today's" engine:
# ~40 us a row, per-row Python); its single-process engine has since shared the vectorised MinHash and
# normalisation, so `single` alone would move the goalpost.
ISSUE_DAY = "c546b2b"
REPO = Path(__file__).resolve().parents[1]

RECIPE = """name: bench
category: bench
stage: pretrain
task_type: retrieval
source: {format: jsonl, path: "src/*.jsonl"}
fields: {query: question, pos: answer}
"""


def generate(folder: Path, rows: int, files: int, seed: int = 0) -> dict[str, Any]:
    """``files`` JSONL files; returns the ids (kalm's row_id) of originals and planted near copies, and the
    number of planted exact copies (case and space changes of an original)."""
    from kalm.core.schema import row_id
    from kalm.data.normalize import normalize_text

    rng = random.Random(seed)
    kept: list[tuple[str, str]] = []
    originals, near, exact = [], [], 0
    src = folder / "src"
    src.mkdir(parents=True)
    outs = [(src / f"part-{i:02d}.jsonl").open("w") for i in range(files)]
    per = -(-rows // files)
    for i in range(rows):
        r = rng.random()
        if kept and r < 0.05:
            q, a = rng.choice(kept)
            rec = {"question": "  " + q.upper(), "answer": a}
            exact += 1
        elif kept and r < 0.10:
            q, a = rng.choice(kept)
            j = rng.randrange(20, len(a) - 20)
            rec = {"question": q, "answer": a[:j] + "#" + a[j + 1 : j + 9] + "%" + a[j + 10 :]}
            near.append(row_id(normalize_text(q), normalize_text(rec["answer"])))
        else:
            q = f"q{i} " + " ".join(rng.choices(WORDS, k=8)) + "?"
            a = " ".join(rng.choices(WORDS, k=40)) + f" ({i})"
            rec = {"question": q, "answer": a}
            originals.append(row_id(normalize_text(q), normalize_text(a)))
            if len(kept) < 50_000:
                kept.append((q, a))
        outs[i // per].write(json.dumps(rec) + "\n")
    for f in outs:
        f.close()
    (folder / "bench.yaml").write_text(RECIPE)
    return {"originals": originals, "near": near, "exact": exact, "rows": rows}


def _rss_mb() -> dict[str, float]:
    return {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def old_tree(base: Path) -> Path:
    """The ``kalm`` package of commit ISSUE_DAY, extracted under ``base`` (git archive)."""
    out = base / f"kalm-{ISSUE_DAY}"
    out.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ISSUE_DAY, "kalm"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def child(system: str, workers: int, folder: Path, out: Path) -> dict[str, Any]:
    """One measurement; returns seconds, output ids and peak RSS (run in its own process)."""
    if system == "issueday":  # this process imports the old package: nothing of ours is loaded yet
        sys.path.insert(0, str(folder.parent / f"kalm-{ISSUE_DAY}"))
        system = "single"
    t0 = time.perf_counter()
    if system == "datatrove":
        ids = _datatrove(folder, out, workers)
    else:
        from kalm.core.layout import mixture_dir, shard_dir
        from kalm.core.storage import DataRoot, read_rows
        from kalm.data.config import IngestConfig
        from kalm.data.recipes import load_recipe_file

        lr = load_recipe_file(folder / "bench.yaml")
        root = DataRoot.from_uri(str(out))
        cfg = IngestConfig()
        cfg = cfg.model_copy(
            update={"decontamination": cfg.decontamination.model_copy(update={"eval_config": None})}
        )
        if system == "single":
            from kalm.data.ingest import run_ingest_recipe

            run_ingest_recipe(lr, root, cfg, force=True)
            rel = shard_dir("pretrain", "bench")
        else:
            from kalm.data.distributed import run_stage_distributed
            from kalm.data.executors import LocalExecutor, RayExecutor

            ex = RayExecutor(workers) if system == "ray" else LocalExecutor(workers)
            with ex:
                run_stage_distributed("pretrain", [lr], root, cfg, ex)
            rel = mixture_dir("pretrain", "bench")
        secs = time.perf_counter() - t0
        ids = read_rows(root, rel, ["id"]).column("id").to_pylist()
        rss = _rss_mb()
        if system != "single":  # each unit's own peak, as its marker recorded it, and the driver's
            peaks = root.read_json("mixtures/pretrain/_manifest.json")["dedup"]["peak_rss_mb"]
            rss = {"self": peaks.pop("driver"), "children": max(peaks.values()), "phases": peaks}
        return {"seconds": secs, "ids": ids, "rss_mb": rss}
    return {"seconds": time.perf_counter() - t0, "ids": ids, "rss_mb": _rss_mb()}


def _datatrove(folder: Path, out: Path, workers: int) -> list[str]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from kalm.core.schema import row_id
    from kalm.data.normalize import normalize_text

    _xxhash_accepts_str()
    cfg = MinhashConfig(n_grams=5, num_buckets=9, hashes_per_bucket=13, seed=1)

    def adapter(self: Any, data: dict, path: str, id_in_file: int | str) -> dict:
        return {
            "text": data["question"] + "\x1f" + data["answer"],
            "id": f"{path}/{id_in_file}",
            "metadata": {},
        }

    def reader() -> JsonlReader:
        return JsonlReader(str(folder / "src"), adapter=adapter, glob_pattern="*.jsonl")

    tasks = len(list((folder / "src").glob("*.jsonl")))
    logs = out / "logs"
    stages = [
        [reader(), MinhashDedupSignature(str(out / "sigs"), config=cfg)],
        [MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=cfg)],
        [MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=cfg)],
        [reader(), MinhashDedupFilter(str(out / "remove")), JsonlWriter(str(out / "kept"), compression=None)],
    ]
    ntasks = [tasks, cfg.num_buckets, 1, tasks]
    for i, (pipe, n) in enumerate(zip(stages, ntasks, strict=True)):
        # fork: the workers inherit the xxhash shim (forkserver workers would re-import the module)
        LocalPipelineExecutor(
            pipe, tasks=n, workers=workers, logging_dir=str(logs / str(i)), start_method="fork"
        ).run()
    ids = []
    for f in sorted((out / "kept").glob("*.jsonl")):
        for line in f.open():
            q, a = json.loads(line)["text"].split("\x1f", 1)
            ids.append(row_id(normalize_text(q), normalize_text(a)))
    return ids


def _xxhash_accepts_str() -> None:
    """datatrove 0.10.1 hashes ``str`` shingles; xxhash 4 accepts only bytes (TypeError). Encode first:
    the same hashes datatrove gets with the xxhash it was written for (UTF-8)."""
    import xxhash

    for name in ("xxh64_intdigest", "xxh32_intdigest"):
        orig = getattr(xxhash, name)

        def wrapped(data: Any, seed: int = 0, _orig: Any = orig) -> int:
            return int(_orig(data.encode("utf-8") if isinstance(data, str) else data, seed))

        setattr(xxhash, name, wrapped)


def quality(ids: list[str], truth: dict[str, Any]) -> dict[str, float]:
    out = set(ids)
    near_found = sum(1 for i in truth["near"] if i not in out)
    lost = sum(1 for i in truth["originals"] if i not in out)
    dropped = truth["rows"] - len(ids)
    correct = truth["exact"] + near_found - max(0, len(ids) - len(out))  # duplicate ids left in = misses
    planted = truth["exact"] + len(truth["near"])
    return {
        "recall": round(correct / planted, 4),
        "precision": round(correct / dropped, 4) if dropped else 1.0,
        "near_recall": round(near_found / max(1, len(truth["near"])), 4),
        "originals_lost": lost,
    }


def measure(system: str, workers: int, folder: Path) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix=f"kalm-bench-{system}-"))
    try:
        res = subprocess.run(
            [sys.executable, __file__, "--child", system, str(workers), str(folder), str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise SystemExit(f"{system} x{workers} failed:\n{res.stderr[-3000:]}")
        return json.loads((out / "result.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument(
        "--systems", default="issueday:1,single:1,local:1,local:2,ray:1,ray:2,datatrove:1,datatrove:2"
    )
    ap.add_argument("--rss-sizes", default="")
    ap.add_argument("--rss-file-rows", type=int, default=125_000)  # ~40 MB of JSONL: one partition
    ap.add_argument("--child", nargs=4, metavar=("SYSTEM", "WORKERS", "FOLDER", "OUT"))
    args = ap.parse_args()
    if args.child:
        system, workers, folder, out = args.child
        res = child(system, int(workers), Path(folder), Path(out))
        import kalm  # which package the measurement ran (the issue-day peer runs the old one)

        res["code"] = str(Path(kalm.__file__).parent)
        (Path(out) / "result.json").write_text(json.dumps(res))
        return
    base = Path(tempfile.mkdtemp(prefix="kalm-bench-scale-"))
    try:
        folder = base / f"r{args.rows}"
        t = time.perf_counter()
        truth = generate(folder, args.rows, args.files)
        if "issueday" in args.systems:
            old_tree(base)
        print(
            f"generated {args.rows:,} rows in {args.files} files ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
        print(
            "| system | workers | seconds | rows/s | rows/s per core | recall | precision | near recall | "
            "originals lost | peak RSS MB (driver / largest unit) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        rates = {}
        for spec in args.systems.split(","):
            system, w = spec.split(":")
            res = measure(system, int(w), folder)
            if system == "issueday":
                assert ISSUE_DAY in res["code"], res["code"]
            q = quality(res["ids"], truth)
            rate = args.rows / res["seconds"]
            rates[(system, int(w))] = rate / int(w)
            rss = res["rss_mb"]
            print(
                f"| {system} | {w} | {res['seconds']:.1f} | {rate:,.0f} | {rate / int(w):,.0f} | "
                f"{q['recall']} | "
                f"{q['precision']} | {q['near_recall']} | {q['originals_lost']} | "
                f"{rss['self']:.0f} / {rss['children']:.0f} |",
                flush=True,
            )
        one = rates.get(("local", 1))
        if one and ("issueday", 1) in rates:
            ratio = one / rates[("issueday", 1)]
            print(f"per-core ratio, partitioned local x1 / the issue-day engine ({ISSUE_DAY}): {ratio:.2f}")
        if one and ("single", 1) in rates:
            ratio = one / rates[("single", 1)]
            print(f"per-core ratio, partitioned local x1 / single-process engine: {ratio:.2f}")
        if one and ("datatrove", 1) in rates:
            print(f"per-core ratio, partitioned local x1 / datatrove x1: {one / rates[('datatrove', 1)]:.2f}")
        shutil.rmtree(folder, ignore_errors=True)
        # the same files (rows per file fixed: one full partition each) in growing numbers: what grows with
        # the stage must be the number of units, not a unit's memory
        for n in [int(x) for x in args.rss_sizes.split(",") if x]:
            folder = base / f"rss{n}"
            generate(folder, n, max(1, n // args.rss_file_rows))
            res = measure("local", 2, folder)
            phases = ", ".join(f"{k} {v:.0f}" for k, v in res["rss_mb"]["phases"].items())
            print(
                f"RSS at {n:,} rows ({max(1, n // args.rss_file_rows)} files), local x2: driver "
                f"{res['rss_mb']['self']:.0f} MB, largest unit {res['rss_mb']['children']:.0f} MB "
                f"(per phase: {phases}; {n / res['seconds']:,.0f} rows/s)",
                flush=True,
            )
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
