"""Hub sources load through `datasets` in streaming mode; tested on a local folder in the hub layout
(README.md with `configs:` metadata, Parquet files per subset and split), since nothing downloads here."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kalm.core.layout import shard_dir
from kalm.core.storage import DataRoot, read_rows
from kalm.data.config import IngestConfig
from kalm.data.ingest import run_ingest_recipe
from kalm.data.recipes import get_recipe


def test_hf_layout_with_subset_and_split(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "all-nli"
    (repo / "triplet").mkdir(parents=True)
    (repo / "pair").mkdir(parents=True)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: triplet\n  data_files:\n  - split: train\n    path: triplet/train-*\n"
        "- config_name: pair\n  data_files:\n  - split: train\n    path: pair/train-*\n---\n# local copy\n"
    )
    acts = [
        "rides a bicycle",
        "plays the violin",
        "cooks pasta",
        "reads a newspaper",
        "paints a fence",
        "swims in a lake",
    ]
    rows = [
        {"anchor": f"A person {a} outdoors.", "positive": f"Someone {a}.", "negative": f"Nobody {a}, ever."}
        for a in acts
    ]
    pq.write_table(pa.Table.from_pylist(rows), repo / "triplet" / "train-00000-of-00001.parquet")
    pq.write_table(
        pa.Table.from_pylist([{"anchor": "x", "positive": "y"}]), repo / "pair" / "train-0.parquet"
    )
    d = tmp_path / "recipes"
    d.mkdir()
    (d / "nli.yaml").write_text(
        "name: nli\ncategory: nli\nstage: finetune\ntask_type: sts\n"
        f"source: {{format: hf, path: '{repo}', subset: triplet, split: train}}\n"
        "fields: {query: anchor, pos: positive, neg: negative}\n"
    )
    root = DataRoot.from_uri(str(tmp_path / "data"))
    m = run_ingest_recipe(get_recipe("nli", [d]), root, IngestConfig()).manifest
    out = read_rows(root, shard_dir("finetune", "nli")).to_pylist()
    assert m["rows_out"] == 6 and out[0]["neg"] == ["Nobody rides a bicycle, ever."]
    assert all(r["symmetric"] for r in out)  # sts: the instruction goes on both sides
