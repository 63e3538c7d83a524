"""Hub sources load through `datasets` in streaming mode; tested on a local folder in the hub layout
(README.md with `configs:` metadata, Parquet files per subset and split), since nothing downloads here."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm.core.config import HF_OFFLINE_VARS
from kalm.core.errors import KalmError
from kalm.core.layout import shard_dir
from kalm.core.storage import DataRoot, read_rows
from kalm.data.config import IngestConfig
from kalm.data.ingest import run_ingest_recipe
from kalm.data.readers import hub_unreachable
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


def _recipe(d: Path, name: str, source: str) -> Path:
    d.mkdir(exist_ok=True)
    (d / f"{name}.yaml").write_text(
        f"name: {name}\ncategory: qa\nstage: finetune\ntask_type: retrieval\nsource: {source}\n"
        "fields: {query: question, pos: answer}\n"
    )
    return d


def test_save_to_disk_folders_are_sources(tmp_path: Path) -> None:
    """A `Dataset.save_to_disk` folder and a `DatasetDict.save_to_disk` folder (split chosen by `split:`)
    are read as `format: hf` sources; a missing split or a subset is one line naming what there is."""
    import datasets

    qa = [{"question": f"what is item {i}?", "answer": f"item {i} is a thing number {i}"} for i in range(5)]
    one = tmp_path / "saved_one"
    datasets.Dataset.from_list(qa).save_to_disk(str(one))
    both = tmp_path / "saved_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(qa[:3]), "test": datasets.Dataset.from_list(qa[3:])}
    ).save_to_disk(str(both))
    d = tmp_path / "recipes"
    _recipe(d, "one", f"{{format: hf, path: '{one}'}}")
    _recipe(d, "split", f"{{format: hf, path: '{both}', split: test}}")
    root = DataRoot.from_uri(str(tmp_path / "data"))
    cfg = IngestConfig()
    assert run_ingest_recipe(get_recipe("one", [d]), root, cfg).manifest["rows_out"] == 5
    assert run_ingest_recipe(get_recipe("split", [d]), root, cfg).manifest["rows_out"] == 2
    got = sorted(r["query"] for r in read_rows(root, shard_dir("finetune", "split")).to_pylist())
    assert got == ["what is item 3?", "what is item 4?"]

    _recipe(d, "nosplit", f"{{format: hf, path: '{both}', split: validation}}")
    with pytest.raises(KalmError, match=r"no split 'validation' \(it has: test, train\)"):
        run_ingest_recipe(get_recipe("nosplit", [d]), root, cfg)
    _recipe(d, "subset", f"{{format: hf, path: '{one}', subset: pairs}}")
    with pytest.raises(KalmError, match="a save_to_disk folder has no subsets"):
        run_ingest_recipe(get_recipe("subset", [d]), root, cfg)


def test_an_uncached_hub_dataset_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline (as tests and the demo run) a hub id that is not cached ends in one line that says so and
    what to do, not datasets' ConnectionError traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    d = _recipe(tmp_path / "recipes", "squadlike", "{format: hf, path: some-org/not-cached-anywhere}")
    root = DataRoot.from_uri(str(tmp_path / "data"))
    with pytest.raises(KalmError, match=r"not in the local cache and Hugging Face offline mode is on") as err:
        run_ingest_recipe(get_recipe("squadlike", [d]), root, IngestConfig())
    assert "\n" not in str(err.value) and "some-org/not-cached-anywhere" in str(err.value)


def test_the_cli_leaves_hub_access_to_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kalm` no longer forces offline mode (hub recipes are online by default); `kalm demo` sets it."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in HF_OFFLINE_VARS}
    code = (
        "import os, kalm.cli; print([os.environ.get(v) for v in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE')])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[None, None]"
    for var in HF_OFFLINE_VARS:
        monkeypatch.delenv(var)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    msg = hub_unreachable("org/x", ConnectionError("Couldn't reach 'org/x' on the Hub"))
    assert msg.startswith("cannot reach the Hugging Face Hub (http://127.0.0.1:9) for dataset 'org/x'")
