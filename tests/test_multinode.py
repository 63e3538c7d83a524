"""Multi-node training on one machine: two `kalm train` processes as two "nodes" of one torchrun job (static
rendezvous on loopback, storage shared), killed with -9 mid-run and resumed exactly, dropout on; and the
environment the deepspeed launcher forwards to the other nodes of a hostfile run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kalm.training.launch import forwarded_env
from kalm.training.train import free_port
from tests.test_training import ENV, _config, _weights, data_root, tiny_model  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


def _nodes(cfg: Path, root: str, port: int, log: Path) -> list[subprocess.Popen]:
    """`kalm train` on node 0 and node 1 (one rank each), in their own process groups."""
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "kalm", "train", "--config", str(cfg), "--data-root", root]
        cmd += ["--launcher", "torchrun", "--nproc", "1", "--node-rank", str(rank)]
        cmd += ["--set", "launch.nnodes=2", "--set", "launch.master_addr=127.0.0.1"]
        cmd += ["--set", f"launch.master_port={port}"]
        out = (log.parent / f"{log.name}.node{rank}").open("w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=out, start_new_session=True, cwd=REPO))
    return procs


def _wait(procs: list[subprocess.Popen], log: Path, timeout: float = 400) -> None:
    for rank, p in enumerate(procs):
        rc = p.wait(timeout=timeout)
        text = (log.parent / f"{log.name}.node{rank}").read_text()
        assert rc == 0, f"node {rank} exit {rc}:\n{text[-3000:]}"


@pytest.mark.slow
def test_two_nodes_resume_exactly_after_kill(tmp_path: Path, tiny_model: Path, data_root: str) -> None:  # noqa: F811
    steps = 32  # long enough that the kill lands with steps to redo (asserted below)
    over = {"schedule.max_steps": steps, "schedule.checkpoint_every": 4, "loss.mix_k": 2}
    runs = {}
    for name in ("full", "killed"):
        (tmp_path / name).mkdir()
        runs[name] = _config(tmp_path / name, tiny_model, **over)
    _wait(_nodes(runs["full"], data_root, free_port(), tmp_path / "full.log"), tmp_path / "full.log")
    want = _weights(tmp_path / "full" / "run" / "final")
    info = json.loads((tmp_path / "full" / "run" / "final" / "kalm_run.json").read_text())
    assert info["world_size"] == 2 and info["steps"] == steps

    log = tmp_path / "killed.log"
    procs = _nodes(runs["killed"], data_root, free_port(), log)
    ckpt = tmp_path / "killed" / "run" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(
        int(m.parent.name[4:]) >= 4 for m in ckpt.glob("step*/kalm_complete.json")
    ):
        assert all(p.poll() is None for p in procs), "a node exited before the kill"
        time.sleep(0.02)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)  # kill -9 both nodes, mid-run
        p.wait()
    assert not (tmp_path / "killed" / "run" / "final").exists(), "the job finished before it could be killed"
    complete = sorted(m.parent for m in ckpt.glob("step*/kalm_complete.json"))
    assert complete and sorted(p.name for p in complete[-1].glob("rng_rank*")) == [
        "rng_rank00000.pt",
        "rng_rank00001.pt",
    ]  # each rank's own RNG state, beside DeepSpeed's files
    log2 = tmp_path / "resumed.log"
    _wait(_nodes(runs["killed"], data_root, free_port(), log2), log2)
    for rank in (0, 1):
        found = re.search(
            r"resumed from .* at step (\d+)", (tmp_path / f"resumed.log.node{rank}").read_text()
        )
        assert found and int(found.group(1)) <= steps - 8, "resumed too late to redo steps"
    got = _weights(tmp_path / "killed" / "run" / "final")
    for k in want:
        torch.testing.assert_close(want[k], got[k], rtol=0, atol=1e-6)
    ma = [json.loads(x) for x in (tmp_path / "full" / "run" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "killed" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in mb] == list(range(1, steps + 1))
    assert [round(m["loss"], 5) for m in ma] == [round(m["loss"], 5) for m in mb]


def test_node_options_are_checked_in_one_line(tmp_path: Path, tiny_model: Path) -> None:  # noqa: F811
    cfg = _config(tmp_path, tiny_model)
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
    for sets, msg in (
        (["launch.nnodes=2"], "nnodes > 1 needs master_addr"),
        (
            ["launch.nnodes=2", "launch.node_rank=2", "launch.master_addr=h"],
            "node_rank 2 must be below nnodes 2",
        ),
        (["launch.nnodes=2", "launch.master_addr=h", "launch.hostfile=hf"], "torchrun's multi-node mode"),
    ):
        cmd = [sys.executable, "-m", "kalm", "train", "--config", str(cfg)]
        for s in sets:
            cmd += ["--set", s]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        err = res.stderr.strip()
        assert res.returncode != 0 and msg in err and "Traceback" not in err, err
        assert len(err.splitlines()) == 1, err


def test_the_deepspeed_launcher_forwards_the_environment_but_no_credentials(tmp_path: Path) -> None:
    """The real `deepspeed` runner on a two-host hostfile reads our .deepspeed_env and puts its variables on
    the command it runs on every node (pdsh here is a stand-in that records that command: no ssh in CI)."""
    from kalm.training.launch import write_deepspeed_env

    env = {
        "HF_HOME": "/shared/hf",
        "KALM_DATA_ROOT": "s3://bucket/root",
        "AWS_ENDPOINT_URL": "http://10.0.0.5:8333",
        "AWS_SECRET_ACCESS_KEY": "very-secret",
        "HF_TOKEN": "hf_secret",
        "NCCL_SOCKET_IFNAME": "eth0",
        "HOME": "/root",
    }
    picked, withheld = forwarded_env(env, ["KALM_", "HF_", "AWS_", "NCCL_"])
    assert set(picked) == {"HF_HOME", "KALM_DATA_ROOT", "AWS_ENDPOINT_URL", "NCCL_SOCKET_IFNAME"}
    assert withheld == ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN"]
    path = write_deepspeed_env(tmp_path, env, ["KALM_", "HF_", "AWS_", "NCCL_"])
    assert oct(path.stat().st_mode & 0o777) == "0o600" and "secret" not in path.read_text()

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "pdsh-args"
    (bin_dir / "pdsh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "pdsh").chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DS_ENV_FILE": str(path)}
    run_env["DS_ACCELERATOR"] = "cpu"
    res = subprocess.run(
        [
            deepspeed,
            "--hostfile",
            str(hostfile),
            "--launcher",
            "pdsh",
            "--no_ssh_check",
            "--master_addr",
            "node-a",
        ]
        + ["--module", "x"],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    sent = record.read_text()
    assert "node-a,node-b" in sent
    for k in picked:
        assert f"export {k}=" in sent, sent
    assert "very-secret" not in sent and "hf_secret" not in sent
