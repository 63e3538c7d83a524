"""One comparison of several labelled models (base, each stage, the soup) on the same tasks: Parquet, Markdown
with a ``soup - base`` column, and a PNG bar chart per task type under ``<data root>/eval/compare/<key>/``.

>>> cmp = compare_models({"base": "models/minilm", "soup": "runs/soup/demo"}, "configs/eval.yaml")
>>> print(cmp.markdown); cmp.table_path  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from kalm.core.errors import KalmError
from kalm.core.hashing import hash_obj
from kalm.core.layout import compare_dir
from kalm.core.storage import DataRoot
from kalm.evaluation.checkpoints import check_model_folder
from kalm.evaluation.config import EvalConfig, LocalTaskSpec, load_eval_config
from kalm.evaluation.mteb_tasks import select_tasks
from kalm.evaluation.report import comparison_markdown, comparison_table, plot_comparison, summary_table
from kalm.evaluation.results import EvalResult, run_eval_config

log = logging.getLogger(__name__)


@dataclass
class Comparison:
    """One comparison table of several labelled models (base, each stage, soup), as written.

    ``output``: the folder (local path or ``s3://`` URI) holding ``compare.parquet`` (``table_path``),
    ``compare.md`` (``markdown_path``) and one PNG bar chart per task type (``charts``).
    """

    table: pa.Table  # COMPARISON_SCHEMA, long format: one row per (label, task, dim)
    markdown: str
    output: str
    table_path: str
    markdown_path: str
    charts: list[str]
    models: dict[str, str] = field(default_factory=dict)  # label -> model path
    fingerprints: dict[str, str] = field(default_factory=dict)  # label -> model fingerprint
    baseline: str | None = None
    target: str | None = None
    reused: int = 0  # results taken from storage, over all models
    new: int = 0  # results computed by this call

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: what a Prefect task returns and a run manifest records."""
        return {
            "markdown": self.markdown,
            "output": self.output,
            "table_path": self.table_path,
            "markdown_path": self.markdown_path,
            "charts": list(self.charts),
            "rows": self.table.to_pylist(),
            "models": dict(self.models),
            "fingerprints": dict(self.fingerprints),
            "baseline": self.baseline,
            "target": self.target,
            "results_reused": self.reused,
            "results_new": self.new,
            "reused": self.new == 0,
        }


def _pick_labels(labels: Sequence[str], baseline: str | None, target: str | None) -> tuple[str, str] | None:
    """(baseline, target) of the delta column: by default ``base`` (else the first label) vs ``soup``
    (else the last label); None with fewer than two labels."""
    if len(labels) < 2:
        return None
    base = baseline or ("base" if "base" in labels else labels[0])
    tgt = target or ("soup" if "soup" in labels else labels[-1])
    for name in (base, tgt):
        if name not in labels:
            raise KalmError(f"unknown label {name!r} for the comparison (labels: {', '.join(labels)})")
    return (base, tgt) if base != tgt else None


def compare_results(
    results: Mapping[str, EvalResult | pa.Table],
    out: DataRoot,
    rel: str = "eval/compare",
    *,
    baseline: str | None = None,
    target: str | None = None,
) -> Comparison:
    """Stack several models' summaries (``{label: result}``) into compare.parquet, compare.md and PNG charts.

    Only (task, dim) pairs evaluated for a label are shown for it; missing ones print as ``-``. The
    Markdown adds a column ``target - baseline`` (default: soup - base).
    """
    # an EvalResult contributes this run's rows only, not every result ever stored for its model
    tables = {lb: summary_table(r.rows) if isinstance(r, EvalResult) else r for lb, r in results.items()}
    pair = _pick_labels(list(tables), baseline, target)
    table = comparison_table(tables)
    md = comparison_markdown(table, delta=pair)
    out.write_parquet(f"{rel}/compare.parquet", table)
    out.write_bytes(f"{rel}/compare.md", md.encode("utf-8"))
    charts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kalm-charts-") as tmp:
        for png in plot_comparison(table, tmp):
            out.write_bytes(f"{rel}/{png.name}", png.read_bytes())
            charts.append(out.full_uri(f"{rel}/{png.name}"))
    evals = {lb: r for lb, r in results.items() if isinstance(r, EvalResult)}
    return Comparison(
        table=table,
        markdown=md,
        output=out.full_uri(rel),
        table_path=out.full_uri(f"{rel}/compare.parquet"),
        markdown_path=out.full_uri(f"{rel}/compare.md"),
        charts=charts,
        models={lb: r.model_path for lb, r in evals.items()},
        fingerprints={lb: r.fingerprint for lb, r in evals.items()},
        baseline=pair[0] if pair else None,
        target=pair[1] if pair else None,
        reused=sum(r.reused for r in evals.values()),
        new=sum(r.new for r in evals.values()),
    )


def compare_models(
    models: Mapping[str, str | Path],
    config: EvalConfig | str | Path | None = None,
    data_root: str | None = None,
    *,
    tasks: Sequence[str] | None = None,
    local_tasks: Sequence[LocalTaskSpec] | None = None,
    dims: Sequence[int] | None = None,
    force: bool = False,
    devices: Sequence[str] | None = None,
    baseline: str | None = None,
    target: str | None = None,
) -> Comparison:
    """Evaluate each labelled model (``{"base": path, "finetune": path, "soup": path}``) on the same tasks,
    reusing stored results, and write ONE comparison under ``<data root>/<output>/compare/<key>/`` (key: a
    hash of the labels' fingerprints, the tasks and the dims): Markdown with a ``soup - base`` column,
    Parquet, a PNG bar chart per task type.

    Every model folder is checked before anything is evaluated (a missing one fails first, in one line).

    >>> cmp = compare_models({"base": "models/minilm", "soup": "runs/soup/demo"}, "configs/eval.yaml")
    >>> print(cmp.markdown); cmp.table_path  # doctest: +SKIP
    """
    if not models:
        raise KalmError("compare needs at least one model (label=PATH)")
    for p in models.values():
        check_model_folder(p)
    _pick_labels(list(models), baseline, target)  # a bad label fails before any evaluation
    cfg = config if isinstance(config, EvalConfig) else load_eval_config(config)
    names, specs = select_tasks(cfg, data_root, tasks, local_tasks)  # once, for every model
    results = {
        label: run_eval_config(
            p,
            cfg,
            data_root=data_root,
            tasks=names,
            local_tasks=specs,
            dims=dims,
            force=force,
            devices=devices,
        )
        for label, p in models.items()
    }
    key = hash_obj(
        {
            "models": {lb: r.fingerprint for lb, r in results.items()},
            "tasks": sorted({r["task"] for res in results.values() for r in res.rows}),
            "dims": sorted({r["dim"] for res in results.values() for r in res.rows}),
        },
        n=12,
    )
    cmp = compare_results(
        results, DataRoot.from_uri(data_root), compare_dir(key, cfg.output), baseline=baseline, target=target
    )
    log.info(
        "comparison of %s: %d new results, %d reused -> %s", list(models), cmp.new, cmp.reused, cmp.output
    )
    return cmp
