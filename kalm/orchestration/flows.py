"""Prefect flows: thin wrappers that parse their (JSON) parameters once and run the plain DAG functions of
:mod:`kalm.pipeline` on the :class:`~kalm.orchestration.runner.PrefectRunner`.

- ``retrain``: the whole DAG (:func:`kalm.pipeline.dag.run_retrain`);
- ``rerun_recipe``: one recipe re-ingested and what depends on it recomputed (its own artifacts);
- ``evaluate``: one model folder on the eval config's tasks;
- ``ingest_recipe`` / ``ingest_stage``: the data stage alone (``kalm data run``).

Called without a server, they run on an ephemeral local Prefect server.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from kalm.core.results import StageResult
from kalm.core.secrets import install_log_scrubber
from kalm.orchestration.runner import PrefectRunner
from kalm.pipeline.config import StageName, load_pipeline
from kalm.pipeline.dag import rerun_recipe, run_retrain
from kalm.pipeline.data import run_data

install_log_scrubber()  # served flows and workers import this module: their run logs are scrubbed too


def forward_project_logs() -> None:
    """The ``kalm`` loggers' INFO lines into the flow run's log in the UI, wherever the flow runs: the CLI
    sets ``PREFECT_LOGGING_EXTRA_LOGGERS=kalm``, but a work-pool worker's flow-run process only imports
    this module, so the handler Prefect would add is added here (once)."""
    import logging

    from prefect.logging.handlers import APILogHandler

    project = logging.getLogger("kalm")
    if not any(isinstance(h, APILogHandler) for h in project.handlers):
        project.addHandler(APILogHandler())
    if project.getEffectiveLevel() > logging.INFO:
        project.setLevel(logging.INFO)


forward_project_logs()

TaskRunner = ThreadPoolTaskRunner  # recipes and seeds in parallel; the Ray runner plugs in here


@flow(name="retrain", log_prints=False, task_runner=TaskRunner(max_workers=2))  # type: ignore[arg-type]
def retrain_flow(
    config: str = "pipeline_demo.yaml",
    stages: list[StageName] | None = None,
    recipes: list[str] | None = None,
    data_root: str | None = None,
    resume: bool = True,
    recipes_dirs: list[str] | None = None,
) -> dict[str, Any]:
    """Run the retraining DAG: ingest, mine, pretrain, refresh, score, finetune, soup, eval.

    Args:
        config: The pipeline YAML, a path or a name in configs/ (pipeline_demo.yaml, pipeline_qwen2.yaml).
        stages: Only these stages (empty: all). A stage left out uses its previous outputs.
        recipes: Only (re)ingest these recipes; the later stages still use every recipe of the pipeline.
        data_root: Where everything is written: a folder or s3://bucket/prefix (empty: $KALM_DATA_ROOT or
            ./data).
        resume: Reuse finished outputs and checkpoints (off: recompute every selected stage).
        recipes_dirs: Extra folders with recipe files, besides data_recipes/ and $KALM_RECIPES_PATH.
    """
    p = load_pipeline(config, data_root, recipes_dirs or [])
    return run_retrain(p, PrefectRunner(), stages=stages, recipes=recipes, resume=resume)


@flow(name="rerun_recipe", task_runner=TaskRunner(max_workers=2))  # type: ignore[arg-type]
def rerun_recipe_flow(
    recipe: str,
    config: str = "pipeline_demo.yaml",
    data_root: str | None = None,
    downstream: bool = True,
    recipes_dirs: list[str] | None = None,
) -> dict[str, Any]:
    """Re-ingest one recipe (even if unchanged), then recompute only what depends on it: its stage
    mixture, its mined negatives and, when its data changed, the training runs, soup and scores.

    Args:
        recipe: The recipe's name (`kalm data list` shows them).
        config: The pipeline YAML the recipe belongs to (a path or a name in configs/).
        data_root: A folder or s3://bucket/prefix (empty: $KALM_DATA_ROOT or ./data).
        downstream: Also recompute what depends on the recipe (off: stop after its stage mixture).
        recipes_dirs: Extra folders with recipe files, besides data_recipes/ and $KALM_RECIPES_PATH.
    """
    p = load_pipeline(config, data_root, recipes_dirs or [])
    return rerun_recipe(p, PrefectRunner(), recipe, downstream)


@flow(name="evaluate")
def evaluate_flow(
    model: str,
    config: str = "eval.yaml",
    data_root: str | None = None,
    tasks: list[str] | None = None,
    label: str = "model",
) -> dict[str, Any]:
    """Score one model on the eval config's tasks; publishes a summary (task types as columns) and the
    per-task table.

    Args:
        model: A model folder, an alias (minilm), stage:NAME (the newest finished run of that stage) or a
            hub id when online.
        config: The eval YAML (a path or a name in configs/: eval.yaml, eval_qwen2.yaml).
        data_root: A folder or s3://bucket/prefix (empty: $KALM_DATA_ROOT or ./data).
        tasks: Only these task names (empty: every task of the config).
        label: The model's name in the tables.
    """
    from kalm.core.storage import DataRoot
    from kalm.evaluation.config import load_eval_config
    from kalm.pipeline.stages import EVALUATE
    from kalm.training.config import resolve_model_path

    root = DataRoot.from_uri(data_root)
    path = resolve_model_path(model, root)
    runner = PrefectRunner()
    res = runner.run(
        EVALUATE, model_path=path, config=load_eval_config(config), data_root=root.uri, tasks=tasks
    )
    rows = res.rows or []
    if rows:
        from kalm.evaluation.report import summary_markdown, summary_table, type_means_markdown

        overview = type_means_markdown({label: rows})
        detail = summary_markdown(summary_table(rows), f"{label}: every task")
        runner.publish("evaluation", f"# {label}\n\n`{path}`\n\n{overview}\n{detail}")
    return {
        "label": label,
        "model_path": res.model_path,
        "fingerprint": res.fingerprint,
        "output": res.output,
        "rows": rows,
        "results_reused": res.reused,
        "results_new": res.new,
    }


def _data_report(title: str, ingested: list[StageResult], mixtures: list[StageResult]) -> dict[str, Any]:
    from kalm.data.report import data_report_markdown

    PrefectRunner().publish("data-report", data_report_markdown(title, ingested, mixtures))
    return {"recipes": [r.to_dict() for r in ingested], "mixtures": [m.to_dict() for m in mixtures]}


@flow(name="ingest_recipe", log_prints=True)
def ingest_recipe_flow(
    name: str,
    data_root: str | None = None,
    recipes_dirs: list[str] | None = None,
    config_path: str | None = None,
    force: bool = False,
    executor: Literal["local", "ray"] | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Rebuild one recipe's shards (a cache hit when unchanged) and the mixture of its stage.

    Args:
        name: The recipe's name.
        data_root: A folder or s3://bucket/prefix (empty: $KALM_DATA_ROOT or ./data).
        recipes_dirs: Extra folders with recipe files.
        config_path: The ingest YAML (empty: configs/ingest.yaml).
        force: Rebuild even when nothing changed.
        executor: local or ray (empty: the ingest config's).
        workers: Processes (local) or Ray CPUs (empty: the ingest config's).
        ray_address: A Ray cluster to join (auto, ray://host:10001; empty: $KALM_RAY_ADDRESS or a local Ray).
    """
    from kalm.core.storage import DataRoot
    from kalm.data.config import load_ingest_config, with_executor
    from kalm.data.recipes import discover

    found = discover(recipes_dirs or [])
    lr = found.get(name)
    ingested, mixtures = run_data(
        PrefectRunner(),
        [lr],
        found,
        DataRoot.from_uri(data_root),
        with_executor(load_ingest_config(config_path), executor, workers, ray_address),
        forced={name} if force else (),
    )
    return _data_report(f"Recipe {name}", ingested, mixtures)


