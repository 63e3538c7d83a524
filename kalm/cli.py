"""The ``kalm`` command line. Every command has ``--help``; user mistakes print one line and exit 2."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from kalm.clikit import _setup_logging, user_errors
from kalm.errors import KalmError

# Prefect reads these at import time: keep them before any prefect import (all imports below are lazy).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "kalm,curation,training,mining,evaluation")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="kalm-pipeline: train compact text-embedding models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    help="Category sources (data recipes): list, scaffold, check, run.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])
DataRootOpt = typer.Option(
    None,
    "--data-root",
    help="Output root: a folder or s3://bucket/prefix (default: $KALM_DATA_ROOT or ./data).",
)
RecipesDirOpt = typer.Option(
    None, "--recipes-dir", help="Extra recipe folder (repeatable; also $KALM_RECIPES_PATH)."
)
ConfigOpt = typer.Option(None, "--config", help="Ingest config YAML (default: configs/ingest.yaml).")


@data_app.command("list")
@user_errors
def data_list(data_root: str | None = DataRootOpt, recipes_dir: list[str] | None = RecipesDirOpt) -> None:
    """List recipes: name, category, stage, task type, source format and rows last built."""
    from kalm.recipes import discover
    from kalm.storage import MANIFEST, DataRoot

    root = DataRoot.from_uri(data_root)
    recipes = discover(recipes_dir or [])
    header = f"{'name':28} {'category':16} {'stage':9} {'task type':20} {'format':12} {'rows':>9}  built"
    typer.echo(header)
    for name, lr in recipes.items():
        r = lr.recipe
        rel = f"shards/{r.stage}/{name}/{MANIFEST}"
        rows, built = "-", "never"
        if root.exists(rel):
            m = root.read_json(rel)
            rows, built = str(m.get("rows_out", "?")), str(m.get("created_at", "?"))
        typer.echo(
            f"{name:28} {r.category:16} {r.stage:9} {r.task_type:20} {r.source.format:12} {rows:>9}  {built}"
        )


SAMPLE_LINES = [
    '{"question": "How do I reset my password?", "answer": "Open Settings, choose Account, then Reset '
    'password and follow the emailed link."}',
    '{"question": "Can I change the delivery address after ordering?", "answer": "Yes, until the order '
    'ships: open the order page and edit the address."}',
    '{"question": "What payment methods are accepted?", "answer": "Cards, bank transfer and vouchers are '
    'accepted at checkout."}',
    '{"question": "How long does a refund take?", "answer": "Refunds reach the original payment method '
    'within five working days of approval."}',
    '{"question": "Is there a student discount?", "answer": "Students get 20 percent off after verifying '
    'a university email address."}',
]


@data_app.command("new")
@user_errors
def data_new(
    name: str = typer.Argument(..., help="Recipe name (lowercase, digits, '_' or '-')."),
    directory: Path = typer.Option(Path("data_recipes"), "--dir", help="Folder to create the recipe in."),
    stage: str = typer.Option("finetune", help="pretrain | finetune"),
    task_type: str = typer.Option("retrieval", help="retrieval | sts | classification | ..."),
) -> None:
    """Scaffold NAME.yaml and samples/NAME.jsonl; replace the sample lines with 5-20 real ones."""
    from kalm.config import load_model
    from kalm.recipes import NAME_RE, Recipe

    if not NAME_RE.match(name):
        raise KalmError(f"invalid recipe name {name!r}: use lowercase letters, digits, '_' and '-'")
    yaml_path = directory / f"{name}.yaml"
    sample = directory / "samples" / f"{name}.jsonl"
    if yaml_path.exists() or sample.exists():
        raise KalmError(f"{yaml_path} or {sample} already exists")
    text = (
        f"name: {name}\ncategory: {name}\nstage: {stage}\ntask_type: {task_type}\nlanguage: en\n"
        f'source:\n  format: jsonl\n  path: "raw/{name}/*.jsonl"   # glob relative to this file, '
        f"absolute, s3://..., or a hub id with format: hf\n"
        "fields: {query: question, pos: answer}   # canonical column: source field\n"
        'instruction: "Given a question, retrieve the answer that addresses it"\n'
    )
    import yaml

    load_model(Recipe, yaml.safe_load(text), str(yaml_path))  # refuse to scaffold an invalid recipe
    sample.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(text, encoding="utf-8")
    sample.write_text("\n".join(SAMPLE_LINES) + "\n", encoding="utf-8")
    typer.echo(f"created {yaml_path}\ncreated {sample}\nnext: kalm data check {name}")


@data_app.command("check")
@user_errors
def data_check(
    name: str,
    recipes_dir: list[str] | None = RecipesDirOpt,
    config: str | None = ConfigOpt,
    show: int = typer.Option(3, help="How many canonical rows to print."),
) -> None:
    """Validate a recipe on its committed samples and print a few canonical rows."""
    _setup_logging()
    rows, manifest = check_recipe(name, recipes_dir or [], config)
    typer.echo(
        f"{name}: {manifest['rows_in']} sample records -> {manifest['rows_out']} rows; "
        f"drops: {manifest['drops'] or 'none'}"
    )
    import json

    for row in rows[:show]:
        typer.echo(json.dumps(row, ensure_ascii=False)[:600])
    typer.echo("ok")


def check_recipe(name: str, recipes_dirs: list[str], config: str | None) -> tuple[list[dict], dict]:
    """Run a recipe on its samples into a throwaway data root; raise KalmError when it yields nothing."""
    from curation.config import load_ingest_config
    from curation.ingest import run_ingest_recipe, shard_dir
    from curation.stage import read_rows
    from kalm.recipes import get_recipe
    from kalm.storage import DataRoot

    lr = get_recipe(name, recipes_dirs)
    sample = lr.sample_path()
    if not sample.exists():
        raise KalmError(f"recipe {name!r} has no samples: expected {sample} with 5-20 real source lines")
    cfg, _ = load_ingest_config(config)
    with tempfile.TemporaryDirectory(prefix="kalm-check-") as tmp:
        root = DataRoot.from_uri(tmp)
        res = run_ingest_recipe(lr, root, cfg, use_samples=True, force=True)
        rows = read_rows(root, shard_dir(lr.recipe.stage, name)).to_pylist()
    if res.manifest["rows_out"] == 0:
        raise KalmError(f"recipe {name!r} produced no rows from {sample}: drops {res.manifest['drops']}")
    return rows, res.manifest


@data_app.command("run")
@user_errors
def data_run(
    name: str | None = typer.Argument(None, help="Recipe name; omit with --all."),
    all_: bool = typer.Option(False, "--all", help="Every recipe (of --stage if given)."),
    stage: str | None = typer.Option(None, help="pretrain | finetune (with --all)."),
    tag: list[str] | None = typer.Option(None, "--tag", help="Only recipes with this tag (with --all)."),
    force: bool = typer.Option(False, help="Rebuild even when unchanged."),
    data_root: str | None = DataRootOpt,
    recipes_dir: list[str] | None = RecipesDirOpt,
    config: str | None = ConfigOpt,
) -> None:
    """Ingest one recipe (and rebuild its stage mixture) or all recipes, through the Prefect flows."""
    _setup_logging()
    if (name is None) == (not all_):
        raise KalmError("give a recipe NAME or --all (not both)")
    if stage is not None and stage not in ("pretrain", "finetune"):
        raise KalmError(f"invalid --stage {stage!r} (allowed: pretrain, finetune)")
    from kalm.recipes import get_recipe
    from kalm.reports import data_report_markdown

    dirs = [str(Path(d).resolve()) for d in (recipes_dir or [])]
    root = _root_str(data_root)
    if name is not None:
        get_recipe(name, dirs)  # fail fast, before starting Prefect
        from flows.ingest import ingest_recipe_flow

        out = ingest_recipe_flow(name, root, dirs, config, force)
    else:
        from flows.ingest import ingest_stage_flow

        out = ingest_stage_flow([stage] if stage else None, None, tag or None, root, dirs, config, force)
    typer.echo(data_report_markdown("Data report", out["recipes"], out["stages"]))


def _root_str(data_root: str | None) -> str:
    from kalm.storage import resolve_root

    r = resolve_root(data_root)
    return r if r.startswith("s3://") else str(Path(r).resolve())


@app.command("train")
@user_errors
def train_cmd(
    config: str = typer.Option(..., "--config", help="Stage config YAML, e.g. configs/pretrain_demo.yaml."),
    data_root: str | None = DataRootOpt,
    nproc: int | None = typer.Option(None, help="Processes per node (default: GPUs, else 1)."),
    launcher: str | None = typer.Option(None, help="auto | deepspeed | torchrun | single (default: config)."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a config key: KEY=VALUE (repeatable)."
    ),
) -> None:
    """Launch one training stage (DeepSpeed ZeRO-1/2); rerunning resumes from the newest checkpoint."""
    _setup_logging()
    from training.launch import run_training
    from training.train import parse_overrides

    final = run_training(
        config, _root_str(data_root), parse_overrides(set_ or []), nproc=nproc, launcher=launcher
    )
    typer.echo(f"final model: {final}")


PipelineOpt = typer.Option("pipeline_demo.yaml", "--config", help="Pipeline YAML (path or name in configs/).")


@app.command("retrain")
@user_errors
def retrain_cmd(
    config: str = PipelineOpt,
    data_root: str | None = DataRootOpt,
    stage: list[str] | None = typer.Option(
        None,
        "--stage",
        help="Only these stages (repeatable): ingest mine pretrain refresh finetune soup eval",
    ),
    recipe: list[str] | None = typer.Option(None, "--recipe", help="Only (re)ingest these recipes."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Recompute every selected stage."),
    recipes_dir: list[str] | None = RecipesDirOpt,
) -> None:
    """Run the full retraining DAG (a Prefect flow): ingest -> mine -> pretrain -> refresh -> finetune -> soup
    -> eval. Unchanged stages are cache hits."""
    _setup_logging()
    from flows.retrain import retrain_flow

    out = retrain_flow(
        config=config,
        stages=stage or None,
        recipes=recipe or None,
        data_root=_root_str(data_root),
        resume=not no_resume,
        recipes_dirs=recipes_dir or [],
    )
    _print_run(out)


def _print_run(out: dict[str, Any]) -> None:
    timings = out.get("timings_s", {})
    hits = out.get("cache_hits", {})
    typer.echo("\n| stage | seconds | cache hit |\n|---|---:|---|")
    for k, v in timings.items():
        typer.echo(f"| {k} | {v:.1f} | {'yes' if hits.get(k) else 'no'} |")
    typer.echo(f"| total | {out.get('seconds', 0):.1f} | |")
    md = (out.get("scores") or {}).get("markdown")
    if md:
        typer.echo("\n" + md)
    root = out.get("data_root", "")
    typer.echo(f"\nrun manifest: {root}/pipeline/{out.get('pipeline')}/latest.json")


@app.command("demo")
@user_errors
def demo(
    data_root: str | None = DataRootOpt, force: bool = typer.Option(False, help="Rebuild everything.")
) -> None:
    """Run the whole DAG on its embedded default (configs/pipeline_demo.yaml: the offline demo recipes,
    all-MiniLM-L6-v2, two fine-tuning seeds, a soup, local evaluation). A second run is all cache hits."""
    _setup_logging()
    from flows.retrain import retrain_flow

    out = retrain_flow(config="pipeline_demo.yaml", data_root=_root_str(data_root), resume=not force)
    _print_run(out)


@app.command("server")
@user_errors
def server_cmd(
    config: str = PipelineOpt,
    data_root: str | None = DataRootOpt,
    port: int = typer.Option(4200, help="Port of the local server (when none runs)."),
) -> None:
    """Start a local Prefect server on 127.0.0.1 (unless PREFECT_API_URL answers), register the deployments
    (retrain on the config's cron, rerun-recipe, evaluate) and run their flow runs until Ctrl-C."""
    _setup_logging()
    from flows.server import ensure_server, serve_deployments, state_dir_for

    root = _root_str(data_root)
    api, proc = ensure_server(state_dir_for(root), port)
    os.environ["PREFECT_API_URL"] = api
    typer.echo(f"Prefect UI: {api.removesuffix('/api')}  (deployments: retrain, rerun-recipe, evaluate)")
    try:
        serve_deployments(config, root)
    finally:
        if proc is not None:
            proc.terminate()


def _mount() -> None:
    """Stage packages bring their own commands (kept next to their code); they join the top level."""
    from evaluation.cli import eval_app
    from mining.cli import app as mine_app

    app.add_typer(mine_app)
    app.add_typer(eval_app)


_mount()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
