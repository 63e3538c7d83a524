"""The one record schema of every shard (pre-training, fine-tuning, mined), declared once.

Columns and who consumes them:
- ``id``: stable content hash of the normalised (query, first positive); exact dedup key.
- ``query``: the anchor text, without instruction (instructions are applied at encode time).
- ``pos``: list of positives (>= 1). ``neg``: list of hard negatives (may be empty; filled by mining).
- ``instruction``: the task instruction for the query side; ``symmetric``: instruction on both sides.
- ``category``, ``task_type``, ``recipe``, ``stage``, ``lang``: provenance, used for homogeneous batching.
- ``label``: the class of a classification/clustering row (its query and positive share it; null or ""
  otherwise); ``neg_labels``: the class of each hard negative, aligned with ``neg`` ("" = unknown). Mining
  never picks a same-label negative and the loss masks same-label candidates (no false negatives from our
  own labelled data).

Scored shards (``scored/<stage>/<recipe>/``, the ``score`` stage) carry two more columns, declared in
``SCORED_SCHEMA``: ``pos_scores`` and ``neg_scores``, a teacher's score of the query against each positive
and each negative (aligned with ``pos`` and ``neg``; NaN = not scored). The teacher's fingerprint is in the
folder's manifest.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 2

STAGES = ("pretrain", "finetune")
TASK_TYPES = (
    "retrieval",
    "sts",
    "classification",
    "clustering",
    "pair_classification",
    "reranking",
    "bitext",
)
# Task types whose instruction goes on both sides (METHOD.md: symmetric tasks).
SYMMETRIC_TASK_TYPES = frozenset({"sts", "pair_classification", "clustering", "bitext"})

ROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("pos", pa.list_(pa.string()), nullable=False),
        pa.field("neg", pa.list_(pa.string()), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("symmetric", pa.bool_(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("task_type", pa.string(), nullable=False),
        pa.field("recipe", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=True),
        pa.field("neg_labels", pa.list_(pa.string()), nullable=True),
    ],
    metadata={"kalm_schema_version": str(SCHEMA_VERSION)},
)
COLUMNS = tuple(ROW_SCHEMA.names)
# Columns with few distinct values per file: dictionary-encoded in Parquet. The texts and ids are (nearly)
# all distinct, where a dictionary only costs the writer time before Parquet falls back to plain encoding.
REPEATED_COLUMNS = (
    "instruction",
    "symmetric",
    "category",
    "task_type",
    "recipe",
    "stage",
    "lang",
    "label",
    "neg_labels",
)
SCORE_COLUMNS = ("pos_scores", "neg_scores")
SCORED_SCHEMA = pa.schema(
    [*ROW_SCHEMA, *(pa.field(c, pa.list_(pa.float32()), nullable=True) for c in SCORE_COLUMNS)],
    metadata=ROW_SCHEMA.metadata,
)


def dedup_key(query: str, pos: str) -> str:
    """The exact-dedup key of a pair: case-folded, already-normalised query and first positive."""
    return query.casefold() + "\x1f" + pos.casefold()


def row_id(query: str, pos: str) -> str:
    """Stable 16-hex-digit content hash of a pair, e.g. ``row_id("a", "b") == row_id("A", "b")``."""
    return hashlib.blake2b(dedup_key(query, pos).encode("utf-8"), digest_size=8).hexdigest()


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build a table with the explicit schema (never inferred)."""
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
