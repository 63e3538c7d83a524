"""The data stage as the DAG and ``kalm data run`` run it: ingest recipes in parallel, then rebuild the
mixture of every stage they belong to (each from all recipes of that stage that have shards).

>>> ingested, mixtures = run_data(LocalRunner(), [recipes.get("squad")], recipes, root, cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from kalm.core.errors import KalmError
from kalm.core.results import StageResult
from kalm.core.storage import DataRoot
from kalm.data.config import IngestConfig
from kalm.data.recipes import LoadedRecipe, RecipeSet
from kalm.pipeline.runner import Runner
from kalm.pipeline.stages import INGEST, MIXTURES, PARTITIONED

if TYPE_CHECKING:
    from kalm.evaluation.config import EvalConfig

log = logging.getLogger(__name__)


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
    eval_cfg: EvalConfig | None = None,
) -> tuple[list[StageResult], list[StageResult]]:
    """Ingest ``todo`` (``force``, or ``forced`` names, rebuild even when unchanged), then build the mixture
    of each stage (``stages``, default: the stages of ``todo``) from the recipes of ``universe`` in it.

    The mixtures are decontaminated against every task of ``eval_cfg`` (default: the ingest config's
    ``decontamination.eval_config``), local tasks always, mteb tasks where their data is cached."""
    if cfg.executor.kind != "single":
        return _run_partitioned(runner, todo, universe, root, cfg, force, forced, stages, eval_cfg)
    settled = runner.map(
        INGEST,
        [{"lr": lr, "root": root, "cfg": cfg, "force": force or lr.name in forced} for lr in todo],
        settle=True,
    )
    failed: dict[str, BaseException] = {}
    ingested: list[StageResult] = []
    for lr, res in zip(todo, settled, strict=True):
        if isinstance(res, BaseException):
            failed[lr.name] = res
        else:
            ingested.append(res)
    for name, err in failed.items():
        log.error("ingest of %s failed: %s", name, _one_line(err))
    everyone = list(universe.values()) if isinstance(universe, RecipeSet) else list(universe)
    wanted = list(stages) if stages is not None else sorted({lr.recipe.stage for lr in todo})
    texts = eval_task_texts(cfg, eval_cfg, root) if wanted else []
    mixtures: list[StageResult] = []
    for stage in wanted:
        names = sorted(lr.name for lr in everyone if lr.recipe.stage == stage)
        if names:
            built: list[StageResult] = runner.run(
                MIXTURES, stage=stage, recipe_names=names, root=root, cfg=cfg, force=force, eval_texts=texts
            )
            mixtures.extend(built)
    if failed:
        # the other recipes' shards and every stage's mixture are built (a failed recipe takes part with its
        # last complete shards, if any); what depends on the failure (training on that stage) must not run
        raise DataStageFailed(failed, ingested, mixtures)
    return ingested, mixtures


def _run_partitioned(
    runner: Runner,
    todo: Sequence[LoadedRecipe],
    universe: RecipeSet | Sequence[LoadedRecipe],
    root: DataRoot,
    cfg: IngestConfig,
    force: bool,
    forced: Collection[str],
    stages: Sequence[str] | None,
    eval_cfg: EvalConfig | None,
) -> tuple[list[StageResult], list[StageResult]]:
    """The partitioned engine: each wanted stage as one task over every recipe of the stage (dedup is
    across all of them); ``force`` rebuilds everything, ``forced`` those recipes' partitions; the others are
    reused."""
    everyone = list(universe.values()) if isinstance(universe, RecipeSet) else list(universe)
    wanted = list(stages) if stages is not None else sorted({lr.recipe.stage for lr in todo})
    texts = eval_task_texts(cfg, eval_cfg, root) if wanted else []
    ingested: list[StageResult] = []
    mixtures: list[StageResult] = []
    failed: dict[str, BaseException] = {}
    for stage in wanted:
        recipes = sorted((lr for lr in everyone if lr.recipe.stage == stage), key=lambda x: x.name)
        if not recipes:
            continue
        ing, mix, bad = runner.run(
            PARTITIONED,
            stage=stage,
            recipes=recipes,
            root=root,
            cfg=cfg,
            force=force,
            forced=sorted(forced),
            eval_texts=texts,
        )
        ingested += ing
        mixtures += mix
        failed.update({name: KalmError(msg) for name, msg in bad.items()})
    for name, err in failed.items():
        log.error("ingest of %s failed: %s", name, _one_line(err))
    if failed:
        raise DataStageFailed(failed, ingested, mixtures)
    return ingested, mixtures


class DataStageFailed(KalmError):
    """Some recipes failed to ingest; the rest of the data stage was done. Names each failure in one line."""

    def __init__(
        self, failed: dict[str, BaseException], ingested: list[StageResult], mixtures: list[StageResult]
    ) -> None:
        self.failed, self.ingested, self.mixtures = failed, ingested, mixtures
        what = "; ".join(f"{n}: {_one_line(e)}" for n, e in sorted(failed.items()))
        super().__init__(
            f"{len(failed)} of {len(failed) + len(ingested)} recipe(s) failed to ingest ({what}); the other "
            f"recipes and {len(mixtures)} mixture(s) were built"
        )


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if isinstance(err, KalmError) else f"{type(err).__name__}: {text}"


def eval_task_texts(cfg: IngestConfig, eval_cfg: EvalConfig | None, root: DataRoot) -> list[str]:
    """The evaluation tasks' texts the mixtures are decontaminated against (none when decontamination is
    off); one logged notice names the mteb tasks whose data is not cached here."""
    spec = cfg.decontamination
    if not spec.enabled or (eval_cfg is None and spec.eval_config is None):
        return []
    from kalm.evaluation.config import load_eval_config
    from kalm.evaluation.mteb_tasks import task_texts

    texts, notices = task_texts(eval_cfg or load_eval_config(spec.eval_config), root.uri)
    if notices:
        log.warning(
            "decontamination: not against %d mteb task(s) without local data: %s",
            len(notices),
            "; ".join(notices),
        )
    return texts