@flow(name="ingest_stage", log_prints=True, task_runner=TaskRunner(max_workers=2))  # type: ignore[arg-type]
def ingest_stage_flow(
    stages: list[Literal["pretrain", "finetune"]] | None = None,
    recipes: list[str] | None = None,
    tags: list[str] | None = None,
    data_root: str | None = None,
    recipes_dirs: list[str] | None = None,
    config_path: str | None = None,
    force: bool = False,
    executor: Literal["local", "ray"] | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Ingest the recipes of the given stages in parallel, then build each stage's mixture from every
    recipe of that stage.

    Args:
        stages: pretrain and/or finetune (empty: both).
        recipes: Only these recipes (empty: all of the stages).
        tags: Only recipes with one of these tags.
        data_root: A folder or s3://bucket/prefix (empty: $KALM_DATA_ROOT or ./data).
        recipes_dirs: Extra folders with recipe files.
        config_path: The ingest YAML (empty: configs/ingest.yaml).
        force: Rebuild even when nothing changed.
        executor: local or ray (empty: the ingest config's).
        workers: Processes (local) or Ray CPUs (empty: the ingest config's).
        ray_address: A Ray cluster to join (empty: $KALM_RAY_ADDRESS or a local Ray).
    """
    from kalm.core.storage import DataRoot
    from kalm.data.config import load_ingest_config, with_executor
    from kalm.data.recipes import discover

    found = discover(recipes_dirs or [])
    wanted = stages or ["pretrain", "finetune"]
    todo = found.select(recipes, tags, wanted)
    ingested, mixtures = run_data(
        PrefectRunner(),
        todo,
        found,
        DataRoot.from_uri(data_root),
        with_executor(load_ingest_config(config_path), executor, workers, ray_address),
        force=force,
        stages=wanted,
    )
    return _data_report("Data stage", ingested, mixtures)
