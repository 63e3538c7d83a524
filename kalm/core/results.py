"""What every stage function returns: one typed result, so callers (the DAG, the CLI, the Prefect UI and the
run manifest) never re-derive what happened from files on disk.

>>> r = StageResult("ingest", "squad", outputs=["data/shards/finetune/squad"], rows=120, cached=True)
>>> r.to_dict()["cached"]
True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageResult:
    """One stage unit's outcome.

    ``stage``: ingest, mixture, mine, train, soup or eval. ``name``: the unit (recipe, run name, label).
    ``outputs``: URIs or paths it wrote, or reused when ``cached``. ``rows``: rows written (None where rows
    mean nothing, e.g. a soup). ``seconds``: wall time of this call (a cache hit costs little).
    ``lineage``: what identifies the inputs (fingerprints, config hashes, models). ``manifest``: the full
    manifest the stage wrote next to its outputs.
    """

    stage: str
    name: str
    outputs: list[str] = field(default_factory=list)
    rows: int | None = None
    cached: bool = False
    seconds: float = 0.0
    lineage: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> str:
        """The first (usually only) output."""
        return self.outputs[0] if self.outputs else ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (manifest included): what the run manifest records."""
        return dataclasses.asdict(self)

    def summary(self) -> dict[str, Any]:
        """The same without the manifest: what reports and UI tables show."""
        d = self.to_dict()
        d.pop("manifest")
        return d
