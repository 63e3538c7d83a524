"""What every ``kalm`` command shares: logging set-up, one-line user errors, the common options."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from kalm.core.errors import KalmError
from kalm.core.secrets import refuse_credentials, scrub

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("kalm.cli")

DataRootOpt = typer.Option(
    None,
    "--data-root",
    help="Output root: a folder or s3://bucket/prefix (default: $KALM_DATA_ROOT or ./data).",
)
RecipesDirOpt = typer.Option(
    None, "--recipes-dir", help="Extra recipe folder (repeatable; also $KALM_RECIPES_PATH)."
)


def setup_logging(verbose: bool = False) -> None:
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
            typer.echo(f"error: {scrub(str(err))}", err=True)
            raise typer.Exit(2) from None
        except OSError as err:  # storage outages after retries: one line, not a traceback
            from kalm.core.storage import explain_s3_error

            typer.echo(f"error: {scrub(explain_s3_error(err, 'I/O failed'))}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def root_str(data_root: str | None) -> str:
    """The data root as flows take it: an s3:// URI or an absolute local path."""
    from kalm.core.storage import resolve_root

    r = resolve_root(data_root)
    refuse_credentials(r, "data root")  # before any flow: its parameters are stored in Prefect's database
    return r if r.startswith("s3://") else str(Path(r).resolve())


def connect_prefect(root: str) -> None:
    """Send this command's flow runs to its data root's Prefect database (the ``kalm server`` UI): see
    :func:`kalm.orchestration.server.use_root_database`. Call before anything imports Prefect."""
    from kalm.orchestration.server import state_dir_for, use_root_database

    where = use_root_database(state_dir_for(root))
    if where == "ephemeral":
        log.info("Prefect: no kalm server of this data root runs; a temporary one over its database")
    elif where != "unchanged":
        log.info("Prefect: runs report to %s", where)


def resolved_dirs(dirs: list[str] | None) -> list[str]:
    return [str(Path(d).resolve()) for d in (dirs or [])]
