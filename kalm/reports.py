"""Human-readable reports (Markdown) from manifests: the CLI prints them, flows publish them as artifacts."""

from __future__ import annotations

from typing import Any


def data_report_markdown(title: str, recipes: list[dict[str, Any]], stages: list[dict[str, Any]]) -> str:
    """A table of rows in/out and drops by reason per recipe, then per stage mixture."""
    lines = [
        f"# {title}",
        "",
        "| recipe | stage | category | rows in | rows out | drops | built |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for m in recipes:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(m.get("drops", {}).items())) or "-"
        built = "cached" if m.get("skipped") else "yes"
        lines.append(
            f"| {m.get('recipe')} | {m.get('stage')} | {m.get('category')} | {m.get('rows_in')} "
            f"| {m.get('rows_out')} | {drops} | {built} |"
        )
    for s in stages:
        lines += [
            "",
            f"## Mixture `{s['stage']}`: {s.get('rows_out', 0)} rows",
            "",
            "| recipe | rows in | rows out | drops | built |",
            "|---|---:|---:|---|---|",
        ]
        for name, r in s.get("recipes", {}).items():
            drops = ", ".join(f"{k} {v}" for k, v in sorted(r.get("drops", {}).items())) or "-"
            lines.append(
                f"| {name} | {r['rows_in']} | {r['rows_out']} | {drops} | "
                f"{'cached' if r.get('skipped') else 'yes'} |"
            )
    return "\n".join(lines) + "\n"
