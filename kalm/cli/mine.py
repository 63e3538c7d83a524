"""``kalm mine``, ``kalm score`` and ``kalm stale``: the mining stage's commands (mounted at the top level
of ``kalm``). User mistakes print one line and exit 2.

    kalm mine --stage finetune --model minilm --recipe squad --recipe stsb
    kalm score --stage finetune --teacher minilm           # teacher scores + false-negative filter
    kalm stale --stage finetune --model stage:pretrain
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import ValidationError

from kalm.cli.common import DataRootOpt, setup_logging, user_errors
from kalm.core.config import format_validation_error
from kalm.core.errors import KalmError

app = typer.Typer(
    help="Hard-negative mining: encode, search, sample; resumable, cached, with lineage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])

StageOpt = typer.Option(..., "--stage", help="pretrain | finetune: mines mixtures/<stage>/<recipe>.")
ModelOpt = typer.Option(
    None, "--model", help="Folder, alias (minilm), hub id, or stage:pretrain (default: the config's model)."
)
ConfigOpt = typer.Option(None, "--config", help="Mining config YAML (default: configs/mine.yaml).")


def config_errors(fn: F) -> F:
    """A pydantic ValidationError (a config built from options) becomes a one-line KalmError."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValidationError as err:
            from kalm.mining.config import MineConfig

            raise KalmError(format_validation_error(err, MineConfig, "mining config")) from None

    return wrapper  # type: ignore[return-value]


@app.command("mine")
@user_errors
@config_errors
def mine(
    stage: str = StageOpt,
    model: str | None = ModelOpt,
    recipe: list[str] | None = typer.Option(None, "--recipe", help="Only this recipe (repeatable)."),
    config: str | None = ConfigOpt,
    data_root: str | None = DataRootOpt,
    force: bool = typer.Option(False, "--force", help="Mine again even when model, config and inputs match."),
) -> None:
    """Mine hard negatives for a stage's mixtures into mined/<stage>/<recipe>/ (a rerun resumes)."""
    setup_logging()
    from kalm.core.storage import DataRoot
    from kalm.mining.config import load_mine_config

    cfg = load_mine_config(config)  # config mistakes fail before torch is imported
    root = DataRoot.from_uri(data_root)
    from kalm.mining.mine import run_mine_stage
    from kalm.mining.report import report_markdown, stale_negatives

    results = run_mine_stage(root, stage, model or cfg.model, cfg, recipes=recipe or None, force=force)
    typer.echo(report_markdown(results, f"Mining report: {stage}"))
    fingerprint = results[0].lineage["miner"]["fingerprint"] if results else None
    stale = stale_negatives(root, stage, fingerprint) if fingerprint else []
    if stale:
        typer.echo(f"stale negatives (mined by another model): {', '.join(stale)}")


@app.command("score")
@user_errors
def score(
    stage: str = StageOpt,
    teacher: str | None = typer.Option(
        None, "--teacher", help="Teacher folder, alias, hub id or stage:<run> (default: the config's)."
    ),
    kind: str | None = typer.Option(
        None, "--kind", help="embedding | cross_encoder (default: the config's)."
    ),
    recipe: list[str] | None = typer.Option(None, "--recipe", help="Only this recipe (repeatable)."),
    config: str | None = typer.Option(
        None, "--config", help="Score config YAML (default: configs/score.yaml)."
    ),
    data_root: str | None = DataRootOpt,
    force: bool = typer.Option(
        False, "--force", help="Score again even when teacher, config and inputs match."
    ),
) -> None:
    """Score mined rows with a teacher into scored/<stage>/<recipe>/ and drop the negatives it calls false."""
    setup_logging()
    from kalm.core.config import with_updates
    from kalm.core.storage import DataRoot
    from kalm.mining.config import load_score_config

    cfg = load_score_config(config)
    updates = {k: v for k, v in (("teacher.model", teacher), ("teacher.kind", kind)) if v is not None}
    cfg = with_updates(cfg, updates, "score config") if updates else cfg
    root = DataRoot.from_uri(data_root)
    from kalm.mining.score import report_markdown, run_score_stage

    results = run_score_stage(root, stage, cfg, recipes=recipe or None, force=force)
    typer.echo(report_markdown(results, f"Teacher scores: {stage}"))


@app.command("stale")
@user_errors
@config_errors
def stale(
    stage: str = StageOpt,
    model: str | None = ModelOpt,
    config: str | None = ConfigOpt,
    data_root: str | None = DataRootOpt,
) -> None:
    """List recipes whose negatives were mined by a model other than MODEL (exit 0 either way)."""
    from kalm.core.storage import DataRoot
    from kalm.mining.config import load_mine_config

    cfg = load_mine_config(config)
    root = DataRoot.from_uri(data_root)
    from kalm.mining.encode import miner_fingerprint
    from kalm.mining.report import stale_negatives

    fp = miner_fingerprint(model or cfg.model, root)
    names = stale_negatives(root, stage, fp)
    typer.echo(
        f"model fingerprint {fp}: " + (f"stale: {', '.join(names)}" if names else "no stale negatives")
    )
