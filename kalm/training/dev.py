"""Evaluation during training: a dev retrieval score every ``dev.every`` steps, the best model kept.

The dev set is ``dev.path`` (a Parquet/JSONL file, folder, glob or ``s3://`` in the row layout:
``query``, ``pos``, optional ``instruction`` and ``symmetric``) or, by default, the rows the data stage held
out of the run's recipes (``<data root>/holdout/<recipe>/``), at most ``dev.max_rows`` of them, chosen by
row id (stable across runs and resumes). Those rows are also the ``Holdout_<recipe>`` evaluation tasks:
selecting on them and reporting them is optimistic, which the run logs; give ``dev.path`` for a clean split.

The score is MRR@10 of each query against every dev positive (the first positive per row is its answer),
queries with their instruction through the model's template, documents bare unless the row is symmetric:
the same formatting as training and evaluation. Rank 0 scores; the other ranks wait at a barrier. A new
best is saved to ``<run>/best/`` (a sentence-transformers folder) and ``<run>/best.json`` (step, score); with
``dev.final: best`` that model becomes ``final/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kalm.core.layout import MANIFEST, holdout_dir
from kalm.core.storage import DataRoot, read_rows, read_table
from kalm.training.instructions import format_document

log = logging.getLogger(__name__)
BEST_DIR = "best"
BEST_FILE = "best.json"


@dataclass(frozen=True)
class DevSet:
    queries: list[str]
    instructions: list[str]
    docs: list[str]  # formatted documents; docs[i] answers queries[i]
    source: str

    def __len__(self) -> int:
        return len(self.queries)


def _table(root: DataRoot, rel: str) -> Any:
    return read_rows(root, rel, ["id", "query", "pos", "instruction", "symmetric"])


def load_dev_set(root: DataRoot, recipes: list[str], path: str | None, max_rows: int) -> DevSet | None:
    """The dev rows (see the module docstring); None when there are none (logged)."""
    if path:  # a file, a folder of *.parquet/*.jsonl, a glob or s3://
        rows = read_table(path, "dev.path").to_pylist()
        source = str(path)
    else:
        rows = []
        for r in recipes:
            if root.exists(f"{holdout_dir(r)}/{MANIFEST}"):
                rows += _table(root, holdout_dir(r)).to_pylist()
        source = "held-out rows of " + ", ".join(recipes)
        if rows:
            log.warning(
                "dev set: %s (also the Holdout_* evaluation tasks: choosing the best step on them is "
                "optimistic; set dev.path for a separate split)",
                source,
            )
    rows = [r for r in rows if r.get("query") and r.get("pos")]
    if not rows:
        log.warning("dev set: no rows (%s); no evaluation during training", source)
        return None

    def key(r: dict[str, Any]) -> str:
        return str(r.get("id") or hashlib.sha256(r["query"].encode()).hexdigest())

    rows = sorted(rows, key=key)[:max_rows]
    return DevSet(
        queries=[r["query"] for r in rows],
        instructions=[r.get("instruction") or "" for r in rows],
        docs=[format_document(r["pos"][0], r.get("instruction"), bool(r.get("symmetric"))) for r in rows],
        source=source,
    )


def dev_mrr(model: Any, dev: DevSet, batch_size: int = 32, k: int = 10) -> float:
    """MRR@k of every query against all dev documents (the model's template applies to queries)."""
    q = np.empty((len(dev), model.embedding_dim), dtype=np.float32)
    by_instruction: dict[str, list[int]] = {}
    for i, ins in enumerate(dev.instructions):
        by_instruction.setdefault(ins, []).append(i)
    for ins, idx in by_instruction.items():
        q[idx] = model.encode([dev.queries[i] for i in idx], batch_size, instruction=ins or None)
    d = model.encode(dev.docs, batch_size)  # formatted already: no instruction added here
    scores = q @ d.T
    gold = scores[np.arange(len(dev)), np.arange(len(dev))]
    rank = (scores > gold[:, None]).sum(axis=1)  # 0 = first; ties count for the query
    return float(np.where(rank < k, 1.0 / (rank + 1), 0.0).mean())


def read_best(run_dir: Path) -> dict[str, Any] | None:
    f = run_dir / BEST_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
