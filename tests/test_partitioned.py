"""The partitioned data stage (issue #12) on real files: local processes and a real Ray cluster
(``ray start --head`` on loopback, two worker processes) give the same rows in the same shards; a worker
or the driver killed with SIGKILL resumes at partition granularity; bad input is counted, never fatal."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm.core.errors import KalmError
from kalm.core.layout import MANIFEST, mixture_dir
from kalm.core.storage import DataRoot, read_manifest, read_rows
from kalm.data import minhash
from kalm.data.config import IngestConfig
from kalm.data.distributed import run_stage_distributed, work_root
from kalm.data.executors import Executor, LocalExecutor, RayExecutor
from kalm.data.ingest import _pair_rows, near_text
from kalm.data.partitions import Partition, plan_partitions, read_partition
from kalm.data.readers import read_jsonl
from kalm.data.recipes import discover, load_recipe_file
from tests.conftest import FAQ_YAML, faq_rows, write_jsonl

# not imported here: Ray reads its auth token settings once, so the cluster fixture sets them first
HAVE_RAY = importlib.util.find_spec("ray") is not None  # make test installs the ray extra
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="the ray extra is not installed")

KILLER = '''"""Maps question/answer rows; kills its own process (SIGKILL) the first time it sees "kill"."""
import os, signal
from pathlib import Path
from kalm.data.recipes import Recipe, SourceSpec

RECIPE = Recipe(name="{name}", category="faq", stage="finetune", task_type="retrieval",
                source=SourceSpec(format="jsonl", path="raw/{name}/*.jsonl"),
                instruction="Given a question, retrieve the answer that addresses it")
FLAG = Path({flag!r})


def to_row(raw):
    if raw.get("kill") and not FLAG.exists():
        FLAG.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return {{"query": raw["question"], "pos": [raw["answer"]]}}
'''


def _edit(text: str) -> str:
    return text[:20] + "Q" + text[21:40] + "Z" + text[41:]


def _cfg(**kw: Any) -> IngestConfig:
    cfg = IngestConfig(**{"partition_bytes": 16 * 1024, "reduce_unit_rows": 300, **kw})
    return cfg.model_copy(
        update={"decontamination": cfg.decontamination.model_copy(update={"eval_config": None})}
    )


def _stage_folder(folder: Path) -> Path:
    """alpha: 600 good rows, 40 case-only copies, 40 near copies, 2 malformed lines; beta: 300 rows, 100
    of them alpha's, plus 20 near copies of alpha rows (cross-recipe); gamma: a CSV with a BOM."""
    good = faq_rows(800)
    alpha = good[:600] + [{"question": g["question"].upper(), "answer": g["answer"]} for g in good[:40]]
    alpha += [{"question": g["question"], "answer": _edit(g["answer"])} for g in good[40:80]]
    alpha[300:300] = ['{"question": "broken', "[1, 2]"]
    beta = good[500:800] + [{"question": g["question"], "answer": _edit(g["answer"])} for g in good[100:120]]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("alpha", alpha), ("beta", beta)):
        (folder / f"{name}.yaml").write_text(FAQ_YAML.format(name=name, stage="finetune"))
        write_jsonl(folder / "raw" / name / "part-0.jsonl", rows)
    (folder / "gamma.yaml").write_text(
        FAQ_YAML.format(name="gamma", stage="finetune")
        .replace("*.jsonl", "*.csv")
        .replace("format: jsonl", "format: csv")
    )
    csv = "\ufeffquestion,answer\n" + "".join(
        f'"{g["question"]}","{g["answer"]}"\n' for g in faq_rows(30, "csvrow", seed=5)
    )
    (folder / "raw" / "gamma").mkdir(parents=True)
    (folder / "raw" / "gamma" / "part-0.csv").write_text(csv, encoding="utf-8")
    return folder


