"""Result tables: one summary per model (keyed by fingerprint) and comparisons across models.

A summary row is one (model, task, dim) with mteb's main score; the schema is declared once
(``SUMMARY_SCHEMA``) and every Parquet file is written with it. Comparisons stack summaries with a
``label`` column (``base``, ``pretrain``, ``finetune``, ``soup``...) and render Markdown plus one PNG bar
chart per task type.

>>> t = summary_table([{"model": "m", "task": "STSBenchmark", "task_type": "STS", "dim": 384,
...                     "main_score": 0.81, ...}])  # doctest: +SKIP
>>> print(summary_markdown(t, "m"))  # doctest: +SKIP
| task | type | metric | d384 |
|---|---|---|---:|
| STSBenchmark | STS | cosine_spearman | 81.00 |
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)

SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("model_path", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("task_type", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # mteb | local
        pa.field("dim", pa.int32(), nullable=False),
        pa.field("main_score", pa.float64(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("instruction", pa.string(), nullable=True),
        pa.field("instruction_source", pa.string(), nullable=False),
        pa.field("instructions_version", pa.string(), nullable=False),
        pa.field("dataset_revision", pa.string(), nullable=False),
        pa.field("mteb_version", pa.string(), nullable=False),
        pa.field("evaluated_at", pa.string(), nullable=False),
    ]
)
COMPARISON_SCHEMA = pa.schema([pa.field("label", pa.string(), nullable=False), *SUMMARY_SCHEMA])


def summary_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows -> a table with ``SUMMARY_SCHEMA`` (extra keys ignored), sorted by task type, task, dim desc."""
    ordered = sorted(rows, key=lambda r: (r["task_type"], r["task"], -int(r["dim"])))
    return pa.Table.from_pylist(
        [{k: r.get(k) for k in SUMMARY_SCHEMA.names} for r in ordered], SUMMARY_SCHEMA
    )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def summary_markdown(table: pa.Table, title: str) -> str:
    """One line per task, one column per dim, scores x100 (mteb convention), then a mean per task type."""
    rows = table.to_pylist()
    dims = sorted({r["dim"] for r in rows}, reverse=True)
    by_task: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for r in rows:
        by_task[(r["task_type"], r["task"], r["metric"])][r["dim"]] = r["main_score"]
    fp = rows[0]["fingerprint"] if rows else "-"
    lines = [
        f"# {title}",
        "",
        f"fingerprint `{fp}`; scores are mteb main scores x100",
        "",
        "| task | type | metric | " + " | ".join(f"d{d}" for d in dims) + " |",
        "|---|---|---|" + "---:|" * len(dims),
    ]
    for (ttype, task, metric), scores in sorted(by_task.items()):
        lines.append(
            f"| {task} | {ttype} | {metric} | " + " | ".join(_pct(scores.get(d)) for d in dims) + " |"
        )
    types = sorted({k[0] for k in by_task})
    for ttype in types + ["all tasks"]:
        group = [s for k, s in by_task.items() if ttype in (k[0], "all tasks")]
        if len(group) < 2:  # a mean of one task repeats its line
            continue
        means = []
        for d in dims:
            vals = [s[d] for s in group if d in s]
            means.append(_pct(sum(vals) / len(vals)) if vals else "-")
        lines.append(f"| **mean {ttype}** | | | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def type_means_markdown(rows_by_label: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """One row per (model, dim), one column per task type (its tasks' mean main score x100), then the
    mean over all tasks: the overview a UI table shows first. Only tasks every model was scored on count.

    >>> r = [{"task": "A", "task_type": "STS", "dim": 8, "main_score": 0.5},
    ...      {"task": "B", "task_type": "Retrieval", "dim": 8, "main_score": 0.25}]
    >>> print(type_means_markdown({"m": r}))
    | model | dim | Retrieval | STS | mean (2 tasks) |
    |---|---:|---:|---:|---:|
    | m | 8 | 25.00 | 50.00 | 37.50 |
    <BLANKLINE>
    """
    # only (task, dim) pairs every model was scored on, so that each row averages the same tasks
    keys = [{(r["task"], int(r["dim"])) for r in rows} for rows in rows_by_label.values()]
    common = set.intersection(*keys) if keys else set()
    rows_by_label = {
        lb: [r for r in rows if (r["task"], int(r["dim"])) in common] for lb, rows in rows_by_label.items()
    }
    every = [r for rows in rows_by_label.values() for r in rows]
    types = sorted({str(r["task_type"]) for r in every})
    n_tasks = len({r["task"] for r in every})
    lines = [
        "| model | dim | " + " | ".join(types) + f" | mean ({n_tasks} task{'' if n_tasks == 1 else 's'}) |",
        "|---|---:|" + "---:|" * (len(types) + 1),
    ]
    for label, rows in rows_by_label.items():
        for dim in sorted({int(r["dim"]) for r in rows}, reverse=True):
            at = [r for r in rows if int(r["dim"]) == dim]
            cells = []
            for t in types:
                vals = [float(r["main_score"]) for r in at if r["task_type"] == t]
                cells.append(_pct(sum(vals) / len(vals)) if vals else "-")
            mean = _pct(sum(float(r["main_score"]) for r in at) / len(at)) if at else "-"
            lines.append(f"| {_cell(label)} | {dim} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no newline (it would end the row), no bare pipe."""
    return " ".join(str(text).split()).replace("|", "\\|")


def comparison_table(summaries: Mapping[str, pa.Table]) -> pa.Table:
    """``{label: summary table}`` -> one long table with a ``label`` column (``COMPARISON_SCHEMA``)."""
    rows = []
    for label, table in summaries.items():
        rows += [{"label": label, **r} for r in table.to_pylist()]
    return pa.Table.from_pylist(rows, COMPARISON_SCHEMA)


def comparison_markdown(
    table: pa.Table, title: str = "Model comparison", delta: tuple[str, str] | None = None
) -> str:
    """Rows (task type, task, dim) x columns (labels), scores x100, best per row in bold; means per type.

    ``delta=(baseline, target)`` adds a last column ``target - baseline`` (x100, signed), e.g. soup - base.
    """
    rows = table.to_pylist()
    labels = list(dict.fromkeys(r["label"] for r in rows))
    if delta and not set(delta) <= set(labels):
        delta = None  # a label without results: no column rather than a column of dashes
    cell: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
    for r in rows:
        cell[(r["task_type"], r["task"], r["dim"])][r["label"]] = r["main_score"]
    fps = {r["label"]: r["fingerprint"] for r in rows}
    extra_header = f" | {delta[1]} - {delta[0]}" if delta else ""
    lines = [
        f"# {title}",
        "",
        "models: " + ", ".join(f"{lb} (`{fps[lb]}`)" for lb in labels),
        "",
        "| type | task | dim | " + " | ".join(labels) + extra_header + " |",
        "|---|---|---:|" + "---:|" * (len(labels) + bool(delta)),
    ]

    def fmt(scores: Mapping[str, float]) -> str:
        best = max(scores.values()) if scores else None
        out = []
        for lb in labels:
            v = scores.get(lb)
            s = _pct(v)
            out.append(f"**{s}**" if v is not None and v == best and len(scores) > 1 else s)
        if delta:
            a, b = scores.get(delta[0]), scores.get(delta[1])
            out.append("-" if a is None or b is None else f"{100 * (b - a):+.2f}")
        return " | ".join(out)

    for (ttype, task, dim), scores in sorted(cell.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        lines.append(f"| {ttype} | {task} | {dim} | {fmt(scores)} |")
    # means only over tasks every model was scored on, so that each column averages the same tasks
    means: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (ttype, _task, dim), scores in cell.items():
        if len(scores) == len(labels):
            for lb, v in scores.items():
                means[(ttype, dim)][lb].append(v)
                means[("all tasks", dim)][lb].append(v)
    n_types = len({ttype for ttype, _ in means if ttype != "all tasks"})
    mean_lines = [
        f"| mean {ttype} | {dim} | {fmt({lb: sum(v) / len(v) for lb, v in per.items()})} |"
        for (ttype, dim), per in sorted(
            means.items(), key=lambda kv: (kv[0][0] == "all tasks", kv[0][0], -kv[0][1])
        )
        # a mean of one task repeats its line; with one task type, "all tasks" repeats that type's mean
        if len(next(iter(per.values()))) > 1 and (ttype != "all tasks" or n_types > 1)
    ]
    if mean_lines:
        lines += [
            "",
            "means over the tasks scored for every model:",
            "",
            "| type | dim | " + " | ".join(labels) + extra_header + " |",
            "|---|---:|" + "---:|" * (len(labels) + bool(delta)),
            *mean_lines,
        ]
    return "\n".join(lines) + "\n"


def plot_comparison(table: pa.Table, out_dir: str | Path) -> list[Path]:
    """One PNG per task type: grouped bars (tasks x models), one panel per dim. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table.to_pylist()
    labels = list(dict.fromkeys(r["label"] for r in rows))
    written = []
    for ttype in sorted({r["task_type"] for r in rows}):
        sub = [r for r in rows if r["task_type"] == ttype]
        tasks = sorted({r["task"] for r in sub})
        dims = sorted({r["dim"] for r in sub}, reverse=True)
        fig, axes = plt.subplots(
            len(dims),
            1,
            figsize=(max(4.0, 1.2 * len(tasks) * max(1, len(labels)) / 2), 2.8 * len(dims)),
            squeeze=False,
        )
        width = 0.8 / max(1, len(labels))
        for ax, dim in zip(axes[:, 0], dims, strict=True):
            for j, lb in enumerate(labels):
                score = {r["task"]: r["main_score"] for r in sub if r["label"] == lb and r["dim"] == dim}
                xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(tasks))]
                ax.bar(xs, [100 * score.get(t, 0.0) for t in tasks], width=width, label=lb)
            ax.set_xticks(range(len(tasks)))
            ax.set_xticklabels(tasks, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel("main score x100")
            ax.set_title(f"{ttype}, dim {dim}", fontsize=9)
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        path = out / f"compare_{re.sub(r'[^A-Za-z0-9]+', '_', ttype).lower()}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
