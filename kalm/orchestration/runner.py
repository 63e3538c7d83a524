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

from kalm.orchestration.tasks import TASKS
from kalm.pipeline.runner import Stage

R = TypeVar("R")
log = logging.getLogger(__name__)


class PrefectRunner:
    """:class:`kalm.pipeline.runner.Runner` on Prefect tasks; ``map`` submits to the flow's task runner."""

    def run(self, stage: Stage[R], /, **kwargs: Any) -> R:
        return TASKS[stage.name](**{k: quote(v) for k, v in kwargs.items()})  # type: ignore[return-value]

    def map(self, stage: Stage[R], calls: Sequence[dict[str, Any]], /) -> list[R]:
        futures = [TASKS[stage.name].submit(**{k: quote(v) for k, v in kw.items()}) for kw in calls]
        return [f.result() for f in futures]

    def publish(self, key: str, markdown: str, description: str = "") -> None:
        from prefect.artifacts import create_markdown_artifact

        try:
            create_markdown_artifact(markdown=markdown, key=key, description=description or None)
        except Exception as e:  # an artifact is a convenience; never fail a run for it
            log.warning("could not publish the %s artifact: %s", key, e)