def _result(root: DataRoot) -> dict[str, Any]:
    """What must not depend on the executor: per recipe, its drops and its shards' names and checksums."""
    out = {}
    for name in root.list_dirs("mixtures/finetune"):
        m = read_manifest(root, mixture_dir("finetune", name))
        assert m is not None
        out[name] = {
            "drops": m["drops"],
            "rows": m["rows_out"],
            "files": [(f["name"], f["sha256"]) for f in m["files"]],
        }
    return out


def _run(folder: Path, root_dir: Path, ex: Executor, cfg: IngestConfig | None = None) -> dict[str, Any]:
    found = discover([folder])
    recipes = [found.get(n) for n in found if found.get(n).dir == folder]
    root = DataRoot.from_uri(str(root_dir))
    with ex:
        _, _, failed = run_stage_distributed("finetune", recipes, root, cfg or _cfg(), ex)
    assert not failed
    return _result(root)


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not HAVE_RAY:
        pytest.skip("the ray extra is not installed")
    from tests.raycluster import ray_cluster

    with ray_cluster(tmp_path_factory.mktemp("ray")) as address:
        yield address


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = _stage_folder(tmp_path_factory.mktemp("stage") / "recipes")
    return folder, _run(folder, tmp_path_factory.mktemp("ref"), LocalExecutor(1))


