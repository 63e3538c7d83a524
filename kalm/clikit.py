"""Shared command-line helpers (logging set-up, one-line user errors), importable by every stage's CLI
without importing ``kalm.cli`` itself (which mounts those CLIs: importing it from them would be a cycle)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from kalm.errors import KalmError

F = TypeVar("F", bound=Callable[..., Any])


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpcore", "urllib3", "botocore", "filelock"):  # one line per HTTP request
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_errors(fn: F) -> F:
    """Turn a KalmError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KalmError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except OSError as err:  # storage outages after retries: one line, not a traceback
            from kalm.storage import explain_s3_error

            typer.echo(f"error: {explain_s3_error(err, 'I/O failed')}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
