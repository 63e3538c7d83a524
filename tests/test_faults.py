"""Faults found by feeding the data stage bad input and kills (issue #12): each one is now a counted,
logged skip or a one-line error; never lost good rows, a crash of the whole stage or a stale folder read
as data."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from kalm.core.errors import KalmError
from kalm.core.layout import MANIFEST, STAGING, mixture_dir, shard_dir
from kalm.core.storage import DataRoot, read_manifest, read_rows
from kalm.data.config import IngestConfig
from kalm.data.ingest import run_ingest_recipe
from kalm.data.mixtures import run_build_stage
from kalm.data.recipes import discover, get_recipe
from kalm.pipeline.data import DataStageFailed, run_data
from kalm.pipeline.runner import LocalRunner
from tests.conftest import faq_rows, write_jsonl

CSV_YAML = """\
name: {name}
category: faq
stage: finetune
task_type: retrieval
language: en
source:
  format: csv
  path: "raw/{name}.csv"
fields: {{query: question, pos: answer}}
"""


def _ingest(folder: Path, name: str, root: DataRoot) -> dict:
    return run_ingest_recipe(get_recipe(name, [folder]), root, IngestConfig()).manifest


def _csv_line(q: str, a: str) -> str:
    return f'"{q}","{a}"\n'


def test_an_unterminated_csv_quote_costs_one_row_and_a_bom_costs_none(tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    (folder / "raw").mkdir(parents=True)
    good = faq_rows(100)
    lines = ["question,answer\n"] + [_csv_line(g["question"], g["answer"]) for g in good]
    lines.insert(11, '"an unclosed quote, answer\n')  # the 11th record opens a quote it never closes
    (folder / "broken.yaml").write_text(CSV_YAML.format(name="broken"))
    (folder / "raw" / "broken.csv").write_text("".join(lines))
    (folder / "bom.yaml").write_text(CSV_YAML.format(name="bom"))
    (folder / "raw" / "bom.csv").write_bytes(b"\xef\xbb\xbf" + "".join(lines[:1] + lines[12:]).encode())
    root = DataRoot.from_uri(str(tmp_path / "data"))
    m = _ingest(folder, "broken", root)
    assert m["rows_out"] == 100 and m["drops"] == {"malformed_csv": 1}
    got = {r["query"] for r in read_rows(root, shard_dir("finetune", "broken")).to_pylist()}
    assert got == {g["question"] for g in good}
    m = _ingest(folder, "bom", root)  # the BOM would make "question" a missing field on every row
    assert m["rows_out"] == 90 and m["drops"] == {}


def test_one_bad_record_is_a_counted_skip_not_the_end_of_its_recipe(recipe_dir, tmp_path: Path) -> None:
    good = faq_rows(40)
    nested = "[" * 100_000 + "]" * 100_000  # RecursionError inside json.loads
    surrogate = '{"question": "lone \\ud800 surrogate?", "answer": "an escape that decodes to no text"}'
    folder = recipe_dir("faq", good[:20] + [nested, surrogate] + good[20:])
    raw = folder / "raw" / "faq" / "part-0.jsonl"
    raw.write_bytes(b"\xef\xbb\xbf" + raw.read_bytes())  # a BOM must not cost the first row
    root = DataRoot.from_uri(str(tmp_path / "data"))
    m = _ingest(folder, "faq", root)
    assert m["rows_out"] == 40
    assert m["drops"] == {"malformed_json": 1, "invalid_utf8_line": 1}


def test_a_truncated_gzip_keeps_the_rows_before_the_cut(recipe_dir, tmp_path: Path) -> None:
    good = faq_rows(400)
    folder = recipe_dir("faq", [])
    (folder / "faq.yaml").write_text((folder / "faq.yaml").read_text().replace("*.jsonl", "*.jsonl.gz"))
    data = gzip.compress("".join(json.dumps(g) + "\n" for g in good).encode())
    (folder / "raw" / "faq" / "part-0.jsonl").unlink()
    (folder / "raw" / "faq" / "part-0.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])
    root = DataRoot.from_uri(str(tmp_path / "data"))
    m = _ingest(folder, "faq", root)
    assert m["drops"].get("truncated_file") == 1
    assert 100 < m["rows_out"] < 400  # the readable part survives, in order
    got = [r["query"] for r in read_rows(root, shard_dir("finetune", "faq")).to_pylist()]
    assert set(got) <= {g["question"] for g in good}


def test_a_to_row_that_omits_a_field_or_raises_skips_that_record(tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    write_jsonl(folder / "raw" / "py.jsonl", faq_rows(30))
    (folder / "py.py").write_text(
        textwrap.dedent(
            """
            from kalm.data.recipes import Recipe, SourceSpec
            RECIPE = Recipe(name="py", category="faq", stage="finetune", task_type="retrieval",
                            language="en", source=SourceSpec(format="jsonl", path="raw/py.jsonl"))
            def to_row(raw):
                n = int(raw["question"].split(":")[0].split()[-1])
                if n % 10 == 3:
                    return {"query": raw["question"]}  # no positive
                if n % 10 == 7:
                    raise ValueError("planted")
                return {"query": raw["question"], "pos": [raw["answer"]]}
            """
        )
    )
    root = DataRoot.from_uri(str(tmp_path / "data"))
    m = _ingest(folder, "py", root)
    assert m["rows_out"] == 24 and m["drops"] == {"missing_field": 3, "adapter_error": 3}


def test_an_empty_recipe_does_not_break_its_stage_mixture(recipe_dir, tmp_path: Path) -> None:
    folder = recipe_dir("good", faq_rows(30))
    recipe_dir("empty", ["garbage", "{not json"])
    root = DataRoot.from_uri(str(tmp_path / "data"))
    for name in ("good", "empty"):
        _ingest(folder, name, root)
    assert read_manifest(root, shard_dir("finetune", "empty"))["rows_out"] == 0
    results = run_build_stage("finetune", ["empty", "good"], root, IngestConfig())
    assert [(r.name, r.rows) for r in results] == [("good", 30)]
    assert read_manifest(root, mixture_dir("finetune", "empty")) is None
    # and again: a second run of the stage is not broken by the first
    assert [r.cached for r in run_build_stage("finetune", ["empty", "good"], root, IngestConfig())] == [True]


def test_one_failing_recipe_fails_only_itself_and_names_itself(recipe_dir, tmp_path: Path) -> None:
    folder = recipe_dir("alpha", faq_rows(20, "alpha"))
    recipe_dir("beta", faq_rows(20, "beta"))
    (folder / "gamma.yaml").write_text(
        (folder / "alpha.yaml").read_text().replace("alpha", "gamma").replace("raw/gamma", "raw/nowhere")
    )
    found = discover([str(folder)])
    todo = [found.get(n) for n in ("alpha", "beta", "gamma")]
    root = DataRoot.from_uri(str(tmp_path / "data"))
    with pytest.raises(DataStageFailed) as info:
        run_data(LocalRunner(), todo, found, root, IngestConfig())
    err = info.value
    assert list(err.failed) == ["gamma"] and "gamma" in str(err) and "\n" not in str(err)
    assert sorted(m.name for m in err.mixtures) == ["alpha", "beta"]
    assert read_manifest(root, mixture_dir("finetune", "alpha"))["rows_out"] == 20


def test_checksums_catch_byte_flips_and_truncation(recipe_dir, tmp_path: Path) -> None:
    folder = recipe_dir("faq", faq_rows(50))
    root = DataRoot.from_uri(str(tmp_path / "data"))
    m = _ingest(folder, "faq", root)
    entry = m["files"][0]
    assert entry["bytes"] > 0 and len(entry["sha256"]) == 64
    run_build_stage("finetune", ["faq"], root, IngestConfig())
    shard = Path(root.path(shard_dir("finetune", "faq"), entry["name"]))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(KalmError, match="changed after it was written"):
        read_rows(root, shard_dir("finetune", "faq"))
    # a truncated mixture shard is not a cache hit: the mixture is rebuilt (from the repaired shards)
    run_ingest_recipe(get_recipe("faq", [folder]), root, IngestConfig(), force=True)
    mix = Path(root.path(mixture_dir("finetune", "faq"), "part-00000.parquet"))
    mix.write_bytes(mix.read_bytes()[:-100])
    (res,) = run_build_stage("finetune", ["faq"], root, IngestConfig())
    assert not res.cached and res.rows == 50
    assert read_rows(root, mixture_dir("finetune", "faq")).num_rows == 50


def test_ingest_notices_a_cut_shard_instead_of_calling_it_cached(recipe_dir, tmp_path: Path) -> None:
    folder = recipe_dir("faq", faq_rows(50))
    root = DataRoot.from_uri(str(tmp_path / "data"))
    m = _ingest(folder, "faq", root)
    shard = Path(root.path(shard_dir("finetune", "faq"), m["files"][0]["name"]))
    shard.write_bytes(shard.read_bytes()[:200])
    res = run_ingest_recipe(get_recipe("faq", [folder]), root, IngestConfig())
    assert not res.cached and read_rows(root, shard_dir("finetune", "faq")).num_rows == 50


def test_a_publish_killed_between_its_renames_leaves_no_second_folder(tmp_path: Path, monkeypatch) -> None:
    root = DataRoot.from_uri(str(tmp_path / "data"))
    parent = "mixtures/finetune"

    def build(rows: int) -> str:
        staging = root.staging_dir(f"{parent}/big")
        root.write_json(f"{staging}/{MANIFEST}", {"rows_out": rows, "files": []})
        return staging

    root.publish_dir(build(1), f"{parent}/big")
    real = os.replace
    calls = []

    def dies_after_first(a, b):  # a kill -9 right after the old folder was moved away
        calls.append((a, b))
        real(a, b)
        if len(calls) == 1:
            raise KeyboardInterrupt

    staging = build(2)
    monkeypatch.setattr(os, "replace", dies_after_first)
    with pytest.raises(KeyboardInterrupt):
        root.publish_dir(staging, f"{parent}/big")
    monkeypatch.setattr(os, "replace", real)
    assert root.list_dirs(parent) == []  # the old folder is hidden in .staging, never `big.old-XXXX` beside
    leftovers = root.list_all_dirs(f"{parent}/{STAGING}")
    assert len(leftovers) == 2 and any(".old-" in d for d in leftovers)
    root.publish_dir(build(3), f"{parent}/big")  # the next build of `big` sweeps what the kill left
    assert root.list_dirs(parent) == ["big"] and root.list_all_dirs(f"{parent}/{STAGING}") == []
    assert read_manifest(root, f"{parent}/big")["rows_out"] == 3


def test_kill_9_during_repeated_publishes_never_shows_a_second_recipe(tmp_path: Path) -> None:
    """A real kill -9 of a process that keeps republishing a folder: whenever it dies, the parent lists
    only the final name (complete or missing), and the next build cleans up."""
    data = tmp_path / "data"
    script = textwrap.dedent(
        f"""
        import sys
        from kalm.core.storage import DataRoot
        root = DataRoot.from_uri({str(data)!r})
        i = 0
        while True:
            s = root.staging_dir("shards/finetune/big")
            for k in range(20):
                root.write_json(f"{{s}}/f{{k}}.json", {{"k": k}})
            root.write_json(f"{{s}}/_manifest.json", {{"rows_out": i, "files": []}})
            root.publish_dir(s, "shards/finetune/big")
            i += 1
            if i == 3:
                print("ready", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = DataRoot.from_uri(str(data))
    assert root.list_dirs("shards/finetune") in ([], ["big"])
    s = root.staging_dir("shards/finetune/big")
    root.write_json(f"{s}/_manifest.json", {"rows_out": -1, "files": []})
    root.publish_dir(s, "shards/finetune/big")
    assert root.list_dirs("shards/finetune") == ["big"]
    assert root.list_all_dirs(f"shards/finetune/{STAGING}") == []


def test_spill_folders_of_killed_ingests_are_removed(recipe_dir, tmp_path: Path) -> None:
    folder = recipe_dir("faq", faq_rows(10))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = Path(tempfile.gettempdir()) / f"kalm-faq-{int(dead.stdout)}-stale"
    live = Path(tempfile.gettempdir()) / f"kalm-faq-{os.getpid()}-live"
    for d in (stale, live):
        d.mkdir(exist_ok=True)
        (d / "spill.parquet").write_bytes(b"x" * 1000)
    try:
        _ingest(folder, "faq", DataRoot.from_uri(str(tmp_path / "data")))
        assert not stale.exists() and live.exists()  # a live process's spill is never touched
    finally:
        for d in (stale, live):
            if d.exists():
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()


@pytest.mark.slow
def test_data_run_all_with_a_failing_recipe_exits_non_zero_naming_it(recipe_dir, tmp_path: Path) -> None:
    """Through the CLI and the Prefect flow: the good recipes' shards and mixtures are built, the command
    fails with one line naming the failed recipe, no traceback."""
    folder = recipe_dir("alpha", faq_rows(20, "alpha"))
    tagged = (folder / "alpha.yaml").read_text() + "tags: [t12]\n"
    (folder / "alpha.yaml").write_text(tagged)
    (folder / "gamma.yaml").write_text(tagged.replace("alpha", "gamma").replace("raw/gamma", "raw/nowhere"))
    data = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "kalm", "data", "run", "--all", "--tag", "t12"]
        + ["--recipes-dir", str(folder), "--data-root", str(data)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "gamma" in errors[0] and "1 of 2 recipe(s)" in errors[0]
    assert "Traceback" not in proc.stderr
    assert read_manifest(DataRoot.from_uri(str(data)), mixture_dir("finetune", "alpha"))["rows_out"] == 20


def test_the_training_sampler_verifies_each_shard_it_loads(recipe_dir, tmp_path: Path) -> None:
    """Training reads shard files directly (not through read_rows): it checks the manifest's sha256 too."""
    from kalm.training.sampler import HomogeneousSampler, ShardSource

    folder = recipe_dir("faq", faq_rows(20))
    root = DataRoot.from_uri(str(tmp_path / "data"))
    m = _ingest(folder, "faq", root)
    (f,) = m["files"]
    path = root.path(shard_dir("finetune", "faq"), f["name"])

    def sampler() -> HomogeneousSampler:
        src = ShardSource("faq", [path], m["rows_out"], 1.0, sha256=[f["sha256"]])
        return HomogeneousSampler([src], per_device=4, world=1, rank=0, group_size=1, seed=0)

    assert len(sampler().next_batch().queries) == 4
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 3] ^= 0x10
    Path(path).write_bytes(bytes(data))
    with pytest.raises(KalmError, match="changed after it was written"):
        sampler().next_batch()
