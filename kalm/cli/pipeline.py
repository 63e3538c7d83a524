"""``kalm retrain``, ``kalm demo`` and ``kalm server``: the whole DAG as a Prefect flow, and the UI."""

from __future__ import annotations

import os
from typing import Any

import typer

from kalm.cli.common import (
    DataRootOpt,
    RecipesDirOpt,
    connect_prefect,
    resolved_dirs,
    root_str,
    setup_logging,
    user_errors,
)
from kalm.core.config import HF_OFFLINE_VARS

PipelineOpt = typer.Option("pipeline_demo.yaml", "--config", help="Pipeline YAML (path or name in configs/).")


def _check(config: str, data_root: str, recipes_dirs: list[str]) -> None:
    """Parse the pipeline and every stage config it names once, here: a typo fails in one line before the
    Prefect server starts."""
    from kalm.pipeline.config import load_pipeline
    from kalm.pipeline.dag import select_recipes

    select_recipes(load_pipeline(config, data_root, recipes_dirs))


@user_errors
def retrain_cmd(
    config: str = PipelineOpt,
    data_root: str | None = DataRootOpt,
    stage: list[str] | None = typer.Option(
        None,
        "--stage",
        help="Only these stages (repeatable): ingest mine pretrain refresh score finetune soup eval",
    ),
    recipe: list[str] | None = typer.Option(None, "--recipe", help="Only (re)ingest these recipes."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Recompute every selected stage."),
    recipes_dir: list[str] | None = RecipesDirOpt,
) -> None:
    """Run the full retraining DAG (a Prefect flow): ingest -> mine -> pretrain -> refresh -> score ->
    finetune -> soup -> eval. Unchanged stages are cache hits."""
    setup_logging()
    from kalm.pipeline.dag import check_stages

    check_stages(stage)
    root, dirs = root_str(data_root), resolved_dirs(recipes_dir)
    _check(config, root, dirs)
    connect_prefect(root)
    from kalm.orchestration.flows import retrain_flow

    out = retrain_flow(
        config=config,
        stages=stage or None,  # type: ignore[arg-type]
        recipes=recipe or None,
        data_root=root,
        resume=not no_resume,
        recipes_dirs=dirs,
    )
    print_run(out)


def print_run(out: dict[str, Any]) -> None:
    from kalm.pipeline.report import stage_table_markdown

    typer.echo("\n" + stage_table_markdown(out))
    md = (out.get("scores") or {}).get("markdown")
    if md:
        typer.echo("\n" + md)
    typer.echo(f"\nrun manifest: {out.get('manifest_uri')}")


@user_errors
def demo(
    data_root: str | None = DataRootOpt, force: bool = typer.Option(False, help="Rebuild everything.")
) -> None:
    """Run the whole DAG on its embedded default (configs/pipeline_demo.yaml: the offline demo recipes,
    all-MiniLM-L6-v2, two fine-tuning seeds, a soup, local evaluation). A second run is all cache hits.
    Runs offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1 unless set): the demo needs nothing from the Hub."""
    for var in HF_OFFLINE_VARS:
        os.environ.setdefault(var, "1")
    setup_logging()
    root = root_str(data_root)
    _check("pipeline_demo.yaml", root, [])
    connect_prefect(root)
    from kalm.orchestration.flows import retrain_flow

    print_run(retrain_flow(config="pipeline_demo.yaml", data_root=root, resume=not force))


@user_errors
def server_cmd(
    config: str = PipelineOpt,
    data_root: str | None = DataRootOpt,
    port: int = typer.Option(4200, help="Port of the local server (when none runs)."),
) -> None:
    """Start a local Prefect server on 127.0.0.1 (unless PREFECT_API_URL answers), register the deployments
    (retrain on the config's cron, rerun-recipe, evaluate) and run their flow runs until Ctrl-C."""
    setup_logging()
    from kalm.orchestration.server import ensure_server, serve_deployments, state_dir_for, stop_server

    root = root_str(data_root)
    state = state_dir_for(root)
    api, proc = ensure_server(state, port)
    os.environ["PREFECT_API_URL"] = api
    typer.echo(f"Prefect UI: {api.removesuffix('/api')}  (deployments: retrain, rerun-recipe, evaluate)")
    try:
        serve_deployments(config, root)
    finally:
        if proc is not None:
            stop_server(state, proc)


@user_errors
def deploy_cmd(
    data_root: str | None = DataRootOpt,
    create_pools: bool = typer.Option(
        False, "--create-pools", help="Create the missing process pools first."
    ),
) -> None:
    """Deploy infra/prefect.yaml (pool kalm-local) and infra/prefect-gpu.yaml (pool kalm-gpu) to the data
    root's kalm server (or PREFECT_API_URL): every deployment whose work pool exists; the others are named
    with the command that creates their pool. Then: prefect worker start --pool kalm-local."""
    setup_logging()
    from kalm.core.errors import KalmError
    from kalm.orchestration.pools import deploy_pools
    from kalm.orchestration.server import api_healthy, root_server, state_dir_for

    root = root_str(data_root)
    api = os.environ.get("PREFECT_API_URL")
    if api and not api_healthy(api):
        raise KalmError(f"PREFECT_API_URL={api} does not answer /health")
    api = api or root_server(state_dir_for(root))  # answers, or None
    if not api:
        raise KalmError(
            "no Prefect server to deploy to: start `kalm server` for this data root, or set PREFECT_API_URL"
        )
    report = deploy_pools(api, create_pools)
    for line in report.lines():
        typer.echo(line)
    pools = sorted({d.pool for d in report.deployed})
    if pools:
        typer.echo("run them with a worker: " + "; ".join(f"prefect worker start --pool {p}" for p in pools))


@user_errors
def ablate_cmd(
    config: str = PipelineOpt,
    data_root: str | None = DataRootOpt,
    variant: list[str] | None = typer.Option(
        None,
        "--variant",
        help="Only these (repeatable): full, no focal, no mixing, no masking, no distillation, pretraining "
        "(the opposite of the pipeline's choice) (default: all).",
    ),
    recipes_dir: list[str] | None = RecipesDirOpt,
) -> None:
    """Fine-tune with each of focal weighting, hard-negative mixing, false-negative masking and distillation
    switched off in turn (the soup: its first seed alone; pre-training: the opposite of the pipeline's
    choice), score every variant on the eval config's tasks, print one
    table (also <root>/pipeline/<name>/ablation.md). Plain calls, no Prefect; finished runs are reused."""
    setup_logging()
    from kalm.core.errors import KalmError
    from kalm.pipeline.ablate import VARIANTS, run_ablation
    from kalm.pipeline.config import load_pipeline
    from kalm.pipeline.runner import LocalRunner

    unknown = sorted(set(variant or []) - set(VARIANTS))
    if unknown:
        raise KalmError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    chosen = {k: v for k, v in VARIANTS.items() if not variant or k in variant or k == "full"}
    p = load_pipeline(config, root_str(data_root), resolved_dirs(recipes_dir))
    out = run_ablation(p, LocalRunner(), chosen)
    typer.echo(out["markdown"])
    typer.echo(f"table: {out['table_path']}")
