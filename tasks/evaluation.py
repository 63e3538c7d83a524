"""Prefect tasks of the soup and evaluation stages: thin wrappers over ``evaluation.soup.run_soup``,
``evaluation.mteb_eval.run_eval_config`` and ``evaluation.mteb_eval.compare_models``. Every return value is
JSON-serialisable; retries only on transient I/O (``tasks.common``)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from evaluation.config import load_eval_config
from evaluation.mteb_eval import compare_models, dev_scorer_from_config, run_eval_config
from evaluation.soup import run_soup
from tasks.common import retry_transient


@task(
    name="soup",
    task_run_name="soup-{method}",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    cache_policy=NONE,
    tags=["soup"],
)
def soup_task(
    method: str,
    checkpoints: list[str],
    out: str,
    weights: list[float] | None = None,
    config_path: str | None = None,
    data_root: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Average checkpoints into ``out``; greedy soups score candidates on the eval config's dev tasks.

    Returns the soup record (``out/soup.json``) plus ``reused`` (True: an identical soup was already there).
    """
    dev = dev_scorer_from_config(load_eval_config(config_path), data_root) if method == "greedy" else None
    return run_soup(method, checkpoints, out, weights=weights, dev_score=dev, force=force)


@task(
    name="evaluate",
    task_run_name="evaluate-{label}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_transient,
    cache_policy=NONE,
    tags=["eval"],
)
def evaluate_task(
    model_path: str,
    label: str = "model",
    config_path: str | None = None,
    data_root: str | None = None,
    tasks: list[str] | None = None,
    dims: list[int] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Evaluate one model folder per the eval config; returns the run's rows and where they are stored."""
    res = run_eval_config(model_path, config_path, data_root=data_root, tasks=tasks, dims=dims, force=force)
    return {
        "label": label,
        "model_path": res.model_path,
        "fingerprint": res.fingerprint,
        "output": res.output,
        "rows": res.rows,
        "results_reused": res.reused,
        "results_new": res.new,
        "reused": res.new == 0,
    }


@task(
    name="compare",
    task_run_name="compare-{config_path}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_transient,
    cache_policy=NONE,
    tags=["eval"],
)
def compare_task(
    models: dict[str, str],
    config_path: str | None = None,
    data_root: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Evaluate labelled models (``{"base": ..., "finetune-seed0": ..., "soup": ...}``) and write ONE
    comparison (Markdown with a ``soup - base`` column, Parquet, a PNG per task type).

    Returns ``markdown``, ``table_path``, ``markdown_path``, ``charts``, ``rows`` (one per label, task and
    dim), ``models``, ``fingerprints``, ``results_new``/``results_reused`` and ``reused`` (True when nothing
    was re-scored).
    """
    return compare_models(models, config_path, data_root, force=force).to_dict()
