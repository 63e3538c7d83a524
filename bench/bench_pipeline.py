"""The DAG's two orchestration goals, measured in one run (issue #7):

1. an unchanged rerun takes <= 10% of the first run (content-keyed caching end to end);
2. Prefect's own overhead is <= 5% of the wall time: the same DAG, same config, run once as a Prefect flow
   (tasks, futures, state tracking, logs and artifacts sent to a server) and once as plain function calls
   (:func:`kalm.pipeline.dag.run_retrain` on a ``LocalRunner``), each on a fresh data root.

    python bench/bench_pipeline.py                 # the demo pipeline (configs/pipeline_demo.yaml)
    python bench/bench_pipeline.py --steps 6       # shorter training, for a quick look

Order: prefect first run, plain first run, prefect rerun, plain rerun. The two first runs do identical work,
so their difference is Prefect's overhead plus noise (2 shared cores: repeat with --repeats to see it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pipeline_yaml(base: Path, steps: int | None) -> Path:
    import yaml

    from kalm.core.config import config_path

    cfg = yaml.safe_load(config_path("pipeline_demo.yaml").read_text())
    cfg["name"] = "bench"
    if steps:
        for stage in ("pretrain", "finetune"):
            cfg[stage].setdefault("overrides", {}).update(
                {"schedule.max_steps": steps, "schedule.checkpoint_every": steps}
            )
    out = base / "pipeline_bench.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def run(config: Path, root: Path, plain: bool) -> float:
    from kalm.orchestration.flows import retrain_flow
    from kalm.pipeline.config import load_pipeline
    from kalm.pipeline.dag import run_retrain
    from kalm.pipeline.runner import LocalRunner

    t0 = time.perf_counter()
    if plain:
        run_retrain(load_pipeline(config, str(root)), LocalRunner())
    else:
        retrain_flow(config=str(config), data_root=str(root))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="training steps per stage (default: config)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    firsts: dict[str, list[float]] = {"prefect": [], "plain": []}
    reruns: dict[str, list[float]] = {"prefect": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=180):
        base = Path(tmp)
        config = pipeline_yaml(base, args.steps)
        for rep in range(args.repeats):
            roots = {m: base / f"{m}-{rep}" for m in firsts}
            for mode in ("prefect", "plain"):
                firsts[mode].append(run(config, roots[mode], mode == "plain"))
                print(f"first run  {mode:>7}: {firsts[mode][-1]:8.1f} s", flush=True)
            for mode in ("prefect", "plain"):
                reruns[mode].append(run(config, roots[mode], mode == "plain"))
                print(f"rerun      {mode:>7}: {reruns[mode][-1]:8.1f} s", flush=True)
    fp, fq = statistics.median(firsts["prefect"]), statistics.median(firsts["plain"])
    rp = statistics.median(reruns["prefect"])
    print(f"RATIO unchanged rerun / first run (prefect): {rp / fp:.3f} (goal <= 0.10)")
    print(f"RATIO prefect overhead of the first run: {(fp - fq) / fp:+.3f} (goal <= 0.05; {fp - fq:+.1f} s)")
    rq = statistics.median(reruns["plain"])
    print(f"prefect overhead of the rerun: {rp - rq:+.1f} s ({rp:.1f} s vs {rq:.1f} s plain)")


if __name__ == "__main__":
    main()
