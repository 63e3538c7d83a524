"""The runner interface the DAG is written against: run one stage, map a stage over items, publish a report.

A :class:`Stage` is a plain, typed function plus how an orchestrator should run it (a name, a run-name
template, retries on transient I/O, tags). The DAG (:mod:`kalm.pipeline.dag`) only calls ``runner.run`` and
``runner.map``; which runner executes the stages is the caller's choice:

- :class:`LocalRunner`: in-process function calls, ``map`` on a thread pool (tests, benchmarks, scripts);
- ``kalm.orchestration.runner.PrefectRunner``: every stage becomes a Prefect task (states, retries, logs,
  artifacts in the UI);
- a distributed runner (Ray, for the data stage) plugs in behind the same three methods.

>>> LocalRunner().run(Stage("double", lambda x: 2 * x, "double-{x}"), x=21)
42
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from kalm.core.errors import KalmError

R = TypeVar("R")
log = logging.getLogger(__name__)
TRANSIENT = (ConnectionError, TimeoutError)


def is_transient(exc: BaseException | None) -> bool:
    """A network blip or a throttled object store is worth a retry; a bad config or record never is."""
    if exc is None or isinstance(exc, KalmError):
        return False
    if isinstance(exc, TRANSIENT):
        return True
    text = str(exc).lower()
    return isinstance(exc, OSError) and any(
        s in text for s in ("timed out", "connection", "throttl", "slow down", "503", "temporarily")
    )


@dataclass(frozen=True)
class Stage(Generic[R]):
    """One unit of the DAG: ``fn(**kwargs) -> R`` and how to run it.

    ``run_name`` is formatted with the call's keyword arguments (``"ingest-{recipe.name}"``). ``retries``
    apply to transient I/O only (:func:`is_transient`), never to a user mistake.
    """

    name: str
    fn: Callable[..., R]
    run_name: str
    retries: int = 0
    retry_delay_s: float = 5.0
    tags: tuple[str, ...] = ()

    def label(self, kwargs: dict[str, Any]) -> str:
        try:
            return self.run_name.format(**kwargs)
        except (KeyError, AttributeError, IndexError):
            return self.name


class Runner(Protocol):
    """What the DAG needs from an orchestrator."""

    def run(self, stage: Stage[R], /, **kwargs: Any) -> R:
        """Run one stage and return its result (raises its error)."""
        ...

    def map(self, stage: Stage[R], calls: Sequence[dict[str, Any]], /, *, settle: bool = False) -> list[R]:
        """Run the stage once per keyword dict, concurrently where the runner can; results in order.

        ``settle``: every call runs to its end and a failed one's exception takes its place in the list
        (one bad item must not stop its siblings); otherwise the first failure is raised."""
        ...

    def publish(self, key: str, markdown: str, description: str = "") -> None:
        """Show a Markdown report (data report, loss curves, scores, stage table) where users look."""
        ...


class LocalRunner:
    """Plain function calls in this process; ``map`` runs ``workers`` calls at once on threads.

    Transient I/O errors are retried like the Prefect runner does, so both runners behave the same."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = max(1, workers)
        self.reports: dict[str, str] = {}  # what ``publish`` received, by key (tests read it)

    def run(self, stage: Stage[R], /, **kwargs: Any) -> R:
        for attempt in range(stage.retries + 1):
            try:
                return stage.fn(**kwargs)
            except Exception as err:
                if attempt == stage.retries or not is_transient(err):
                    raise
                log.warning("%s: transient error (%s); retry %d", stage.label(kwargs), err, attempt + 1)
                time.sleep(stage.retry_delay_s)
        raise AssertionError("unreachable")

    def map(self, stage: Stage[R], calls: Sequence[dict[str, Any]], /, *, settle: bool = False) -> list[R]:
        def one(kw: dict[str, Any]) -> Any:
            if not settle:
                return self.run(stage, **kw)
            try:
                return self.run(stage, **kw)
            except Exception as err:
                return err

        if len(calls) <= 1 or self.workers == 1:
            return [one(kw) for kw in calls]
        with ThreadPoolExecutor(min(self.workers, len(calls))) as pool:
            return list(pool.map(one, calls))

    def publish(self, key: str, markdown: str, description: str = "") -> None:
        self.reports[key] = markdown
