"""Markdown reports built from stage results and the run manifest: the CLI prints them, the Prefect runner
publishes them as artifacts.

>>> print(stage_table_markdown({"timings_s": {"ingest": 1.25}, "cache_hits": {"ingest": True}, "seconds": 2}))
| stage | seconds | cache hit |
|---|---:|---|
| ingest | 1.2 | yes |
| total | 2.0 | |
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from kalm.core.results import StageResult
from kalm.pipeline.config import ALL_STAGES


def stage_table_markdown(manifest: dict[str, Any]) -> str:
    """One row per stage that ran (wall time, whether it was a cache hit) or that the pipeline skips (why)."""
    hits, times = manifest.get("cache_hits", {}), manifest.get("timings_s", {})
    skipped = manifest.get("skipped_stages") or {}
    lines = ["| stage | seconds | cache hit |", "|---|---:|---|"]
    for k in sorted({*times, *skipped}, key=lambda s: ALL_STAGES.index(s) if s in ALL_STAGES else 99):
        if k in skipped:
            lines.append(f"| {k} | | skipped: {skipped[k]} |")
        else:
            lines.append(f"| {k} | {times[k]:.1f} | {'yes' if hits.get(k) else 'no'} |")
    lines.append(f"| total | {float(manifest.get('seconds', 0)):.1f} | |")
    return "\n".join(lines)


def png_markdown(title: str, png: Path) -> str:
    """A PNG inlined as a data URI (the UI shows it without any file server) plus where the file lives."""
    if not png.exists():
        return f"### {title}\n\n(no image: {png})\n"
    data = base64.b64encode(png.read_bytes()).decode()
    return f"### {title}\n\n![{title}](data:image/png;base64,{data})\n\n`{png}`\n"


def training_markdown(stage: str, res: StageResult) -> str:
    """A training run's last step and its loss curve (``<run>/loss.png``, next to ``final/``)."""
    run = Path(res.output).parent
    md = [f"## {stage}: `{res.name}`" + (" (cache hit)" if res.cached else ""), ""]
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        last = [json.loads(x) for x in metrics.read_text().splitlines()[-1:] if x.strip()]
        if last:
            shown = {k: v for k, v in last[0].items() if v is not None}
            cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in shown.values()]
            header = "| " + " | ".join(shown) + " |"
            md += [header, "|" + "---|" * len(shown), "| " + " | ".join(cells) + " |", ""]
    md.append(png_markdown(f"{stage} loss", run / "loss.png"))
    return "\n".join(md)
