"""Retry policy shared by every task: retry transient I/O only, never a user mistake."""

from __future__ import annotations

from typing import Any

from kalm.errors import KalmError

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


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: inspect the failed state's exception."""
    try:
        state.result()
    except BaseException as exc:  # the state re-raises the task's exception
        return is_transient(exc)
    return False
