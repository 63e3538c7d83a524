"""Contract test over every discovered recipe: it loads, has 5-20 sample lines, and its samples produce
canonical rows with the declared schema (STYLE.md #2). A new recipe without samples fails here."""

from __future__ import annotations

import pyarrow as pa
import pytest

from kalm.core.schema import ROW_SCHEMA
from kalm.data.check import check_recipe
from kalm.data.config import load_ingest_config
from kalm.data.recipes import discover

RECIPES = discover()


def test_no_recipe_file_is_broken() -> None:
    """A recipe file that does not load is left out of discovery (and reported); here it fails CI."""
    assert RECIPES.broken == {}


def test_some_recipes_exist() -> None:
    stages = {(r.recipe.stage, r.recipe.task_type) for r in RECIPES.values() if "demo" in r.recipe.tags}
    assert sum(s == "pretrain" for s, _ in stages) >= 1 and ("finetune", "classification") in stages
    demo = [r for r in RECIPES.values() if "demo" in r.recipe.tags]
    assert sum(r.recipe.stage == "pretrain" for r in demo) >= 2
    assert sum(r.recipe.stage == "finetune" for r in demo) >= 2


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_contract(name: str) -> None:
    lr = RECIPES[name]
    sample = lr.sample_path()
    assert sample.exists(), f"{name}: commit 5-20 real sample lines at {sample}"
    files = (
        [sample]
        if sample.is_file()
        else [
            p
            for p in sample.rglob("*")
            if p.is_file() and p.suffix in (".jsonl", ".csv", ".parquet", ".json")
        ]
    )
    n_lines = 0
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            n_lines += pq.read_metadata(f).num_rows
        else:
            n_lines += sum(1 for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
            n_lines -= 1 if f.suffix == ".csv" else 0  # header
    assert 5 <= n_lines <= 20, f"{name}: {n_lines} sample lines (want 5-20)"
    rows, res = check_recipe(lr, load_ingest_config())
    manifest = res.manifest
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    assert table.schema.equals(ROW_SCHEMA)
    assert len(rows) >= 2
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["query"] and r["pos"] and all(p for p in r["pos"])
        assert r["recipe"] == name and r["stage"] == lr.recipe.stage
        assert r["category"] == lr.recipe.category and r["task_type"] == lr.recipe.task_type
        assert not set(r["neg"]) & set(r["pos"])
    if lr.recipe.label_based:
        assert all(r["neg"] for r in rows), "label-based recipes produce negatives of other labels"
    assert manifest["rows_in"] >= manifest["rows_out"]
