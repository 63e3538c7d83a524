"""``kalm eval``, ``kalm soup``, ``kalm compare`` and ``kalm eval-tasks``: the evaluation stage's commands.

Mounted into the main CLI with ``app.add_typer(eval_app)`` (no name: the commands join the top level).
User mistakes print one line and exit 2 (``kalm.cli.common.user_errors``).

    kalm eval --model out/soup --tasks STSBenchmark --local-config my_tasks.yaml --dims 256 --dims 128
    kalm soup --method uniform --out out/soup out/ft-seed1 out/ft-seed2
    kalm soup --method greedy --out out/soup --config configs/eval.yaml out/ft-seed*
    kalm compare --model base=models/base --model soup=out/soup --local-config my_tasks.yaml
    kalm eval-tasks --data-root ./data     # demo local tasks: held-out rows + stdlib docstrings
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from kalm.cli.common import DataRootOpt, setup_logging, user_errors
from kalm.core.errors import KalmError

eval_app = typer.Typer(
    help="Model soup and MTEB evaluation.", no_args_is_help=True, pretty_exceptions_enable=False
)


ConfigOpt = typer.Option(None, "--config", help="Eval config YAML (default: configs/eval.yaml).")
LocalConfigOpt = typer.Option(
    None, "--local-config", help="YAML with `local_tasks: [...]`; replaces the config's local tasks."
)
TasksOpt = typer.Option(
    None,
    "--tasks",
    help="Run only these (repeatable): mteb task or benchmark names, e.g. STSBenchmark or 'MTEB(eng, v1)', "
    "or names of the config's local tasks. Default: the config's tasks and local tasks.",
)
DimsOpt = typer.Option(None, "--dims", help="Matryoshka dim scored besides the full one (repeatable).")


def _setup() -> None:
    setup_logging()
    # mteb and datasets narrate every step and draw progress bars; our own log lines say what matters
    for name in ("mteb", "sentence_transformers", "datasets", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, once per model load
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def _local(local_config: Path | None) -> Any:
    from kalm.evaluation.config import load_local_tasks

    return load_local_tasks(local_config) if local_config else None


@eval_app.command("eval")
@user_errors
def eval_cmd(
    model: Path = typer.Option(..., "--model", help="A sentence-transformers model folder."),
    tasks: list[str] | None = TasksOpt,
    local_config: Path | None = LocalConfigOpt,
    config: Path | None = ConfigOpt,
    dims: list[int] | None = DimsOpt,
    data_root: str | None = DataRootOpt,
    output_dir: str | None = typer.Option(
        None, "--output-dir", help="Results folder (default: <data root>/eval/<model fingerprint>)."
    ),
    device: list[str] | None = typer.Option(
        None, "--device", help="Device(s), e.g. cpu or cuda:1 (repeatable)."
    ),
    force: bool = typer.Option(False, help="Recompute results that are already stored."),
) -> None:
    """Evaluate a model on mteb tasks/benchmarks and local tasks at each dim; print the summary table.

    Stored results whose inputs are unchanged are reused (--force recomputes). Offline, mteb tasks whose
    data is not in the Hugging Face cache stop the run up front, all named in one line.
    """
    _setup()
    from kalm.evaluation.report import summary_markdown, summary_table
    from kalm.evaluation.results import run_eval_config

    res = run_eval_config(
        model,
        config,
        data_root=data_root,
        tasks=tasks or None,
        local_tasks=_local(local_config),
        dims=dims or None,
        output_dir=output_dir,
        force=force,
        devices=device or None,
    )
    typer.echo(summary_markdown(summary_table(res.rows), f"Evaluation of {model}"))
    typer.echo(f"results: {res.output} ({res.new} computed, {res.reused} reused)")


@eval_app.command("soup")
@user_errors
def soup_cmd(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoint folders (sentence-transformers format)."),
    method: str = typer.Option("uniform", "--method", help="uniform | weighted | greedy"),
    out: Path = typer.Option(..., "--out", help="Output model folder."),
    weight: list[float] | None = typer.Option(
        None, "--weight", help="Weight per checkpoint (weighted; repeat)."
    ),
    config: Path | None = ConfigOpt,
    local_config: Path | None = typer.Option(
        None, "--local-config", help="Local tasks YAML for the dev score (instead of the config's dev tasks)."
    ),
    dev_task: list[str] | None = typer.Option(
        None, "--dev-task", help="mteb task for the dev score (repeatable; offline: data must be cached)."
    ),
    data_root: str | None = DataRootOpt,
    force: bool = typer.Option(False, help="Rebuild even when an identical soup exists."),
    base: str | None = typer.Option(
        None,
        "--base",
        help="Merge the soup with this model (folder or alias, e.g. minilm): the model training began from.",
    ),
    base_weight: float = typer.Option(
        0.0, "--base-weight", help="Weight of --base in the result, in [0, 1)."
    ),
) -> None:
    """Average checkpoints into one model folder (+ soup.json recording inputs, weights, dev scores).

    greedy: best candidate first, each other one kept only if the dev score does not drop (dev tasks: the
    config's dev_tasks, or --dev-task/--local-config). uniform/weighted: dev scores are recorded only when
    --dev-task or --local-config is given. An identical existing soup is reused unless --force.
    """
    _setup()
    from kalm.evaluation.soup import SOUP_METHODS, run_soup

    if method not in SOUP_METHODS:
        raise KalmError(f"unknown --method {method!r} (allowed: {', '.join(SOUP_METHODS)})")
    dev_score = None
    specs = _local(local_config)
    if method == "greedy" or specs is not None or dev_task:
        from kalm.evaluation.config import load_eval_config
        from kalm.evaluation.scoring import DevScorer, dev_scorer_from_config

        cfg = load_eval_config(config)
        if specs is not None or dev_task:
            dev_score = DevScorer(
                dev_task or [],
                specs or [],
                instructions=cfg.instructions,
                batch_size=cfg.batch_size,
                max_seq_length=cfg.max_seq_length,
            )
        else:
            dev_score = dev_scorer_from_config(cfg, data_root)
    from kalm.training.config import resolve_model_path

    base_path = resolve_model_path(base) if base else None
    rec = run_soup(
        method,
        checkpoints,
        out,
        weights=weight or None,
        dev_score=dev_score,
        force=force,
        base=base_path,
        base_weight=base_weight,
    )
    state = "up to date" if rec.cached else "written"
    weights = ", ".join(f"{w:.3f}" for w in rec.manifest["weights"])
    typer.echo(f"soup {method} of {len(checkpoints)} checkpoints {state}: {out} (weights {weights})")
    typer.echo(f"fingerprint {rec.manifest['fingerprint']}; record {out / 'soup.json'}")


@eval_app.command("compare")
@user_errors
def compare_cmd(
    model: list[str] = typer.Option(..., "--model", help="LABEL=PATH of a model folder (repeatable)."),
    tasks: list[str] | None = TasksOpt,
    local_config: Path | None = LocalConfigOpt,
    config: Path | None = ConfigOpt,
    dims: list[int] | None = DimsOpt,
    data_root: str | None = DataRootOpt,
    baseline: str | None = typer.Option(
        None, "--baseline", help="Label the delta column subtracts (default: base, else the first label)."
    ),
    target: str | None = typer.Option(
        None, "--target", help="Label the delta column compares (default: soup, else the last label)."
    ),
    device: list[str] | None = typer.Option(
        None, "--device", help="Device(s), e.g. cpu or cuda:1 (repeatable)."
    ),
    force: bool = typer.Option(False, help="Recompute results that are already stored."),
) -> None:
    """Evaluate several models on the same tasks (stored results are reused) and write ONE comparison:
    Markdown (with a target - baseline column), Parquet and a PNG bar chart per task type."""
    _setup()
    from kalm.evaluation.compare import compare_models

    models: dict[str, str] = {}
    for item in model:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise KalmError(f"--model takes LABEL=PATH, got {item!r}")
        if label in models:
            raise KalmError(f"label {label!r} given twice")
        models[label] = path
    cmp = compare_models(
        models,
        config,
        data_root,
        tasks=tasks or None,
        local_tasks=_local(local_config),
        dims=dims or None,
        force=force,
        devices=device or None,
        baseline=baseline,
        target=target,
    )
    typer.echo(cmp.markdown)
    typer.echo(f"table: {cmp.table_path}")
    typer.echo(f"charts: {', '.join(cmp.charts)}")
    typer.echo(f"results: {cmp.new} computed, {cmp.reused} reused")


@eval_app.command("eval-tasks")
@user_errors
def eval_tasks_cmd(
    data_root: str | None = DataRootOpt,
    out: Path | None = typer.Option(
        None, "--out", help="Local-tasks YAML to write (default: <data root>/eval_data/local_tasks.yaml)."
    ),
    per_label: int = typer.Option(40, help="Docstrings per stdlib package (half train, half test)."),
    max_labels: int | None = typer.Option(None, help="Keep only the N largest packages."),
    force: bool = typer.Option(False, help="Rebuild the stdlib docstring task even if it exists."),
) -> None:
    """Build demo local tasks: retrieval over held-out rows, stdlib-docstring classification."""
    _setup()
    import yaml

    from kalm.core.storage import DataRoot
    from kalm.evaluation.local_tasks import build_stdlib_docstring_task, holdout_task_specs

    root = DataRoot.from_uri(data_root)
    specs = holdout_task_specs(root)
    specs.append(build_stdlib_docstring_task(root, per_label=per_label, max_labels=max_labels, force=force))
    text = yaml.safe_dump(
        {"local_tasks": [s.model_dump(exclude_defaults=True) for s in specs]},
        sort_keys=False,
        allow_unicode=True,
    )
    if out is None:
        from kalm.core.layout import eval_data_dir

        root.write_bytes(eval_data_dir("local_tasks.yaml"), text.encode("utf-8"))
        where = root.full_uri(eval_data_dir("local_tasks.yaml"))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        where = str(out)
    for s in specs:
        typer.echo(f"{s.name:44} {s.type:15} {s.path}")
    typer.echo(f"wrote {where}; next: kalm eval --model PATH --local-config {where}")


@eval_app.command("push")
@user_errors
def push_cmd(
    folder: Path = typer.Argument(..., help="A model folder: a run's final/ or a soup (with its README.md)."),
    repo_id: str = typer.Argument(..., help="The Hub repo, owner/name; created if missing."),
    public: bool = typer.Option(False, "--public", help="Create the repo public (default: private)."),
    revision: str | None = typer.Option(None, help="Branch to push to (default: main)."),
    message: str | None = typer.Option(None, "--message", help="Commit message."),
) -> None:
    """Upload a model folder to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`; never printed)."""
    setup_logging()
    from kalm.evaluation.hub import push_model

    url = push_model(folder, repo_id, private=not public, revision=revision, commit_message=message)
    typer.echo(f"pushed {folder} -> {url}")
