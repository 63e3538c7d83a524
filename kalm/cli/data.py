"""``kalm data``: list, scaffold, check and run category sources (data recipes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from kalm.core.errors import KalmError

if TYPE_CHECKING:
    from kalm.data.recipes import RecipeSet

data_app = typer.Typer(
    help="Category sources (data recipes): list, scaffold, check, run.", no_args_is_help=True
)
ConfigOpt = typer.Option(None, "--config", help="Ingest config YAML (default: configs/ingest.yaml).")


def _discover(recipes_dir: list[str] | None, wanted: str | None = None) -> RecipeSet:
    """The recipes, discovered once for this command; broken files are reported on stderr, one line each
    (except the one asked for: using it fails with its error)."""
    from kalm.data.recipes import discover

    found = discover(resolved_dirs(recipes_dir))
    for line in found.problems([wanted] if wanted else []):
        typer.echo(f"warning: {line}", err=True)
    return found


@data_app.command("list")
@user_errors
def data_list(data_root: str | None = DataRootOpt, recipes_dir: list[str] | None = RecipesDirOpt) -> None:
    """List recipes: name, category, stage, task type, source format and rows last built. Broken recipe
    files are listed on stderr (and left out); the command still succeeds."""
    from kalm.core.layout import shard_dir
    from kalm.core.storage import DataRoot, read_manifest

    found = _discover(recipes_dir)
    root = DataRoot.from_uri(data_root)
    header = f"{'name':28} {'category':16} {'stage':9} {'task type':20} {'format':12} {'rows':>9}  built"
    typer.echo(header)
    for name, lr in found.items():
        r = lr.recipe
        m = read_manifest(root, shard_dir(r.stage, name))
        rows, built = (str(m.get("rows_out", "?")), str(m.get("created_at", "?"))) if m else ("-", "never")
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
    import yaml

    from kalm.core.config import load_model
    from kalm.data.recipes import NAME_RE, Recipe

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
    from kalm.data.check import check_recipe
    from kalm.data.config import load_ingest_config

    setup_logging()
    lr = _discover(recipes_dir, name).get(name)
    rows, res = check_recipe(lr, load_ingest_config(config))
    m = res.manifest
    typer.echo(
        f"{name}: {m['rows_in']} sample records -> {m['rows_out']} rows; drops: {m['drops'] or 'none'}"
    )
    for row in rows[:show]:
        typer.echo(json.dumps(row, ensure_ascii=False)[:600])
    typer.echo("ok")


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
    executor: str | None = typer.Option(
        None, help="single | local | ray (default: the ingest config's executor.kind)."
    ),
    workers: int | None = typer.Option(None, help="Processes (local) or Ray CPUs (ray)."),
    ray_address: str | None = typer.Option(
        None,
        help="Join a running Ray cluster (auto, ray://host:10001); else $KALM_RAY_ADDRESS, else a local Ray.",
    ),
) -> None:
    """Ingest one recipe (and rebuild its stage mixture) or all recipes, through the Prefect flows."""
    setup_logging()
    if (name is None) == (not all_):
        raise KalmError("give a recipe NAME or --all (not both)")
    if stage is not None and stage not in ("pretrain", "finetune"):
        raise KalmError(f"invalid --stage {stage!r} (allowed: pretrain, finetune)")
    from kalm.core.results import StageResult
    from kalm.data.config import load_ingest_config
    from kalm.data.report import data_report_markdown

    dirs = resolved_dirs(recipes_dir)
    found = _discover(recipes_dir, name)
    cfg_path = str(Path(config).resolve()) if config else None
    from kalm.data.config import with_executor

    # config mistakes (and a bad --executor/--workers) fail before Prefect starts
    with_executor(load_ingest_config(cfg_path), executor, workers, ray_address)
    root = root_str(data_root)
    if name is not None:
        found.get(name)  # fail fast, before starting Prefect
    connect_prefect(root)
    kind: Any = executor  # validated above (with_executor); the flows take it as Literal["local", "ray"]
    if name is not None:
        from kalm.orchestration.flows import ingest_recipe_flow

        out = ingest_recipe_flow(name, root, dirs, cfg_path, force, kind, workers, ray_address)
    else:
        from kalm.orchestration.flows import ingest_stage_flow

        stages: Any = [stage] if stage else None  # checked above: pretrain or finetune
        out = ingest_stage_flow(
            stages, None, tag or None, root, dirs, cfg_path, force, kind, workers, ray_address
        )
    ingested = [StageResult(**r) for r in out["recipes"]]
    mixtures = [StageResult(**m) for m in out["mixtures"]]
    typer.echo(data_report_markdown("Data report", ingested, mixtures))
