"""What a mining run reports: one summary per recipe, the stage's Markdown table, and which recipes hold
negatives another model mined (``kalm stale``).

>>> print(report_markdown([]).splitlines()[0])
## Mining report
"""

from __future__ import annotations

from typing import Any

from kalm.core.layout import mined_dir, mined_root
from kalm.core.results import StageResult
from kalm.core.storage import DataRoot, read_manifest


def summary(r: StageResult) -> dict[str, Any]:
    """The few numbers a report shows for one mined recipe."""
    m = r.manifest
    s = m.get("stats", {})
    return {
        "rows_in": m["rows_in"],
        "rows_out": m["rows_out"],
        "drops": m.get("drops", {}),
        "short_rows": s.get("short_rows", 0),
        "positive_rank_hist": s.get("positive_rank_hist", {}),
        "encoded": m.get("encode", {}).get("encoded", 0),
        "cached": r.cached,
    }


def stale_negatives(root: DataRoot, stage: str, model_fingerprint: str) -> list[str]:
    """Recipes under ``mined/<stage>/`` whose negatives a model other than ``model_fingerprint`` mined."""
    stale = []
    for name in root.list_dirs(mined_root(stage)):
        m = read_manifest(root, mined_dir(stage, name))
        if m is not None and m.get("miner", {}).get("fingerprint") != model_fingerprint:
            stale.append(name)
    return stale


def report_markdown(results: list[StageResult], title: str = "Mining report") -> str:
    """A Markdown table: rows in/out, drops by reason, short rows, encoded texts, cache hit."""
    lines = [
        f"## {title}",
        "",
        "| recipe | rows in | rows out | drops | short rows | best positive rank | encoded | cache hit |",
        "|---|---:|---:|---|---:|---|---:|---|",
    ]
    for r in results:
        s = summary(r)
        drops = ", ".join(f"{k} {v}" for k, v in s["drops"].items()) or "-"
        hist = ", ".join(f"{k}: {v}" for k, v in s["positive_rank_hist"].items()) or "-"
        lines.append(
            f"| {r.name} | {s['rows_in']} | {s['rows_out']} | {drops} | {s['short_rows']} | {hist} "
            f"| {s['encoded']} | {'yes' if s['cached'] else 'no'} |"
        )
    return "\n".join(lines)
