"""The ``kalm`` command line: the top floor of the package (nothing below imports it).

Every command has ``--help``; user mistakes print one line and exit 2. Commands live next to their stage:
``kalm.cli.data`` (``kalm data ...``), ``kalm.cli.train``, ``kalm.cli.mine`` (``kalm mine``, ``kalm stale``),
``kalm.cli.eval`` (``kalm eval``, ``soup``, ``compare``, ``eval-tasks``), ``kalm.cli.pipeline``
(``kalm retrain``, ``demo``, ``server``, ``ablate``). Heavy imports (torch, Prefect) happen inside the
commands, so ``kalm --help`` stays fast.
"""

from __future__ import annotations

import os

import typer

# Prefect reads these at import time: keep them before any prefect import (all imports below are lazy).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "kalm")
# kalm's lines outside a flow (checks before it starts) go to the terminal only, without a warning each
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kalm.core.secrets import install_log_scrubber  # noqa: E402

install_log_scrubber()  # before any logger is used: no credential in a log line, file or run log

from kalm.cli.data import data_app  # noqa: E402
from kalm.cli.eval import eval_app  # noqa: E402
from kalm.cli.mine import app as mine_app  # noqa: E402
from kalm.cli.pipeline import ablate_cmd, demo, deploy_cmd, retrain_cmd, server_cmd  # noqa: E402
from kalm.cli.train import train_cmd  # noqa: E402

app = typer.Typer(
    help="kalm-pipeline: train compact text-embedding models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.command("train")(train_cmd)
app.command("retrain")(retrain_cmd)
app.command("demo")(demo)
app.command("server")(server_cmd)
app.command("deploy")(deploy_cmd)
app.command("ablate")(ablate_cmd)
app.add_typer(mine_app)  # no name: ``kalm mine`` and ``kalm stale`` join the top level
app.add_typer(eval_app)  # ``kalm eval``, ``soup``, ``compare``, ``eval-tasks``


def main() -> None:
    app()
