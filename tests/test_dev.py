"""Evaluation during training, the parts below the training loop: the dev set from the rows the data
stage held out (the default), its stable choice by row id, and MRR@10 on known vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kalm.core.errors import KalmError
from kalm.core.layout import holdout_dir
from kalm.core.storage import DataRoot, read_rows
from kalm.data.config import IngestConfig
from kalm.data.ingest import run_ingest_recipe
from kalm.data.recipes import get_recipe
from kalm.training.dev import DevSet, dev_mrr, load_dev_set
from tests.conftest import faq_rows


def test_the_default_dev_set_is_the_held_out_rows(recipe_dir, tmp_path: Path) -> None:
    folder = recipe_dir(
        "dev_faq",
        faq_rows(60, "dev"),
        yaml_text="name: dev_faq\ncategory: faq\nstage: finetune\ntask_type: retrieval\nholdout: 0.25\n"
        "source: {format: jsonl, path: 'raw/dev_faq/*.jsonl'}\nfields: {query: question, pos: answer}\n"
        "instruction: Given a question, retrieve the answer\n",
    )
    root = DataRoot.from_uri(str(tmp_path / "data"))
    run_ingest_recipe(get_recipe("dev_faq", [folder]), root, IngestConfig())
    held = read_rows(root, holdout_dir("dev_faq")).to_pylist()
    assert held
    dev = load_dev_set(root, ["dev_faq", "no_such_recipe"], None, 512)
    assert dev is not None and sorted(dev.queries) == sorted(r["query"] for r in held)
    assert set(dev.instructions) == {"Given a question, retrieve the answer"}
    few = load_dev_set(root, ["dev_faq"], None, 3)
    assert few is not None and len(few) == 3 and few == load_dev_set(root, ["dev_faq"], None, 3)  # stable
    assert load_dev_set(root, ["no_such_recipe"], None, 512) is None  # no rows: off, logged
    with pytest.raises(KalmError, match="no such file"):
        load_dev_set(root, [], str(tmp_path / "missing.jsonl"), 10)


class Fixed:
    """An encoder whose vectors are given: queries by text, documents by text."""

    embedding_dim = 2

    def __init__(self, vecs: dict[str, list[float]]) -> None:
        self.vecs = vecs

    def encode(self, texts: list[str], batch_size: int = 32, instruction: str | None = None) -> np.ndarray:
        return np.array([self.vecs[t] for t in texts], dtype=np.float32)


def test_mrr_at_10_ranks_each_query_against_every_dev_document() -> None:
    dev = DevSet(queries=["q1", "q2"], instructions=["", ""], docs=["d1", "d2"], source="test")
    model = Fixed({"q1": [1, 0], "q2": [1, 0], "d1": [1, 0], "d2": [0.6, 0.8]})
    # q1: its document first (1); q2: d1 scores 1.0 above its own d2 (0.6): rank 2, 1/2
    assert dev_mrr(model, dev) == pytest.approx(0.75)
    assert dev_mrr(model, dev, k=1) == pytest.approx(0.5)
