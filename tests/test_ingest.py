"""Ingest of one recipe on real JSONL files: dedup, bad input, atomic writes, skip-when-unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kalm.core.errors import KalmError
from kalm.core.layout import MANIFEST, shard_dir
from kalm.core.schema import ROW_SCHEMA
from kalm.core.storage import DataRoot, read_rows
from kalm.data.config import IngestConfig
from kalm.data.ingest import run_ingest_recipe
from kalm.data.recipes import get_recipe, load_recipe_file
from tests.conftest import faq_rows


def _edit(text: str) -> str:
    """A near duplicate: two characters changed in a long text."""
    return text[:20] + "Q" + text[21:40] + "Z" + text[41:]


def test_planted_duplicates_and_malformed_lines(recipe_dir, tmp_path: Path) -> None:
    good = faq_rows(120)
    exact = [{"question": "  " + g["question"].upper() + " ", "answer": g["answer"]} for g in good[:15]]
    near = [{"question": g["question"], "answer": _edit(g["answer"])} for g in good[15:30]]
    bad = [
        '{"question": "broken json',
        "[1, 2, 3]",
        {"question": "no answer here?"},
        {"question": 12345, "answer": ["a list", "is fine"]},
        {"question": {"nested": 1}, "answer": "mistyped query field"},
        {"question": "", "answer": "empty query"},
        {"question": "huge?", "answer": "x" * 100_000},
        b'{"question": "bad \xff bytes", "answer": "invalid utf-8 line"}',
    ]
    folder = recipe_dir("faq", good + exact + near + bad)
    root = DataRoot.from_uri(str(tmp_path / "data"))
    res = run_ingest_recipe(get_recipe("faq", [folder]), root, IngestConfig())
    m = res.manifest
    table = read_rows(root, shard_dir("finetune", "faq"))
    got = {(r["query"], r["pos"][0]) for r in table.to_pylist()}
    want = {(g["question"], g["answer"]) for g in good} | {("12345", "a list")}
    assert got == want  # exactly the distinct good rows
    assert m["rows_out"] == len(want) == table.num_rows
    assert m["drops"]["exact_dup"] == 15 and m["drops"]["near_dup"] == 15
    assert m["drops"]["malformed_json"] == 1 and m["drops"]["not_an_object"] == 1
    assert m["drops"]["missing_field"] == 1 and m["drops"]["bad_type"] == 1
    assert m["drops"]["empty_query"] == 1 and m["drops"]["pos_too_long"] == 1
    assert m["drops"]["invalid_utf8_line"] == 1
    assert m["rows_in"] == len(good) + 30 + len(bad)
    assert m["rows_in"] == m["rows_out"] + sum(m["drops"].values())
    # shards carry the explicit schema and zstd compression
    part = root.path(shard_dir("finetune", "faq"), m["files"][0]["name"])
    assert pq.read_schema(part).remove_metadata().equals(ROW_SCHEMA.remove_metadata())
    assert pq.ParquetFile(part).metadata.row_group(0).column(0).compression == "ZSTD"


def test_bounded_shards_and_skip_when_unchanged(recipe_dir, tmp_path: Path) -> None:
    folder = recipe_dir("faq", faq_rows(95))
    root = DataRoot.from_uri(str(tmp_path / "data"))
    cfg = IngestConfig(shard_rows=40, batch_rows=30)
    lr = get_recipe("faq", [folder])
    first = run_ingest_recipe(lr, root, cfg)
    assert [f["rows"] for f in first.manifest["files"]] == [40, 40, 15]
    again = run_ingest_recipe(lr, root, cfg)
    assert again.cached and again.manifest == first.manifest
    # a changed source is rebuilt
    src = folder / "raw" / "faq" / "part-0.jsonl"
    src.write_text(
        src.read_text() + json.dumps({"question": "one more question?", "answer": "yes, one more"})
    )
    assert run_ingest_recipe(lr, root, cfg).manifest["rows_out"] == 96
    # a changed threshold is rebuilt too
    cfg2 = IngestConfig(shard_rows=40, batch_rows=30, near_dedup={"threshold": 0.9})
    assert not run_ingest_recipe(lr, root, cfg2).cached


def test_crash_mid_write_leaves_nothing_that_looks_complete(recipe_dir, tmp_path: Path, monkeypatch) -> None:
    folder = recipe_dir("faq", faq_rows(60))
    root = DataRoot.from_uri(str(tmp_path / "data"))
    lr = get_recipe("faq", [folder])
    cfg = IngestConfig(shard_rows=20)
    before = run_ingest_recipe(lr, root, cfg).manifest
    calls = {"n": 0}
    real = DataRoot.write_parquet

    def flaky(self, rel, table):  # the second shard write dies, like a killed process
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk vanished")
        return real(self, rel, table)

    monkeypatch.setattr(DataRoot, "write_parquet", flaky)
    with pytest.raises(OSError):
        run_ingest_recipe(lr, root, cfg, force=True)
    monkeypatch.undo()
    # the published folder is still the previous complete build
    assert root.read_json(f"{shard_dir('finetune', 'faq')}/{MANIFEST}") == before
    assert read_rows(root, shard_dir("finetune", "faq")).num_rows == 60


def test_missing_source_and_unknown_recipe(recipe_dir, tmp_path: Path) -> None:
    folder = recipe_dir("faq", faq_rows(5))
    (folder / "raw" / "faq" / "part-0.jsonl").unlink()
    root = DataRoot.from_uri(str(tmp_path / "data"))
    with pytest.raises(KalmError, match="no files match"):
        run_ingest_recipe(get_recipe("faq", [folder]), root, IngestConfig())
    with pytest.raises(KalmError, match="unknown recipe 'fqa'.*did you mean: faq"):
        get_recipe("fqa", [folder])


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"stage": "pretraining"}, "'stage': Input should be 'pretrain' or 'finetune'"),
        ({"colour": "blue"}, "unknown key 'colour' (allowed: name, category, stage"),
        ({"source": {"format": "xml", "path": "x"}}, "'source.format'"),
        ({"source": {"format": "jsonl", "path": "x", "compresion": "gz"}}, "unknown key 'source.compresion'"),
        ({"fields": {"query": "q"}}, "fields must map 'query' and 'pos'"),
        ({"task_type": "classification"}, "maps 'text' and 'label'"),
        ({"name": "Bad Name"}, "'name'"),
    ],
)
def test_bad_recipe_yaml_is_one_clear_error(tmp_path: Path, patch: dict, message: str) -> None:
    import yaml

    base = {
        "name": "x",
        "category": "c",
        "stage": "finetune",
        "task_type": "retrieval",
        "source": {"format": "jsonl", "path": "a.jsonl"},
        "fields": {"query": "q", "pos": "a"},
    }
    base.update(patch)
    p = tmp_path / "x.yaml"
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(KalmError) as err:
        load_recipe_file(p)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(p) in str(err.value)


def test_fields_accept_both_directions(tmp_path: Path) -> None:
    p = tmp_path / "x.yaml"
    p.write_text(
        "name: x\ncategory: c\nstage: finetune\ntask_type: retrieval\n"
        "source: {format: jsonl, path: a.jsonl}\nfields: {question: query, answer: pos}\n"
    )
    assert load_recipe_file(p).recipe.fields == {"query": "question", "pos": "answer"}


def test_csv_parquet_and_nested_fields(tmp_path: Path) -> None:
    import pyarrow as pa

    d = tmp_path / "r"
    (d / "raw").mkdir(parents=True)
    (d / "raw" / "a.csv").write_text(
        'q,a\n"What is 2+2?","It is four, obviously."\n"x","too,many",x\n'
        '"Capital of France?","Paris is the capital."\n'
    )
    (d / "csvr.yaml").write_text(
        "name: csvr\ncategory: c\nstage: finetune\ntask_type: retrieval\n"
        "source: {format: csv, path: raw/a.csv}\nfields: {query: q, pos: a}\n"
    )
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "question": "Who wrote Hamlet?",
                    "answers": {"text": ["Shakespeare wrote it"]},
                    "ctx": ["context one", "context two"],
                },
                {
                    "question": "Boiling point of water?",
                    "answers": {"text": ["100 degrees Celsius"]},
                    "ctx": [],
                },
            ]
        ),
        d / "raw" / "b.parquet",
    )
    (d / "pq.yaml").write_text(
        "name: pq\ncategory: c\nstage: finetune\ntask_type: retrieval\n"
        "source: {format: parquet, path: raw/*.parquet}\n"
        "fields: {query: question, pos: answers.text, neg: ctx}\n"
    )
    root = DataRoot.from_uri(str(tmp_path / "data"))
    m = run_ingest_recipe(get_recipe("csvr", [d]), root, IngestConfig()).manifest
    assert m["rows_out"] == 2 and m["drops"] == {"malformed_csv": 1}
    rows = read_rows(root, shard_dir("finetune", "pq")) if False else None
    m2 = run_ingest_recipe(get_recipe("pq", [d]), root, IngestConfig()).manifest
    rows = read_rows(root, shard_dir("finetune", "pq")).to_pylist()
    assert (
        m2["rows_out"] == 2
        and rows[0]["pos"] == ["Shakespeare wrote it"]
        and rows[0]["neg"] == ["context one", "context two"]
    )


def test_classification_becomes_pairs(tmp_path: Path) -> None:
    d = tmp_path / "r"
    rows = [
        {"t": f"sample text number {i} about {lab} topics and more", "y": lab}
        for lab in ("sports", "music", "cooking")
        for i in range(4)
    ] + [{"t": "lonely text here", "y": "solo"}]
    from tests.conftest import write_jsonl

    write_jsonl(d / "raw.jsonl", rows)
    (d / "cls.yaml").write_text(
        "name: cls\ncategory: c\nstage: finetune\ntask_type: classification\n"
        "source: {format: jsonl, path: raw.jsonl}\nfields: {text: t, label: y}\n"
        "negatives_per_row: 2\n"
    )
    root = DataRoot.from_uri(str(tmp_path / "data"))
    m = run_ingest_recipe(get_recipe("cls", [d]), root, IngestConfig(near_dedup={"enabled": False})).manifest
    out = read_rows(root, shard_dir("finetune", "cls")).to_pylist()
    label = {r["t"]: r["y"] for r in rows}
    assert m["drops"] == {"singleton_label": 1} and len(out) == 12
    for r in out:
        assert label[r["pos"][0]] == label[r["query"]] and r["pos"][0] != r["query"]
        assert len(r["neg"]) == 2 and all(label[n] != label[r["query"]] for n in r["neg"])


def test_python_recipe_adapter_errors_are_counted(tmp_path: Path) -> None:
    d = tmp_path / "r"
    from tests.conftest import write_jsonl

    write_jsonl(
        d / "raw.jsonl",
        [
            {"a": "question one here", "b": "answer one is here"},
            {"a": None},
            {"a": "skip me", "b": "x"},
            {"a": "question two here", "b": "answer two text"},
        ],
    )
    (d / "py.py").write_text(
        "from kalm.data.recipes import Recipe, SourceSpec\n"
        "RECIPE = Recipe(name='py', category='c', stage='pretrain', task_type='retrieval',\n"
        "                source=SourceSpec(format='jsonl', path='raw.jsonl'))\n"
        "def to_row(raw):\n"
        "    if raw['a'] == 'skip me':\n        return None\n"
        "    return {'query': raw['a'].upper(), 'pos': raw['b']}\n"
    )
    root = DataRoot.from_uri(str(tmp_path / "data"))
    m = run_ingest_recipe(get_recipe("py", [d]), root, IngestConfig()).manifest
    assert m["rows_out"] == 2 and m["drops"] == {"adapter_error": 1, "adapter_skip": 1}


def test_recipes_path_env_and_duplicate_names(recipe_dir, tmp_path: Path, monkeypatch) -> None:
    folder = recipe_dir("faq", faq_rows(5))
    recipe_dir("other_faq", faq_rows(5))
    monkeypatch.setenv("KALM_RECIPES_PATH", str(folder))
    assert get_recipe("faq").path == folder / "faq.yaml"
    other = tmp_path / "other"
    other.mkdir()
    (other / "faq.yaml").write_text((folder / "faq.yaml").read_text())
    with pytest.raises(KalmError, match="defined twice"):  # ambiguous: neither file is used
        get_recipe("faq", [other])
    assert get_recipe("other_faq", [other]).name == "other_faq"  # the others are unaffected
    assert os.environ["KALM_RECIPES_PATH"] == str(folder)


def test_broken_recipe_file_is_reported_and_only_its_users_fail(recipe_dir, tmp_path: Path) -> None:
    """One broken file does not stop discovery: it is reported (path + error, one line) and excluded;
    only asking for that recipe fails. Discovery runs once per set of files (memoised per process)."""
    from kalm.data.recipes import discover

    folder = recipe_dir("faq", faq_rows(5))
    (folder / "broken.yaml").write_text("name: broken\nstage: finetune\nextra_key: 1\n")
    (folder / "bad_py.py").write_text("raise RuntimeError('boom')\n")
    found = discover([folder])
    assert "faq" in found and "broken" not in found and "api_docs" in found
    assert set(found.broken) == {str(folder / "broken.yaml"), str(folder / "bad_py.py")}
    assert all("\n" not in e for e in found.broken.values())
    with pytest.raises(KalmError, match="broken.yaml.*unknown key 'extra_key'"):
        found.get("broken")
    with pytest.raises(KalmError, match="bad_py.py: failed to import: RuntimeError: boom"):
        found.get("bad_py")
    assert discover([folder]) is found  # same files: not imported again
    (folder / "broken.yaml").unlink()
    (folder / "bad_py.py").unlink()
    assert discover([folder]) is not found and not discover([folder]).broken
