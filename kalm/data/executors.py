"""Where the distributed data stage's work units run: processes on this machine, or a Ray cluster.

A unit is a call ``fn(**kwargs)`` of a module-level function that reads its inputs from the data root,
writes its outputs there (then its completion marker) and returns a small JSON-able dict. Units never
pass data to each other through the executor, so the executor only decides *where* a unit runs, never
*what* it produces: outputs do not depend on the executor or the number of workers.

- ``local``: ``workers`` processes (``forkserver``); 1 worker runs the units in this process. A worker
  that dies (kill -9, out of memory) breaks the pool; the units without a result are resubmitted to a
  fresh pool, up to ``retries`` times.
- ``ray``: one Ray task per unit (``num_cpus=1``, Ray retries a task whose worker died). With no address
  a local Ray of ``workers`` CPUs is started and stopped here; ``address`` (``auto``, ``ray://host:10001``,
  or ``host:6379``) joins a running cluster, which is left running.

>>> with make_executor(ExecutorSpec(kind="local", workers=1)) as ex:
...     ex.map(divmod, [{"a": 7, "b": 2}])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal

from pydantic import Field

from kalm.core.config import StrictModel
from kalm.core.errors import KalmError

log = logging.getLogger(__name__)
RAY_ADDRESS_ENV = "KALM_RAY_ADDRESS"


class ExecutorSpec(StrictModel):
    """``kind``: ``single`` (the one-process per-recipe engine), ``local`` or ``ray`` (the partitioned
    engine of :mod:`kalm.data.distributed`); ``workers``: processes or Ray CPUs; ``address``: a running Ray
    cluster to join (else ``$KALM_RAY_ADDRESS``, else a local Ray is started)."""

    kind: Literal["single", "local", "ray"] = "single"
    workers: int = Field(1, ge=1, le=4096)
    address: str | None = None
    gpus: float = Field(0.0, ge=0.0)  # GPUs each Ray unit asks for (mining's encode units on a GPU cluster)


class UnitFailed(KalmError):
    """A work unit raised: names the unit and the error in one line."""


Result = dict[str, Any]


class Executor(ABC):
    kind = "base"
    workers = 1

    @abstractmethod
    def map_settled(
        self, fn: Callable[..., Result], calls: Sequence[dict[str, Any]]
    ) -> list[Result | KalmError]:
        """Run every call to its end; a failed unit's one-line error takes its place in the list."""

    def map(self, fn: Callable[..., Result], calls: Sequence[dict[str, Any]]) -> list[Result]:
        """Every call's result in order; the first failure (in call order) is raised."""
        out = self.map_settled(fn, calls)
        for res in out:
            if isinstance(res, KalmError):
                raise res
        return out  # type: ignore[return-value]

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 (optional hook: most executors hold nothing to release)
        return None


def _unit_name(fn: Callable[..., Any], kw: dict[str, Any]) -> str:
    return str(kw.get("unit", fn.__name__))


class LocalExecutor(Executor):
    kind = "local"

    def __init__(self, workers: int = 1, retries: int = 2) -> None:
        self.workers, self.retries = workers, retries
        self._pool: ProcessPoolExecutor | None = None

    def _fresh_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("forkserver"))
        return self._pool

    def map_settled(
        self, fn: Callable[..., Result], calls: Sequence[dict[str, Any]]
    ) -> list[Result | KalmError]:
        if self.workers == 1 or len(calls) <= 1:
            return [_settle(fn, kw) for kw in calls]
        results: dict[int, Result | KalmError] = {}
        for attempt in range(self.retries + 1):
            left = [i for i in range(len(calls)) if i not in results]
            if not left:
                break
            pool = self._fresh_pool()
            futs: dict[Future[Result | KalmError], int] = {
                pool.submit(_settle, fn, calls[i]): i for i in left
            }
            wait(futs)
            broken = 0
            for fut, i in futs.items():
                try:
                    results[i] = fut.result()
                except BrokenProcessPool:
                    broken += 1
            if broken:  # a dead worker breaks the whole pool: start a new one for what is left
                log.warning("a worker process died; %d unit(s) resubmitted (attempt %d)", broken, attempt + 2)
                self.close()
        for i in range(len(calls)):
            if i not in results:
                results[i] = UnitFailed(
                    f"unit {_unit_name(fn, calls[i])} lost its worker process {self.retries + 1} times "
                    "(killed, or out of memory)"
                )
        return [results[i] for i in range(len(calls))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _settle(fn: Callable[..., Result], kw: dict[str, Any]) -> Result | KalmError:
    """The unit's result, or its error as a one-line KalmError naming the unit (returned, not raised, so
    the executor can tell a unit's failure from a dead worker)."""
    try:
        return fn(**kw)
    except KalmError as err:
        return KalmError(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except Exception as err:  # noqa: BLE001 - one line naming the unit, not a worker traceback
        return UnitFailed(f"unit {_unit_name(fn, kw)} failed: {type(err).__name__}: {err}")


class RayExecutor(Executor):
    kind = "ray"

    def __init__(
        self, workers: int = 1, address: str | None = None, retries: int = 3, gpus: float = 0.0
    ) -> None:
        try:
            import ray
        except ImportError:
            raise KalmError("the ray executor needs Ray: pip install -e '.[ray]' (ray[data] 2.60)") from None
        self.ray, self.workers, self.retries, self.gpus = ray, workers, retries, gpus
        address = address or os.environ.get(RAY_ADDRESS_ENV) or None
        self.started = False
        self.joined = False
        if ray.is_initialized():
            return
        # the workers must import kalm from the same tree as this process (a checkout, not only a wheel)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {
            "env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        }
        try:
            if address:
                ray.init(address=address, runtime_env=env, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(
                    num_cpus=workers,
                    include_dashboard=False,
                    runtime_env=env,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise KalmError(f"cannot start or join Ray ({address or 'local'}): {err}") from None
        self.started = True
        self.joined = bool(address)
        if address:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", workers)))

    def map_settled(
        self, fn: Callable[..., Result], calls: Sequence[dict[str, Any]]
    ) -> list[Result | KalmError]:
        ray = self.ray
        remote = ray.remote(num_cpus=1, num_gpus=self.gpus, max_retries=self.retries, retry_exceptions=False)(
            _settle
        )
        refs = [remote.remote(fn, kw) for kw in calls]
        out: list[Result | KalmError] = []
        for ref, kw in zip(refs, calls, strict=True):  # every ref to its end: none left running
            try:
                out.append(ray.get(ref))
            except (
                ray.exceptions.RayError
            ) as err:  # the worker or node died (retries spent), OOM, lost object
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                out.append(
                    UnitFailed(f"unit {_unit_name(fn, kw)} failed on Ray: {type(err).__name__}: {first}")
                )
        return out

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False


def make_executor(spec: ExecutorSpec) -> Executor:
    if spec.kind == "ray":
        return RayExecutor(spec.workers, spec.address, gpus=spec.gpus)
    return LocalExecutor(spec.workers)
