"""The Prefect runner: the DAG's stages run as Prefect tasks inside the current flow run, so the UI shows
each stage's state, retries, logs and run name, and reports become artifacts.

Arguments reach the stage function untouched (``quote``: Prefect does not walk into parsed configs, data
roots or recipes), and nothing is cached by Prefect: the stages cache by content themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

from prefect.utilities.annotations import quote

from kalm.core.errors import KalmError
from kalm.orchestration.tasks import RUNNER_TASKS
from kalm.pipeline.runner import Stage

R = TypeVar("R")
log = logging.getLogger(__name__)


class UserErrorsWithoutTraceback(logging.Filter):
    """A stage that fails on a user mistake (a :class:`KalmError`: bad config, missing source, failed
    recipe) is logged by Prefect as one line, without the traceback Prefect attaches to every failure;
    the run still fails and the UI still shows the message. Other exceptions keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, KalmError):
            record.exc_info, record.exc_text = None, None
        return True


def install_user_error_filter() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.flow_engine", "prefect.task_engine"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, UserErrorsWithoutTraceback) for f in lg.filters):
            lg.addFilter(UserErrorsWithoutTraceback())


install_user_error_filter()


class PrefectRunner:
    """:class:`kalm.pipeline.runner.Runner` on Prefect tasks; ``map`` submits to the flow's task runner."""

    def run(self, stage: Stage[R], /, **kwargs: Any) -> R:
        # the state, then its result: a cache hit's "Cached" state carries the stage result as its data
        state: Any = RUNNER_TASKS[stage.name](**{k: quote(v) for k, v in kwargs.items()}, return_state=True)
        return state.result()  # type: ignore[no-any-return]

    def map(self, stage: Stage[R], calls: Sequence[dict[str, Any]], /, *, settle: bool = False) -> list[R]:
        futures = [RUNNER_TASKS[stage.name].submit(**{k: quote(v) for k, v in kw.items()}) for kw in calls]
        if not settle:
            return [f.result() for f in futures]
        # a failed task stays failed in the UI; its exception takes its place here
        return [f.result(raise_on_failure=False) for f in futures]

    def publish(self, key: str, markdown: str, description: str = "") -> None:
        from prefect.artifacts import create_markdown_artifact

        try:
            create_markdown_artifact(markdown=markdown, key=key, description=description or None)
        except Exception as e:  # an artifact is a convenience; never fail a run for it
            log.warning("could not publish the %s artifact: %s", key, e)
