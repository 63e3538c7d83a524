"""Prefect tasks of the mining stage: thin wrappers, retried on transient I/O only."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from kalm.storage import DataRoot
from mining.config import load_mine_config
from mining.mine import run_mine_recipe, run_mine_stage
from tasks.common import retry_transient


@task(
    name="mine-recipe",
    task_run_name="mine-{stage}-{recipe}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    cache_policy=NONE,
    tags=["mining"],
)
def mine_recipe_task(
    stage: str,
    recipe: str,
    model: str | None = None,
    data_root: str | None = None,
    config_path: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Mine one recipe (loads the model); a retry resumes from the finished chunks."""
    cfg = load_mine_config(config_path)
    return run_mine_recipe(DataRoot.from_uri(data_root), stage, recipe, model or cfg.model, cfg, force=force)


@task(
    name="mine-stage",
    task_run_name="mine-{stage}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    cache_policy=NONE,
    tags=["mining"],
)
def mine_stage_task(
    stage: str,
    model: str | None = None,
    data_root: str | None = None,
    config_path: str | None = None,
    recipes: list[str] | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Mine every recipe of a stage with one loaded model (cheaper than one task per recipe)."""
    cfg = load_mine_config(config_path)
    return run_mine_stage(DataRoot.from_uri(data_root), stage, model or cfg.model, cfg, recipes, force)
