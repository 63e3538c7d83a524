"""The inputs of one mining job: the candidate pool (the recipe's own documents, or a corpus file plus the
recipe's positives) and the text keys that tell equal texts apart after normalisation.

>>> keys = Keys(); keys("Hello  World") == keys("hello world")
True
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kalm.core.errors import KalmError
from kalm.core.storage import DataRoot
from kalm.mining.config import PoolSpec
from kalm.mining.encode import Encoder
from kalm.mining.sample import norm_key


class Keys:
    """Interns normalised texts to small ints: equal ids <=> equal after normalisation."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        return self.ids.setdefault(norm_key(text), len(self.ids))


@dataclass
class Pool:
    """Candidate texts (what ``neg`` will hold), what the model sees for each, and their key ids."""

    texts: list[str]
    formatted: list[str]
    index: dict[str, int]
    keys: np.ndarray
    lineage: dict[str, Any]


def load_corpus(root: DataRoot, spec: PoolSpec) -> tuple[list[str], dict[str, Any]]:
    """Texts of the configured corpus file (Parquet or JSONL) and its lineage (path, bytes, sha256)."""
    assert spec.corpus is not None
    path = spec.corpus
    local = Path(path).expanduser()
    try:
        data = local.read_bytes() if local.is_absolute() else root.read_bytes(path)
    except (FileNotFoundError, OSError) as err:
        if isinstance(err, FileNotFoundError) or not (local.is_absolute() or root.exists(path)):
            raise KalmError(f"pool corpus not found: {path} (absolute, or relative to {root.uri})") from None
        raise
    field = spec.text_field
    if path.endswith(".parquet"):
        table = pq.read_table(pa.BufferReader(data))
        if field not in table.column_names:
            raise KalmError(
                f"pool corpus {path}: no column {field!r} (columns: {', '.join(table.column_names)})"
            )
        texts = [t for t in table.column(field).to_pylist() if isinstance(t, str)]
    elif path.endswith((".jsonl", ".json")):
        texts = []
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise KalmError(f"pool corpus {path}: line {n} is not JSON ({err.msg})") from None
            if isinstance(rec, dict) and isinstance(rec.get(field), str):
                texts.append(rec[field])
    else:
        raise KalmError(f"pool corpus {path}: use a .parquet or .jsonl file")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise KalmError(f"pool corpus {path}: no non-empty {field!r} texts")
    return texts, {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16]}


def build_pool(
    rows: dict[str, list[Any]],
    corpus: list[str] | None,
    doc_instruction: str | None,
    enc: Encoder,
    keys: Keys,
) -> Pool:
    """The recipe's positives and negatives (deduplicated, first-seen order), or a corpus plus positives."""
    seen: dict[str, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, str) and t.strip() and t not in seen:
            seen[t] = len(seen)

    if corpus is None:
        for pos, neg in zip(rows["pos"], rows["neg"], strict=True):
            for t in pos:
                add(t)
            for t in neg:
                add(t)
    else:
        for t in corpus:
            add(t)
        for pos in rows["pos"]:
            for t in pos:
                add(t)  # positives must be rankable for the consistency filter
    texts = list(seen)
    formatted = [enc.format_query(t, doc_instruction) for t in texts] if doc_instruction else texts
    return Pool(
        texts=texts,
        formatted=formatted,
        index=seen,
        keys=np.array([keys(t) for t in texts], dtype=np.int64),
        lineage={"source": "corpus" if corpus is not None else "recipe", "size": len(texts)},
    )


def most_common(values: list[Any], default: Any) -> Any:
    return Counter(values).most_common(1)[0][0] if values else default


def pool_labels(cols: dict[str, list[Any]], pool: Pool) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class names, each row's class id and each pool text's (-1: none), from the rows' ``label`` (query
    and positives) and ``neg_labels`` (negatives, aligned with ``neg``)."""
    names = sorted({lab for lab in cols["label"] if lab})
    index = {name: i for i, name in enumerate(names)}
    row_label = np.array([index.get(lab or "", -1) for lab in cols["label"]], dtype=np.int64)
    pool_label = np.full(len(pool.texts), -1, dtype=np.int64)
    if not names:
        return names, row_label, pool_label
    for r, (pos, neg) in enumerate(zip(cols["pos"], cols["neg"], strict=True)):
        for t in pos:
            if row_label[r] >= 0 and t in pool.index and pool_label[pool.index[t]] < 0:
                pool_label[pool.index[t]] = row_label[r]
        labs = cols["neg_labels"][r] or []
        for t, lab in zip(neg, labs if len(labs) == len(neg) else [], strict=False):
            if lab in index and t in pool.index and pool_label[pool.index[t]] < 0:
                pool_label[pool.index[t]] = index[lab]
    return names, row_label, pool_label
