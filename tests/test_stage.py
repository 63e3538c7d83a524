"""Stage mixtures: cross-recipe dedup, decontamination against eval sets, and minimal recomputation."""

from __future__ import annotations

import json
from pathlib import Path

from kalm.core.layout import MANIFEST, mixture_dir, shard_dir
from kalm.core.storage import DataRoot, read_rows
from kalm.data.config import IngestConfig
from kalm.data.ingest import run_ingest_recipe
from kalm.data.mixtures import run_build_stage
from kalm.data.recipes import discover
from tests.conftest import faq_rows


def _ingest_all(folder: Path, root: DataRoot, cfg: IngestConfig) -> dict:
    recipes = discover([folder])
    mine = {n: r for n, r in recipes.items() if r.path.parent == folder}
    return {n: run_ingest_recipe(r, root, cfg) for n, r in mine.items()}


def test_cross_recipe_dedup_and_decontamination(recipe_dir, tmp_path: Path) -> None:
    a, b = faq_rows(30, "alpha"), faq_rows(30, "beta", seed=1)
    shared = a[:5]
    recipe_dir("r_a", a)
    folder = recipe_dir("r_b", b + shared)
    eval_file = tmp_path / "eval.jsonl"
    # an eval query that near-matches (one edit) a training query of r_b, and one exact answer match
    eval_file.write_text(
        json.dumps({"query": b[3]["question"].replace("how", "hoW")})
        + "\n"
        + json.dumps({"text": b[7]["answer"]})
        + "\n"
    )
    cfg = IngestConfig(decontamination={"eval_sets": [{"name": "ev", "path": str(eval_file)}]})
    root = DataRoot.from_uri(str(tmp_path / "data"))
    _ingest_all(folder, root, cfg)
    rep = {r.name: r for r in run_build_stage("finetune", ["r_a", "r_b"], root, cfg)}
    assert rep["r_a"].rows == 30
    assert rep["r_b"].manifest["drops"] == {"cross_recipe_dup": 5, "contaminated": 2}
    assert rep["r_b"].rows == 30 - 2
    kept = {r["query"] for r in read_rows(root, mixture_dir("finetune", "r_b")).to_pylist()}
    assert b[3]["question"] not in kept and b[7]["question"] not in kept and shared[0]["question"] not in kept


def test_rerun_one_recipe_recomputes_only_dependents(recipe_dir, tmp_path: Path) -> None:
    recipe_dir("r_a", faq_rows(20, "alpha"))
    recipe_dir("r_b", faq_rows(20, "beta", seed=1))
    folder = recipe_dir("r_c", faq_rows(20, "gamma", seed=2))
    cfg = IngestConfig()
    root = DataRoot.from_uri(str(tmp_path / "data"))
    _ingest_all(folder, root, cfg)
    names = ["r_a", "r_b", "r_c"]
    first = run_build_stage("finetune", names, root, cfg)
    assert not any(r.cached for r in first)

    def stamp(rel: str) -> float:
        return Path(root.path(rel, MANIFEST)).stat().st_mtime_ns

    before = {n: (stamp(shard_dir("finetune", n)), stamp(mixture_dir("finetune", n))) for n in names}
    # r_b changes: two new rows, one of them an exact copy of an r_c row
    extra = faq_rows(20, "gamma", seed=2)[0]
    src = folder / "raw" / "r_b" / "part-0.jsonl"
    src.write_text(
        src.read_text()
        + json.dumps({"question": "a new question for beta?", "answer": "new answer text"})
        + "\n"
        + json.dumps(extra)
        + "\n"
    )
    res = _ingest_all(folder, root, cfg)
    assert res["r_b"].cached is False and res["r_a"].cached and res["r_c"].cached
    second = {r.name: r for r in run_build_stage("finetune", names, root, cfg)}
    built = {n for n, r in second.items() if not r.cached}
    assert built == {"r_b", "r_c"}  # r_c depends on r_b: it now loses a row owned by r_b
    assert second["r_c"].manifest["drops"] == {"cross_recipe_dup": 1}
    after = {n: (stamp(shard_dir("finetune", n)), stamp(mixture_dir("finetune", n))) for n in names}
    assert after["r_a"] == before["r_a"] and after["r_c"][0] == before["r_c"][0]
    # and an unchanged rerun touches nothing
    third = run_build_stage("finetune", names, root, cfg)
    assert all(r.cached for r in third)
