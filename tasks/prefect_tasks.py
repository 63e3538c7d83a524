"""The Prefect tasks of the pipeline, one per stage, listed where a reader looks for them.

Each wraps a plain stage function (:mod:`kalm.pipeline.stages`) with its name, run name, tags and retries
on transient I/O only; they are built in :mod:`kalm.orchestration.tasks`.
"""

from kalm.orchestration.tasks import (
    TASKS,
    build_mixtures_task,
    compare_task,
    evaluate_task,
    ingest_recipe_task,
    mine_recipe_task,
    soup_task,
    train_task,
)

__all__ = [
    "TASKS",
    "build_mixtures_task",
    "compare_task",
    "evaluate_task",
    "ingest_recipe_task",
    "mine_recipe_task",
    "soup_task",
    "train_task",
]
