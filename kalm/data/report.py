"""The data report (Markdown) from the data stage's results: the CLI prints it, flows publish it."""

from __future__ import annotations

from collections.abc import Sequence

from kalm.core.results import StageResult


def _drops(m: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((m.get("drops") or {}).items())) or "-"


def data_report_markdown(title: str, ingested: Sequence[StageResult], mixtures: Sequence[StageResult]) -> str:
    """A table of rows in/out and drops by reason per recipe, then per stage mixture."""
    lines = [
        f"# {title}",
        "",
        "| recipe | stage | category | rows in | rows out | drops | built |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for r in ingested:
        m = r.manifest
        lines.append(
            f"| {r.name} | {m.get('stage')} | {m.get('category')} | {m.get('rows_in')} "
            f"| {r.rows} | {_drops(m)} | {'cached' if r.cached else 'yes'} |"
        )
    by_stage: dict[str, list[StageResult]] = {}
    for r in mixtures:
        by_stage.setdefault(str(r.manifest.get("stage")), []).append(r)
    for stage, rs in by_stage.items():
        lines += [
            "",
            f"## Mixture `{stage}`: {sum(r.rows or 0 for r in rs)} rows",
            "",
            "| recipe | rows in | rows out | drops | built |",
            "|---|---:|---:|---|---|",
        ]
        lines += [
            f"| {r.name} | {r.manifest.get('rows_in')} | {r.rows} | {_drops(r.manifest)} "
            f"| {'cached' if r.cached else 'yes'} |"
            for r in rs
        ]
    return "\n".join(lines) + "\n"
