"""Prefect task that launches one training job (DeepSpeed / torchrun / single process) as a subprocess."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from tasks.common import retry_transient


@task(
    name="train",
    task_run_name="train-{run_name}",
    cache_policy=NONE,
    tags=["training"],
    retries=1,
    retry_condition_fn=retry_transient,
)
def train_task(
    config: str,
    run_name: str,
    data_root: str | None = None,
    overrides: dict[str, Any] | None = None,
    nproc: int | None = None,
) -> str:
    """Run the job; a rerun of the same config resumes from its newest checkpoint. Returns the final model."""
    from training.launch import run_training

    return str(run_training(config, data_root, {"run_name": run_name, **(overrides or {})}, nproc=nproc))
