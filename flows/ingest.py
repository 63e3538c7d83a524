"""``ingest_recipe`` (one recipe, then its stage mixture) and ``ingest_stage`` (all recipes of a stage in
parallel, then the mixture). Both run on an ephemeral local Prefect server when no server is configured."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from kalm.recipes import discover, get_recipe
from kalm.reports import data_report_markdown
from tasks.data import build_stage_task, ingest_recipe_task


def _publish_report(title: str, results: list[dict[str, Any]], stages: list[dict[str, Any]]) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=data_report_markdown(title, results, stages), key="data-report")


@flow(name="ingest_recipe", log_prints=True)
def ingest_recipe_flow(
    name: str,
    data_root: str | None = None,
    recipes_dirs: list[str] | None = None,
    config_path: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Rebuild one recipe's shards (skipped when unchanged) and the mixture of its stage."""
    lr = get_recipe(name, recipes_dirs or [])
    result = ingest_recipe_task(name, data_root, recipes_dirs, config_path, force)
    same_stage = [n for n, r in discover(recipes_dirs or []).items() if r.recipe.stage == lr.recipe.stage]
    stage = build_stage_task(lr.recipe.stage, same_stage, data_root, config_path)
    _publish_report(f"Recipe {name}", [result], [stage])
    return {"recipes": [result], "stages": [stage]}


@flow(name="ingest_stage", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def ingest_stage_flow(
    stages: list[str] | None = None,
    recipes: list[str] | None = None,
    tags: list[str] | None = None,
    data_root: str | None = None,
    recipes_dirs: list[str] | None = None,
    config_path: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Ingest the recipes of the given stages (default: both; optionally only ``recipes`` or those with one
    of ``tags``) in parallel, then build each stage's mixture from every recipe that has shards."""
    found = discover(recipes_dirs or [])
    wanted = stages or ["pretrain", "finetune"]
    names = [
        n
        for n, r in found.items()
        if r.recipe.stage in wanted
        and (not recipes or n in recipes)
        and (not tags or set(tags) & set(r.recipe.tags))
    ]
    futures = [ingest_recipe_task.submit(n, data_root, recipes_dirs, config_path, force) for n in names]
    results = [f.result() for f in futures]
    stage_reports = []
    for stage in wanted:
        in_stage = [n for n, r in found.items() if r.recipe.stage == stage]
        if in_stage:
            stage_reports.append(build_stage_task(stage, in_stage, data_root, config_path, force))
    _publish_report("Data stage", results, stage_reports)
    return {"recipes": results, "stages": stage_reports}