# -- partitions ----------------------------------------------------------------------------------------
def test_byte_ranges_own_every_line_once(tmp_path: Path) -> None:
    rows = [{"question": f"q{i} " + "x" * (i * 37 % 500), "answer": f"a{i}"} for i in range(300)]
    rows[7] = {"question": "long " + "y" * 5000, "answer": "spans several ranges"}
    folder = tmp_path / "recipes"
    (folder).mkdir()
    (folder / "big.yaml").write_text(FAQ_YAML.format(name="big", stage="finetune"))
    path = folder / "raw" / "big" / "part-0.jsonl"
    write_jsonl(path, rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a BOM before the first record
    lr = load_recipe_file(folder / "big.yaml")
    import pyarrow.fs as pafs

    whole = list(read_jsonl(pafs.LocalFileSystem(), [str(path)], Counter()))
    assert len(whole) == 300
    for target in (97, 1000, 4096, 10**7):
        parts = plan_partitions(lr, target)
        got = [rec for p in parts for rec in read_partition(lr, p, Counter())]
        assert got == whole, target


def test_parquet_row_groups_are_partitions(tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    (folder / "raw").mkdir(parents=True)
    rows = faq_rows(100)
    pq.write_table(pa.Table.from_pylist(rows), folder / "raw" / "p.parquet", row_group_size=10)
    (folder / "pq.yaml").write_text(
        FAQ_YAML.format(name="pq", stage="finetune")
        .replace("raw/pq/*.jsonl", "raw/*.parquet")
        .replace("format: jsonl", "format: parquet")
    )
    lr = load_recipe_file(folder / "pq.yaml")
    parts = plan_partitions(lr, 1)
    assert [(p.kind, p.start, p.end) for p in parts] == [("row_groups", g, g + 1) for g in range(10)]
    assert [r for p in parts for r in read_partition(lr, p, Counter())] == rows


# -- results ---------------------------------------------------------------------------------------------
def test_planted_duplicates_and_bad_lines(reference: tuple[Path, dict[str, Any]]) -> None:
    _, res = reference
    a, b, g = res["alpha"], res["beta"], res["gamma"]
    assert (
        a["drops"]["exact_dup"] == 40
        and a["drops"]["malformed_json"] == 1
        and a["drops"]["not_an_object"] == 1
    )
    assert 38 <= a["drops"]["near_dup"] <= 40  # LSH recall on two-character edits
    assert b["drops"]["cross_recipe_dup"] == 100 and 18 <= b["drops"]["cross_recipe_near_dup"] <= 20
    assert a["rows"] == 600 + 40 - a["drops"]["near_dup"] and g["rows"] == 30  # the BOM did not cost a row
    assert len(a["files"]) > 3  # one shard per partition


def test_matches_the_in_memory_oracle(reference: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """All rows in recipe, file and line order; exact dedup keeps the first id; near dedup the first of each
    verified LSH cluster (kalm.data.minhash in one process): the same rows survive."""
    folder, _ = reference
    found = discover([folder])
    rows = []
    for name in ("alpha", "beta", "gamma"):
        lr = found.get(name)
        rows += list(_pair_rows(lr, read_partition(lr, Partition(0, "", "source"), Counter()), Counter()))
    seen, first = set(), []
    for r in rows:
        if r["id"] not in seen:
            seen.add(r["id"])
            first.append(r)
    p = minhash.MinHashParams()
    sig = minhash.signatures([near_text(r) for r in first], p)
    keep = minhash.first_of_clusters(
        minhash.duplicate_clusters(minhash.band_hashes(sig, *p.lsh_shape()), sig, p.threshold)
    )
    want = {r["id"] for r, k in zip(first, keep, strict=True) if k}
    root = DataRoot.from_uri(str(tmp_path / "d"))
    _run(folder, tmp_path / "d", LocalExecutor(1))
    got = {
        i
        for n in ("alpha", "beta", "gamma")
        for i in read_rows(root, mixture_dir("finetune", n), ["id"]).column("id").to_pylist()
    }
    assert got == want


def test_same_result_with_two_local_workers(reference: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    folder, ref = reference
    assert _run(folder, tmp_path / "d", LocalExecutor(2)) == ref
    dedup = DataRoot.from_uri(str(tmp_path / "d")).read_json(f"mixtures/finetune/{MANIFEST}")["dedup"]
    # the reduce splits into units by the stage's rows (1,029 signed rows, 300 per unit: 4 per band)
    assert dedup["reduce_units_per_band"] == 4
    # each phase's largest unit measured in its own worker process, and the driver
    peaks = dedup["peak_rss_mb"]
    assert set(peaks) == {"sign", "exact", "bands", "verify1", "verify2", "cluster", "apply", "driver"}
    assert all(30 < v < 4000 for v in peaks.values()), peaks


def test_reduce_unit_count_does_not_change_the_result(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    folder, ref = reference
    assert _run(folder, tmp_path / "d", LocalExecutor(1), _cfg(reduce_unit_rows=10**9)) == ref


def test_slot_files_are_verified_per_slot(tmp_path: Path) -> None:
    """A reduce unit reads only its slots of a sign file and checks each against its checksum: a flipped
    byte fails the slot it is in (one line), a truncated file fails on its size, other slots still read."""
    import numpy as np

    from kalm.data.slots import read_slots, write_slots

    root = DataRoot.from_uri(str(tmp_path / "r"))
    rng = np.random.default_rng(0)
    idh = rng.integers(0, 2**63, 5000, dtype=np.uint64)
    files: list[dict[str, Any]] = []
    slot = (idh >> np.uint64(56)).astype(np.int64)
    write_slots(root, "w", "f.arrow", {"idh": idh, "key": np.arange(5000, dtype=np.uint64)}, slot, 256, files)
    ref = {**files[0], "name": "w/f.arrow"}
    got = read_slots(root, ref, range(10, 20))
    want = (slot >= 10) & (slot < 20)
    rows = np.argsort(slot, kind="stable")  # slot by slot, each in the rows' order
    rows = rows[want[rows]]
    assert np.array_equal(got["idh"], idh[rows]) and np.array_equal(got["key"], rows.astype(np.uint64))
    path = Path(root.path("w/f.arrow"))
    raw = bytearray(path.read_bytes())
    first = int(np.flatnonzero(slot == 0)[0])  # slot 0's first id sits after the schema, in slot 0's batch
    at = raw.find(int(idh[first]).to_bytes(8, "little"))
    assert at > 0
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(KalmError, match=r"f\.arrow changed after it was written \(slot 0's checksum"):
        read_slots(root, ref, range(0, 4))
    assert len(read_slots(root, ref, range(10, 20))["idh"]) == int(want.sum())
    path.write_bytes(bytes(raw[:-100]))
    with pytest.raises(KalmError, match=r"changed after it was written \(\d+ bytes, the marker says"):
        read_slots(root, ref, range(10, 20))


@needs_ray
def test_same_result_on_a_ray_cluster(
    reference: tuple[Path, dict[str, Any]], ray_address: str, tmp_path: Path
) -> None:
    folder, ref = reference
    ex = RayExecutor(2, address=ray_address)
    assert ex.workers == 2  # the cluster's CPUs
    assert _run(folder, tmp_path / "d", ex) == ref


def test_unchanged_rerun_is_cached_and_one_recipe_rerun_keeps_the_others(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    folder, ref = reference
    _run(folder, tmp_path / "d", LocalExecutor(1))
    root = DataRoot.from_uri(str(tmp_path / "d"))
    found = discover([folder])
    recipes = [found.get(n) for n in ("alpha", "beta", "gamma")]
    _, mix, _ = run_stage_distributed("finetune", recipes, root, _cfg(), LocalExecutor(1))
    assert all(m.cached for m in mix)
    _, mix, _ = run_stage_distributed("finetune", recipes, root, _cfg(), LocalExecutor(1), forced=["gamma"])
    assert {m.name: m.cached for m in mix} == {"alpha": True, "beta": True, "gamma": True}  # same rows again
    assert _result(root) == ref


# -- faults ------------------------------------------------------------------------------------------------
def _killer_folder(folder: Path, flag: Path) -> Path:
    folder.mkdir(parents=True)
    rows = faq_rows(400, "kill")
    rows[250] = {**rows[250], "kill": True}
    (folder / "victim.py").write_text(KILLER.format(name="victim", flag=str(flag)))
    write_jsonl(folder / "raw" / "victim" / "part-0.jsonl", rows)
    (folder / "other.yaml").write_text(FAQ_YAML.format(name="other", stage="finetune"))
    write_jsonl(folder / "raw" / "other" / "part-0.jsonl", faq_rows(100, "other", seed=7) + rows[:50])
    return folder


def _killer_reference(tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    flag = tmp_path / "killed.flag"
    folder = _killer_folder(tmp_path / "recipes", flag)
    flag.write_text("no kill")
    ref = _run(folder, tmp_path / "ref", LocalExecutor(1))
    flag.unlink()
    return folder, flag, ref


def test_worker_killed_local(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, flag, ref = _killer_reference(tmp_path)
    with caplog.at_level(logging.WARNING, logger="kalm.data.executors"):
        got = _run(folder, tmp_path / "d", LocalExecutor(2))
    assert flag.exists() and "a worker process died" in caplog.text
    assert got == ref


@needs_ray
def test_worker_killed_ray(tmp_path: Path, ray_address: str) -> None:
    folder, flag, ref = _killer_reference(tmp_path)
    got = _run(folder, tmp_path / "d", RayExecutor(2, address=ray_address))
    assert flag.exists() and int(flag.read_text()) != os.getpid()  # a Ray worker died, and was retried
    assert got == ref


DRIVER = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from kalm.core.storage import DataRoot
from kalm.data.distributed import run_stage_distributed
from kalm.data.executors import LocalExecutor
from kalm.data.recipes import discover
from tests.test_partitioned import _cfg
found = discover([Path(sys.argv[1])])
recipes = [found.get("other"), found.get("victim")]
run_stage_distributed("finetune", recipes, DataRoot.from_uri(sys.argv[2]), _cfg(), LocalExecutor(1))
"""


def test_driver_killed_resumes_only_unfinished_partitions(tmp_path: Path) -> None:
    folder, flag, ref = _killer_reference(tmp_path)
    root_dir = tmp_path / "d"
    cmd = [sys.executable, "-c", DRIVER, str(folder), str(root_dir)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]  # the unit ran in the driver: it died
    root = DataRoot.from_uri(str(root_dir))
    sign = f"{work_root('finetune')}/sign/victim"
    (fp,) = root.list_all_dirs(sign)
    markers = sorted(Path(root.path(f"{sign}/{fp}/_markers")).glob("*.json"))
    finished = {m.name: m.stat().st_mtime_ns for m in markers}
    n_parts = len(plan_partitions(discover([folder]).get("victim"), _cfg().partition_bytes))
    assert 0 < len(finished) < n_parts
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"sign: {n_parts - len(finished)} unit(s)" in second.stderr  # only the unfinished partitions
    assert {m: Path(root.path(f"{sign}/{fp}/_markers/{m}")).stat().st_mtime_ns for m in finished} == finished
    assert _result(root) == ref


def test_bad_records_are_counted_skips(tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    good = faq_rows(50)
    bad: list[Any] = ['{"question": ' * 100_000, '{"question": "lone \\ud800 surrogate", "answer": "x"}']
    (folder / "raw" / "bad").mkdir(parents=True)
    write_jsonl(folder / "raw" / "bad" / "part-0.jsonl", good[:25] + bad + good[25:])
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in faq_rows(40, "gz", seed=9)))
    (folder / "raw" / "bad" / "part-1.jsonl.gz").write_bytes(data[: len(data) // 2])  # cut short
    (folder / "bad.yaml").write_text(FAQ_YAML.format(name="bad", stage="finetune").replace("*.jsonl", "*"))
    res = _run(folder, tmp_path / "d", LocalExecutor(1))["bad"]
    assert res["drops"]["malformed_json"] == 1 and res["drops"]["invalid_utf8_line"] == 1
    assert res["drops"]["truncated_file"] == 1 and 50 < res["rows"] < 90  # the gz lines before the cut


def test_failing_and_empty_recipes(tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    for name, rows in (("good", faq_rows(40)), ("empty", faq_rows(10, "e", seed=3))):
        (folder / "raw" / name).mkdir(parents=True)
        (folder / f"{name}.yaml").write_text(FAQ_YAML.format(name=name, stage="finetune"))
        write_jsonl(folder / "raw" / name / "part-0.jsonl", rows)
    root = DataRoot.from_uri(str(tmp_path / "d"))
    found = discover([folder])
    run_stage_distributed("finetune", [found.get("good"), found.get("empty")], root, _cfg(), LocalExecutor(1))
    assert read_manifest(root, mixture_dir("finetune", "empty")) is not None
    (folder / "raw" / "empty" / "part-0.jsonl").write_bytes(b"garbage\n\x00\x01\n")  # now 0 rows
    (folder / "gone.yaml").write_text(FAQ_YAML.format(name="gone", stage="finetune"))  # no source files
    found = discover([folder])
    _, mix, failed = run_stage_distributed(
        "finetune", [found.get(n) for n in ("good", "empty", "gone")], root, _cfg(), LocalExecutor(1)
    )
    assert list(failed) == ["gone"] and "no files match" in str(failed["gone"])
    assert [m.name for m in mix] == ["good"] and mix[0].rows == 40
    assert read_manifest(root, mixture_dir("finetune", "empty")) is None  # no stale mixture to train on


def test_corrupt_files_and_leftovers(reference: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    folder, ref = reference
    _run(folder, tmp_path / "d", LocalExecutor(1), _cfg(keep_intermediates=True))
    root = DataRoot.from_uri(str(tmp_path / "d"))
    sign = f"{work_root('finetune')}/sign/alpha"
    (fp,) = root.list_all_dirs(sign)
    d = Path(root.path(f"{sign}/{fp}"))
    (d / "p00001.rows.parquet.tmp-0badc0de").write_bytes(b"half")  # a killed unit's half-written file
    trash = Path(root.path("mixtures/finetune/.staging/alpha.old-0123abcd"))
    trash.mkdir(parents=True)
    (trash / MANIFEST).write_text("{}")  # a kill between publish's two renames
    assert root.list_dirs("mixtures/finetune") == ["alpha", "beta", "gamma"]  # never read as a recipe
    shard = Path(root.path(mixture_dir("finetune", "alpha"))) / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])  # a truncated mixture shard is not a cache hit
    rows = d / "p00002.rows.parquet"
    raw = bytearray(rows.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped byte in a partition's rows
    rows.write_bytes(bytes(raw))
    found = discover([folder])
    recipes = [found.get(n) for n in ("alpha", "beta", "gamma")]
    with pytest.raises(KalmError, match=r"p00002\.rows\.parquet changed after it was written"):
        run_stage_distributed("finetune", recipes, root, _cfg(), LocalExecutor(1))
    assert not (d / "p00001.rows.parquet.tmp-0badc0de").exists()
    run_stage_distributed("finetune", recipes, root, _cfg(), LocalExecutor(1), forced=["alpha"])
    assert _result(root) == ref and not trash.exists()


# -- the command and what reads the mixtures -----------------------------------------------------------------
def test_cli_executor_options_and_a_failing_recipe(recipe_dir, tmp_path: Path) -> None:
    """``kalm data run --all --executor local --workers 2`` through the Prefect flow: the good recipe's
    mixture is built, the command exits 2 naming the failed one; bad options are one-line errors."""
    folder = recipe_dir("alpha", faq_rows(20, "alpha"))
    (folder / "gamma.yaml").write_text(
        FAQ_YAML.format(name="gamma", stage="finetune").replace("raw/gamma", "raw/none")
    )
    data = tmp_path / "data"
    base = [
        sys.executable,
        "-m",
        "kalm",
        "data",
        "run",
        "--all",
        "--recipes-dir",
        str(folder),
        "--data-root",
        str(data),
    ]
    for bad, why in ((["--executor", "bogus"], "'kind'"), (["--workers", "0"], "'workers'")):
        proc = subprocess.run(base + bad, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
        assert why in proc.stderr.strip().splitlines()[-1]
    proc = subprocess.run(
        base + ["--stage", "finetune", "--executor", "local", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "gamma" in errors[0] and "Traceback" not in proc.stderr
    root = DataRoot.from_uri(str(data))
    m = read_manifest(root, mixture_dir("finetune", "alpha"))
    assert m is not None and m["rows_out"] == 20
    assert root.read_json("mixtures/finetune/_manifest.json")["engine"] == "partitioned/local"


def test_training_reads_partitioned_mixtures(reference: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from kalm.core.config import CONFIG_DIR
    from kalm.training.config import load_train_config
    from kalm.training.sampler import HomogeneousSampler
    from kalm.training.train import data_sources

    folder, ref = reference
    _run(folder, tmp_path / "d", LocalExecutor(1))
    cfg = load_train_config(
        CONFIG_DIR / "finetune_demo.yaml",
        {"data.recipes": ["alpha", "beta", "gamma"], "data.source": "mixtures", "data.stage": "finetune"},
    )
    sources = data_sources(cfg, DataRoot.from_uri(str(tmp_path / "d")))
    assert {s.name: s.rows for s in sources} == {n: r["rows"] for n, r in ref.items()}
    batch = HomogeneousSampler(sources, per_device=4, world=1, rank=0, group_size=1, seed=0).next_batch()
    assert len(batch.queries) == 4


# -- the fast path gives the per-row path's rows, or declines ---------------------------------------------
def _line(q: Any, a: Any, **extra: Any) -> bytes:
    return json.dumps({"question": q, "answer": a, **extra}).encode() + b"\n"


FAST_CASES: dict[str, tuple[bytes, str]] = {
    "plain": (_line("what is it", "hello world") + _line("how are you", "fine thanks"), ""),
    "ascii controls and spaces": (_line("what\x1c is\x0b it \x7f", "hel\x1flo \t world") + b"   \n\n", ""),
    "keep newlines": (_line("what is it", " a \n\n b \r\n c "), "filters: {keep_newlines: true}\n"),
    "truncate to a space": (_line("what is it", "hello world foo"), "filters: {truncate_chars: 6}\n"),
    "empty and short": (
        _line("", "abc def") + _line("abc", "") + _line("ab", "abcd") + _line(None, "x y z"),
        "",
    ),
    "unicode rows": (_line("Straße İ ﬁ", "Ｆｕｌｌ\u00a0width é") + _line("plain ascii", "row here"), ""),
    "crlf lines": (_line("what is it", "hello world")[:-1] + b"\r\n" + _line("b c d", "e f g"), ""),
    "spaces around lines": (b"  " + _line("a b  c", "d \t\t e") + b"\t" + _line("x y z", " p  q "), ""),
    # the per-row path must judge these (and count them by reason): the fast path declines
    "two objects on a line": (_line("a b c", "d e f")[:-1] + _line("g h i", "j k l"), ""),
    "bare carriage return": (_line("a b c", "d e f")[:-1] + b"\r" + _line("g h i", "j k l"), ""),
    "null line": (_line("a b c", "d e f") + b"null\n" + _line("g h i", "j k l"), ""),
    "bad utf-8 elsewhere": (_line("a b c", "d e f")[:-2] + b',"x":"\xff"}\n', ""),
    "deep nesting elsewhere": (
        _line("a b c", "d e f")[:-2] + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}\n",
        "",
    ),
    "form feed around": (b"\x0c" + _line("a b c", "d e f"), ""),
    "number in a field": (_line(12345, "a list of words"), ""),
}


@pytest.mark.parametrize("case", list(FAST_CASES))
def test_fast_path_equals_the_per_row_path(case: str, tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    from kalm.core.schema import ROW_SCHEMA
    from kalm.data.fastpath import fast_rows

    buf, extra = FAST_CASES[case]
    (tmp_path / "raw" / "r").mkdir(parents=True)
    (tmp_path / "raw" / "r" / "a.jsonl").write_bytes(buf)
    (tmp_path / "r.yaml").write_text(FAQ_YAML.format(name="r", stage="finetune") + extra)
    lr = load_recipe_file(tmp_path / "r.yaml")
    (part,) = plan_partitions(lr, 1 << 20)
    fast_stats, slow_stats = Counter(), Counter()
    fast = fast_rows(lr, part, fast_stats, pafs.LocalFileSystem())  # must not crash (Arrow does on "null")
    slow = list(_pair_rows(lr, read_partition(lr, part, slow_stats), slow_stats))
    declines = list(FAST_CASES).index(case) >= list(FAST_CASES).index("two objects on a line")
    assert (fast is None) == declines
    if fast is not None:
        assert fast.table.equals(pa.Table.from_pylist(slow, schema=ROW_SCHEMA))
        assert fast.near_texts.to_pylist() == [near_text(r) for r in slow]
        assert fast_stats == slow_stats


def test_vectorised_line_check_agrees_with_the_line_by_line_one() -> None:
    """The vectorised layout check either declines (None) or counts what the line-by-line check counts."""
    from kalm.data.fastpath import _loose_lines, _strict_lines

    rng = random.Random(3)
    pieces = [b"{}", b'{"a":"b"}', b"\n", b"\r\n", b" ", b"\t", b"\x0c", b"[", b"{", b"}", b"null", b""]
    agreed = 0
    for _ in range(3000):
        buf = b"".join(rng.choices(pieces, k=rng.randrange(0, 12)))
        strict = _strict_lines(buf)
        assert strict is None or strict == _loose_lines(buf), buf
        agreed += strict is not None
    assert agreed > 300  # the usual layouts take the vectorised check
    deep = b"{" + b"[" * 600 + b"]" * 600 + b"}\n"
    assert _strict_lines(b"{}\n" * 5 + deep) is None and _loose_lines(b"{}\n" * 5 + deep) is None


# -- force, held-out rows, limits ----------------------------------------------------------------------------
def test_force_rebuilds_from_new_rows_and_holdout_follows_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kalm.core.layout import holdout_dir
    from kalm.data import units

    folder = tmp_path / "recipes"
    (folder / "raw" / "r").mkdir(parents=True)
    write_jsonl(folder / "raw" / "r" / "part-0.jsonl", faq_rows(200, "h"))
    (folder / "r.yaml").write_text(FAQ_YAML.format(name="r", stage="finetune") + "holdout: 0.3\n")
    root = DataRoot.from_uri(str(tmp_path / "d"))

    def run(**kw: Any) -> Any:
        _, mix, failed = run_stage_distributed(
            "finetune", [discover([folder]).get("r")], root, _cfg(), LocalExecutor(1), **kw
        )
        assert not failed, failed
        return mix[0]

    first = run()
    held = read_rows(root, holdout_dir("r"), ["id"]).column("id").to_pylist()
    assert 30 < len(held) < 90 and first.rows == 200 - len(held)
    assert not set(held) & set(read_rows(root, mixture_dir("finetune", "r"), ["id"]).column("id").to_pylist())
    orig = units.fast_rows

    def one_row_fewer(*args: Any) -> Any:  # a code change in mapping: the same inputs now give other rows
        fr = orig(*args)
        if fr is not None:
            fr.table, fr.near_texts = fr.table.slice(1), fr.near_texts[1:]
        return fr

    monkeypatch.setattr(units, "fast_rows", one_row_fewer)
    assert run().cached  # nothing changed as far as the inputs know
    again = run(forced=["r"])
    assert not again.cached and again.rows < first.rows  # not the old mixture called cached
    monkeypatch.setattr(units, "fast_rows", orig)
    (folder / "r.yaml").write_text(FAQ_YAML.format(name="r", stage="finetune"))  # no held-out rows now
    assert run().rows == 200 and read_manifest(root, holdout_dir("r")) is None


def test_partition_limits_are_one_line_errors(tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    (folder / "raw" / "r").mkdir(parents=True)
    write_jsonl(folder / "raw" / "r" / "part-0.jsonl", faq_rows(400))
    (folder / "r.yaml").write_text(FAQ_YAML.format(name="r", stage="finetune"))
    from kalm.data import distributed

    root = DataRoot.from_uri(str(tmp_path / "d"))
    lr = discover([folder]).get("r")
    cfg = _cfg().model_copy(update={"partition_bytes": 1024})
    old = distributed.MAX_PARTITIONS
    try:
        distributed.MAX_PARTITIONS = 10
        _, _, failed = run_stage_distributed("finetune", [lr], root, cfg, LocalExecutor(1))
    finally:
        distributed.MAX_PARTITIONS = old
    assert "raise partition_bytes" in str(failed["r"])


RAY_DRIVER = """
import sys
from pathlib import Path
from kalm.core.storage import DataRoot
from kalm.data.distributed import run_stage_distributed
from kalm.data.executors import RayExecutor
from kalm.data.recipes import discover
from tests.test_partitioned import _cfg
found = discover([Path(sys.argv[1])])
with RayExecutor(2, address=sys.argv[3]) as ex:
    run_stage_distributed("finetune", [found.get("other")], DataRoot.from_uri(sys.argv[2]), _cfg(), ex)
"""


@needs_ray
def test_ray_driver_killed_resumes(tmp_path: Path, ray_address: str) -> None:
    """SIGKILL of the driver from outside, once some partitions are signed; the rerun signs only the rest
    and gives the uninterrupted result."""
    import time

    folder = tmp_path / "recipes"
    (folder / "raw" / "other").mkdir(parents=True)
    (folder / "other.yaml").write_text(FAQ_YAML.format(name="other", stage="finetune"))
    write_jsonl(folder / "raw" / "other" / "part-0.jsonl", faq_rows(3000, "big", seed=11))
    ref = _run(folder, tmp_path / "ref", LocalExecutor(1))
    root_dir = tmp_path / "d"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-c", RAY_DRIVER, str(folder), str(root_dir), ray_address]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    n_parts = len(plan_partitions(discover([folder]).get("other"), _cfg().partition_bytes))
    deadline = time.time() + 240
    markers: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        markers = list(root_dir.glob("work/finetune/sign/other/*/_markers/*.json"))
        if len(markers) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(2)  # units already running may still finish and leave their markers
    done_before = {
        m: m.stat().st_mtime_ns for m in root_dir.glob("work/finetune/sign/other/*/_markers/*.json")
    }
    assert 3 <= len(done_before) < n_parts
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {m: m.stat().st_mtime_ns for m in done_before} == done_before  # finished partitions not redone
    assert _result(DataRoot.from_uri(str(root_dir))) == ref
