"""``kalm train``: launch one training stage (DeepSpeed ZeRO-1/2, torchrun or a single process)."""

from __future__ import annotations

import typer

from kalm.cli.common import DataRootOpt, setup_logging, user_errors


@user_errors
def train_cmd(
    config: str = typer.Option(..., "--config", help="Stage config YAML, e.g. configs/pretrain_demo.yaml."),
    data_root: str | None = DataRootOpt,
    nproc: int | None = typer.Option(None, min=1, help="Processes per node (default: GPUs, else 1)."),
    launcher: str | None = typer.Option(None, help="auto | deepspeed | torchrun | single (default: config)."),
    node_rank: int | None = typer.Option(
        None, "--node-rank", min=0, help="This node's rank in a torchrun multi-node job (launch.nnodes > 1)."
    ),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a config key: KEY=VALUE, VALUE in YAML (null, 5, [a, b]); repeatable."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace a finished model of another config under the same run_name (kept until the new one is"
        " done).",
    ),
) -> None:
    """Launch one training stage; rerunning resumes from the newest checkpoint. The config (with every
    --set applied) is validated once here; the workers read it back from <run>/config.yaml."""
    setup_logging()
    from kalm.core.config import parse_set
    from kalm.core.storage import DataRoot
    from kalm.training.config import load_train_config
    from kalm.training.launch import run_training

    updates = parse_set(set_ or [])
    if node_rank is not None:
        updates["launch.node_rank"] = node_rank
    cfg = load_train_config(config, updates)
    res = run_training(cfg, DataRoot.from_uri(data_root), nproc=nproc, launcher=launcher, overwrite=overwrite)
    typer.echo(f"final model: {res.output}{' (cache hit)' if res.cached else ''}")
