"""The data stage as the DAG and ``kalm data run`` run it: ingest recipes in parallel, then rebuild the
mixture of every stage they belong to (each from all recipes of that stage that have shards).

>>> ingested, mixtures = run_data(LocalRunner(), [recipes.get("squad")], recipes, root, cfg)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from kalm.core.results import StageResult
from kalm.core.storage import DataRoot
from kalm.data.config import IngestConfig
from kalm.data.recipes import LoadedRecipe, RecipeSet
from kalm.pipeline.runner import Runner
from kalm.pipeline.stages import INGEST, MIXTURES


def run_data(
    runner: Runner,
    todo: Sequence[LoadedRecipe],
    universe: RecipeSet | Sequence[LoadedRecipe],
    root: DataRoot,
    cfg: IngestConfig,
    *,
    force: bool = False,
    forced: Collection[str] = (),
    stages: Sequence[str] | None = None,
) -> tuple[list[StageResult], list[StageResult]]:
    """Ingest ``todo`` (``force``, or ``forced`` names, rebuild even when unchanged), then build the mixture
    of each stage (``stages``, default: the stages of ``todo``) from the recipes of ``universe`` in it."""
    ingested = runner.map(
        INGEST, [{"lr": lr, "root": root, "cfg": cfg, "force": force or lr.name in forced} for lr in todo]
    )
    everyone = list(universe.values()) if isinstance(universe, RecipeSet) else list(universe)
    wanted = list(stages) if stages is not None else sorted({lr.recipe.stage for lr in todo})
    mixtures: list[StageResult] = []
    for stage in wanted:
        names = sorted(lr.name for lr in everyone if lr.recipe.stage == stage)
        if names:
            built: list[StageResult] = runner.run(
                MIXTURES, stage=stage, recipe_names=names, root=root, cfg=cfg, force=force
            )
            mixtures.extend(built)
    return ingested, mixtures
