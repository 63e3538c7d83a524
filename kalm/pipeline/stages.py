"""The DAG's stages: each is a plain function of a stage package (typed arguments, parsed configs, a typed
result) with its run name, retry policy and tags. Orchestrators (``kalm.orchestration``) turn these into
Prefect tasks; :class:`kalm.pipeline.runner.LocalRunner` calls them directly.

| stage | function | result |
|---|---|---|
| ``INGEST`` | :func:`kalm.data.ingest.run_ingest_recipe` | ``StageResult`` (one recipe's shards) |
| ``MIXTURES`` | :func:`kalm.data.mixtures.run_build_stage` | ``list[StageResult]`` (one per recipe) |
| ``PARTITIONED`` | :func:`kalm.data.distributed.run_stage_distributed` | ingest + mixture results |
| ``MINE`` | :func:`kalm.mining.mine.run_mine_recipe` | ``StageResult`` (one recipe's negatives) |
| ``SCORE`` | :func:`kalm.mining.score.run_score_recipe` | ``StageResult`` (one recipe's teacher scores) |
| ``TRAIN`` | :func:`kalm.training.launch.run_training` | ``StageResult`` (the final model) |
| ``SOUP`` | :func:`kalm.evaluation.soup.run_soup` (+ dev scorer, S3 upload) | ``StageResult`` (the soup) |
| ``COMPARE`` | :func:`kalm.evaluation.compare.compare_models` | ``Comparison`` |
| ``EVALUATE`` | :func:`kalm.evaluation.results.run_eval_config` | ``EvalResult`` |
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kalm.core.layout import run_rel
from kalm.core.results import StageResult
from kalm.core.storage import DataRoot
from kalm.pipeline.runner import Stage

if TYPE_CHECKING:
    from kalm.data.config import IngestConfig
    from kalm.data.recipes import LoadedRecipe
    from kalm.evaluation.compare import Comparison
    from kalm.evaluation.config import EvalConfig
    from kalm.evaluation.results import EvalResult
    from kalm.mining.config import MineConfig, ScoreConfig
    from kalm.training.config import TrainConfig


# The stage packages are imported when a stage runs, not when the DAG is imported: ``kalm data ...`` never
# pays for torch. The signatures are the stage functions' own (Prefect names task runs from them).


def ingest_stage(lr: LoadedRecipe, root: DataRoot, cfg: IngestConfig, force: bool = False) -> StageResult:
    from kalm.data.ingest import run_ingest_recipe

    return run_ingest_recipe(lr, root, cfg, force=force)


def mixtures_stage(
    stage: str,
    recipe_names: Sequence[str],
    root: DataRoot,
    cfg: IngestConfig,
    force: bool = False,
    eval_texts: Sequence[str] = (),
) -> list[StageResult]:
    from kalm.data.mixtures import run_build_stage

    return run_build_stage(stage, recipe_names, root, cfg, force, eval_texts)


def partitioned_stage(
    stage: str,
    recipes: Sequence[LoadedRecipe],
    root: DataRoot,
    cfg: IngestConfig,
    force: bool = False,
    forced: Sequence[str] = (),
    eval_texts: Sequence[str] = (),
) -> tuple[list[StageResult], list[StageResult], dict[str, str]]:
    """The whole data stage of ``stage`` on the configured executor (one task drives Ray or the local
    processes; the units never become Prefect tasks): ingest results, mixtures, failures by recipe."""
    from kalm.data.distributed import run_stage_distributed
    from kalm.data.executors import make_executor

    with make_executor(cfg.executor) as ex:
        ingested, mixtures, failed = run_stage_distributed(
            stage, recipes, root, cfg, ex, force=force, forced=forced, eval_texts=eval_texts
        )
    return (
        ingested,
        mixtures,
        {k: str(v).splitlines()[0] if str(v) else type(v).__name__ for k, v in failed.items()},
    )


def mine_stage(
    root: DataRoot, stage: str, recipe: str, model: str, cfg: MineConfig, force: bool = False
) -> StageResult:
    from kalm.mining.mine import run_mine_recipe

    return run_mine_recipe(root, stage, recipe, model, cfg, force)


def score_stage(
    root: DataRoot, stage: str, recipe: str, cfg: ScoreConfig, force: bool = False
) -> StageResult:
    from kalm.mining.score import run_score_recipe

    return run_score_recipe(root, stage, recipe, cfg, force)


def train_stage(cfg: TrainConfig, root: DataRoot, nproc: int | None = None) -> StageResult:
    from kalm.training.launch import run_training

    # the pipeline owns its run names: a changed input retrains them (the old model kept until the new one
    # is finished)
    return run_training(cfg, root, nproc=nproc, overwrite=True)


def soup_stage(
    method: str,
    checkpoints: Sequence[str],
    out: Path,
    weights: Sequence[float] | None,
    eval_cfg: EvalConfig,
    root: DataRoot,
    name: str,
    force: bool = False,
    base: str | None = None,
    base_weight: float = 0.0,
) -> StageResult:
    """Average ``checkpoints`` into ``out`` (then merged with ``base`` at ``base_weight``); greedy soups
    score candidates on the eval config's dev tasks. With an S3 data root the soup is uploaded to
    ``runs/soup/<name>`` too (second output)."""
    from kalm.evaluation.scoring import dev_scorer_from_config
    from kalm.evaluation.soup import run_soup

    dev = dev_scorer_from_config(eval_cfg, root.uri) if method == "greedy" else None
    res = run_soup(
        method,
        checkpoints,
        out,
        weights=weights,
        dev_score=dev,
        force=force,
        base=base,
        base_weight=base_weight,
    )
    if not root.is_local:
        from pyarrow import fs as pafs

        rel = run_rel("soup", name)
        if not res.cached or not root.exists(f"{rel}/soup.json"):
            pafs.copy_files(
                str(out),
                root.path(rel),
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=root.fs,
            )
        res.outputs.append(root.full_uri(rel))
    return res


def compare_stage(
    models: dict[str, str], config: EvalConfig, data_root: str, force: bool = False
) -> Comparison:
    from kalm.evaluation.compare import compare_models

    return compare_models(models, config, data_root, force=force)


def evaluate_stage(
    model_path: str, config: EvalConfig | str | None, data_root: str, tasks: list[str] | None = None
) -> EvalResult:
    from kalm.evaluation.results import run_eval_config

    return run_eval_config(model_path, config, data_root=data_root, tasks=tasks)


INGEST = Stage("ingest-recipe", ingest_stage, "ingest-{lr.name}", retries=2, tags=("data",))
MIXTURES = Stage("build-mixtures", mixtures_stage, "mixtures-{stage}", retries=2, tags=("data",))
PARTITIONED = Stage(
    "data-stage", partitioned_stage, "data-{stage}-{cfg.executor.kind}", retries=1, tags=("data",)
)
MINE = Stage("mine-recipe", mine_stage, "mine-{stage}-{recipe}", retries=2, tags=("mining",))
SCORE = Stage("score-recipe", score_stage, "score-{stage}-{recipe}", retries=2, tags=("mining",))
TRAIN = Stage("train", train_stage, "train-{cfg.run_name}", retries=1, tags=("training",))
SOUP = Stage("soup", soup_stage, "soup-{method}-{name}", retries=1, tags=("soup",))
COMPARE = Stage("compare", compare_stage, "compare", retries=2, retry_delay_s=10, tags=("eval",))
EVALUATE = Stage("evaluate", evaluate_stage, "evaluate", retries=2, retry_delay_s=10, tags=("eval",))
STAGES = (INGEST, MIXTURES, PARTITIONED, MINE, SCORE, TRAIN, SOUP, COMPARE, EVALUATE)
