"""Prefect tasks: every stage of :mod:`kalm.pipeline.stages` as a Prefect task, with its name, run name,
tags and retries (transient I/O only: :func:`kalm.pipeline.runner.is_transient`), and no Prefect result
caching (the stages cache by content themselves).

``TASKS`` maps a stage's name to its task; the module-level names are for readers and ``prefect`` users::

    from kalm.orchestration.tasks import ingest_recipe_task
    ingest_recipe_task(lr=recipe, root=root, cfg=cfg)      # inside a flow
"""

from __future__ import annotations

import functools
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NONE

from kalm.pipeline.runner import Stage, is_transient
from kalm.pipeline.stages import COMPARE, EVALUATE, INGEST, MINE, MIXTURES, SOUP, STAGES, TRAIN


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failed state's exception is transient."""
    try:
        state.result()
    except BaseException as exc:  # the state re-raises the task's exception
        return is_transient(exc)
    return False


def all_cached(res: Any) -> bool:
    """A stage result (or a list of them: the mixtures of a stage) that reused every output."""
    if isinstance(res, list | tuple):
        return bool(res) and all(all_cached(r) for r in res)
    return bool(getattr(res, "cached", False))


def shows_cache_hits(fn: Any) -> Any:
    """The stage function, returning a ``Cached`` state (a kind of Completed) when its result says it
    reused its outputs: the UI then shows cache hits as such, not as one more "Completed"."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        res = fn(*args, **kwargs)
        if all_cached(res):
            from prefect.states import Completed

            return Completed(name="Cached", message="outputs unchanged: reused", data=res)
        return res

    return run


def as_task(stage: Stage[Any], cached_state: bool = False) -> Task[..., Any]:
    """The stage as a Prefect task; ``cached_state``: a cache hit ends in a ``Cached`` state (the DAG's
    runner reads results from states; a plain call of such a task would return the state itself)."""
    return task(
        name=stage.name,
        task_run_name=stage.run_name,
        retries=stage.retries,
        retry_delay_seconds=stage.retry_delay_s,
        retry_condition_fn=retry_transient,
        cache_policy=NONE,
        tags=list(stage.tags),
    )(shows_cache_hits(stage.fn) if cached_state else stage.fn)


TASKS: dict[str, Task[..., Any]] = {s.name: as_task(s) for s in STAGES}  # plain results, for users' flows
RUNNER_TASKS: dict[str, Task[..., Any]] = {s.name: as_task(s, cached_state=True) for s in STAGES}
ingest_recipe_task = TASKS[INGEST.name]
build_mixtures_task = TASKS[MIXTURES.name]
mine_recipe_task = TASKS[MINE.name]
train_task = TASKS[TRAIN.name]
soup_task = TASKS[SOUP.name]
compare_task = TASKS[COMPARE.name]
evaluate_task = TASKS[EVALUATE.name]
