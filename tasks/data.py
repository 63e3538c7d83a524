"""Prefect tasks of the data stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from curation.config import load_ingest_config
from curation.ingest import run_ingest_recipe
from curation.stage import run_build_stage
from kalm.recipes import get_recipe
from kalm.storage import DataRoot
from tasks.common import retry_transient


@task(
    name="ingest-recipe",
    task_run_name="ingest-{name}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    cache_policy=NONE,
    tags=["data"],
)
def ingest_recipe_task(
    name: str,
    data_root: str | None = None,
    recipes_dirs: list[str] | None = None,
    config_path: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    cfg, _ = load_ingest_config(config_path)
    lr = get_recipe(name, recipes_dirs or [])
    res = run_ingest_recipe(lr, DataRoot.from_uri(data_root), cfg, force=force)
    return {**res.manifest, "skipped": res.skipped}


@task(
    name="build-stage",
    task_run_name="mixture-{stage}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    cache_policy=NONE,
    tags=["data"],
)
def build_stage_task(
    stage: str,
    recipe_names: list[str],
    data_root: str | None = None,
    config_path: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    cfg, cfg_dir = load_ingest_config(config_path)
    return run_build_stage(stage, recipe_names, DataRoot.from_uri(data_root), cfg, Path(cfg_dir), force=force)
