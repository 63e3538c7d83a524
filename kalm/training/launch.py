"""Launch a training job as a subprocess under DeepSpeed's launcher, torchrun, or a single process.

The command is built from the config's ``launch`` block; checks that can fail run first, in this process
(:func:`kalm.training.train.preflight`), so a bad config never starts workers. Every rank reads one
resolved config file written next to the run. The job's output is streamed to the logger line by line; a
failure raises with the last lines of the log.

    cmd = launch_command("data/runs/finetune/x/config.yaml", "./data", nproc=2, launcher="torchrun")
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kalm.core.config import dump_yaml, with_updates
from kalm.core.errors import KalmError
from kalm.core.fingerprint import model_fingerprint
from kalm.core.hashing import hash_obj
from kalm.core.layout import MANIFEST, run_rel
from kalm.core.process import guarded
from kalm.core.results import StageResult
from kalm.core.storage import DataRoot
from kalm.training.config import TrainConfig
from kalm.training.dev import BEST_DIR, BEST_FILE
from kalm.training.tracking import TB_DIR

log = logging.getLogger(__name__)
WORKER = "kalm.training.train"  # the module every rank runs


def job_fingerprint(cfg: Any, root: DataRoot, model_dir: str) -> str:
    """What decides a run's result: the full config, the initial model's content, the data's manifests.

    The model enters by content (:func:`kalm.core.fingerprint.model_fingerprint`), not by how it was named
    (``minilm``, ``stage:pretrain`` or a path); where the run writes (``output_dir``) is not part of it."""
    from kalm.training.train import data_sources

    sources = data_sources(cfg, root)
    data = [[s.name, s.rows, s.weight, s.files] for s in sources]
    manifests = []
    for folder in sorted({f.rsplit("/", 1)[0] for s in sources for f in s.files}):  # merged: several
        m = json.loads(root.fs.open_input_stream(f"{folder}/{MANIFEST}").read())
        # what identifies the folder's content: its inputs, config, miner (mined shards), teacher (scored
        # shards) and files; a folder rebuilt from other inputs gets other values even when its file names
        # and row counts repeat
        keys = ("input_fingerprint", "fingerprint", "config_hash", "miner", "teacher", "files")
        ident = {k: m[k] for k in keys if k in m}
        manifests.append(ident or m.get("created_at"))
    cfg_dump = cfg.model_dump(mode="json")
    cfg_dump.pop("output_dir", None)
    cfg_dump.pop("tracking", None)  # how a run is watched, not what it computes
    if not cfg.dev.every:  # off: the same job as before the key existed
        cfg_dump.pop("dev", None)
    elif cfg.dev.final == "last":  # scored, but final/ is the same model
        cfg_dump["dev"] = {"final": "last"}
    cfg_dump["model"].pop("path", None)
    for key in ("node_rank", "master_addr", "master_port", "forward_env"):  # where, not what: every node of
        cfg_dump["launch"].pop(key, None)  # a job, and a rerun on another port, compute the same fingerprint
    model_fp = model_fingerprint(model_dir)
    from kalm.training.sampler import STATE_FORMAT  # another batch order is another result

    return hash_obj(
        {"config": cfg_dump, "model": model_fp, "data": data, "manifests": manifests, "sampler": STATE_FORMAT}
    )


SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY_ID", "CREDENTIAL")


def forwarded_env(env: dict[str, str], forward: list[str]) -> tuple[dict[str, str], list[str]]:
    """(variables to forward to the other nodes, names withheld as credentials). ``forward`` holds names
    and prefixes (ending in ``_``). Credentials are never written to disk or put on a command line (the
    deepspeed launcher logs its ssh command): every node needs its own (instance role, ~/.aws, HF login)."""
    picked = {
        k: v
        for k, v in sorted(env.items())
        if any(k == f or (f.endswith("_") and k.startswith(f)) for f in forward) and "\n" not in v
    }
    withheld = [k for k in picked if any(w in k.upper() for w in SECRET_WORDS)]
    return {k: v for k, v in picked.items() if k not in withheld}, withheld


def write_deepspeed_env(out: Path, env: dict[str, str], forward: list[str]) -> Path:
    """``<run>/.deepspeed_env`` (KEY=VALUE lines, the format DeepSpeed's runner reads via DS_ENV_FILE)."""
    picked, withheld = forwarded_env(env, forward)
    if withheld:
        log.warning(
            "not forwarded to the other nodes (credentials are never written): %s; give every node its own",
            ", ".join(withheld),
        )
    path = out / ".deepspeed_env"
    path.write_text("".join(f"{k}={v}\n" for k, v in picked.items()))
    path.chmod(0o600)
    return path


class TrainingFailed(RuntimeError):
    """The job exited non-zero; the message holds the tail of its log."""


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch without CUDA support or a broken driver: CPU
        return 0


def launch_command(
    config_file: str | Path,
    data_root: str | None,
    *,
    launcher: str = "auto",
    nproc: int | None = None,
    hostfile: str | None = None,
    master_port: int | None = None,
    deepspeed_enabled: bool = True,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
) -> list[str]:
    """The argv that runs ``kalm.training.train`` on one resolved config file with the chosen launcher.

    ``nnodes > 1``: torchrun's static rendezvous at ``master_addr:master_port`` (the same port on every
    node, so it must be given), this node being ``node_rank``."""
    from kalm.training.train import free_port

    n = nproc or max(1, _gpu_count())
    if nnodes > 1:
        if launcher not in ("auto", "torchrun"):
            raise KalmError("nnodes > 1 is torchrun's multi-node mode (launch.launcher: torchrun)")
        if not (master_addr and master_port):
            raise KalmError("a multi-node torchrun job needs launch.master_addr and launch.master_port")
        launcher = "torchrun"
    if launcher == "auto":
        launcher = "single" if n == 1 and not hostfile else ("deepspeed" if deepspeed_enabled else "torchrun")
    args = ["--config", str(config_file)]
    if data_root:
        args += ["--data-root", data_root]
    port = str(master_port or free_port())
    if launcher == "single":
        return [sys.executable, "-m", WORKER, *args]
    if launcher == "torchrun":
        if hostfile:
            raise KalmError("multi-node runs use the deepspeed launcher (launch.launcher: deepspeed)")
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(n),
            "--nnodes",
            str(nnodes),
            "--node_rank",
            str(node_rank),
            "--master_addr",
            master_addr or "127.0.0.1",
            "--master_port",
            port,
            "-m",
            WORKER,
            *args,
        ]
    if launcher == "deepspeed":
        ds = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        cmd = [ds, "--master_port", port]
        if hostfile:
            if not Path(hostfile).exists():
                raise KalmError(f"hostfile not found: {hostfile}")
            cmd += ["--hostfile", hostfile]
        else:
            cmd += ["--num_gpus", str(n)]
        return [*cmd, "--module", WORKER, *args]
    raise KalmError(f"unknown launcher {launcher!r} (allowed: auto, deepspeed, torchrun, single)")


RESOLVED_CONFIG = "config.yaml"


# what a job writes in its run
STALE = ("checkpoints", "final", BEST_DIR, BEST_FILE, TB_DIR, "metrics.jsonl", "loss.png", MANIFEST)


def run_training(
    cfg: TrainConfig,
    root: DataRoot,
    *,
    nproc: int | None = None,
    launcher: str | None = None,
    env: dict[str, str] | None = None,
    tail_lines: int = 40,
    overwrite: bool = False,
) -> StageResult:
    """Check, launch, stream the log; the result's output is the final model folder.

    ``cfg`` is parsed and validated once, by the caller; the workers read it back from
    ``<run>/config.yaml`` (written here, every key resolved: model path, output folder), never from
    ``--set`` strings. An unchanged job (same config, initial model and data) is a cache hit.

    A run folder holding a *finished* model of another job (config, data or initial model changed under
    the same run name) is refused with a one-line error unless ``overwrite``; with it, the old model is set
    aside (``<run>/.previous/``) and deleted only once the new job has written its final model; a failed
    job puts it back. Checkpoints of an unfinished other job are never resumed into this one."""
    from kalm.training.train import output_dir, preflight

    t0 = time.perf_counter()
    if nproc is not None and nproc < 1:
        raise KalmError(f"--nproc must be at least 1 (got {nproc})")
    info = preflight(cfg, root)
    out = output_dir(cfg, root).absolute()  # the workers' directory is the project, not the caller's
    job = job_fingerprint(cfg, root, info["model_dir"])
    if cfg.launch.node_rank > 0:
        return _join(cfg, root, out, job, nproc, launcher, env, tail_lines, t0)
    _restore_previous(out)  # a job killed while an older model was set aside: that model comes back first
    done = out / MANIFEST
    finished = (out / "final" / "kalm_run.json").exists() and done.exists()
    if finished and json.loads(done.read_text()).get("job_fingerprint") == job:
        log.info("%s: unchanged config, data and initial model; cached final model reused", cfg.run_name)
        return _result(cfg, root, out, job, True, t0)
    if finished and not overwrite:
        raise KalmError(
            f"run {cfg.run_name!r} ({out}) holds a finished model of another config, data or initial model: "
            "choose another run_name, or pass --overwrite to replace it"
        )
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "_job.json"
    previous = out / ".previous"
    if marker.exists() and json.loads(marker.read_text()).get("job_fingerprint") != job:
        # another job wrote here before: its checkpoints must not be resumed into this one
        if finished:
            log.warning("%s: replacing the finished model of another job (--overwrite)", cfg.run_name)
            previous.mkdir()
            for name in STALE:
                if (out / name).exists():
                    os.replace(out / name, previous / name)
            shutil.copy2(marker, previous / "_job.json")
        else:
            log.info("%s: config, data or model changed; starting fresh", cfg.run_name)
            for name in STALE:
                p = out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    from kalm.training.checkpoints import checkpoint_dir, complete_checkpoints, rank_of, verify_checkpoint

    if done_tags := complete_checkpoints(out):  # the one a resume would load: checked here, in one line
        # (each rank checks its own files again; on a node-local disk the other nodes' are elsewhere)
        verify_checkpoint(checkpoint_dir(out) / done_tags[-1], lambda name: rank_of(name) is None)
    paths = {"model.path": info["model_dir"], "output_dir": str(out)}
    if info["deepspeed_config"]:
        paths["deepspeed.config"] = info["deepspeed_config"]  # resolved here: the workers run in the project
    resolved = with_updates(cfg, paths, cfg.run_name)
    config_file = out / RESOLVED_CONFIG
    config_file.write_text(dump_yaml(resolved), encoding="utf-8")
    marker.write_text(json.dumps({"job_fingerprint": job, "config": str(config_file)}))
    try:
        _launch(cfg, root, out, config_file, nproc, launcher, env, tail_lines)
    except BaseException:
        if previous.exists():
            for name in STALE:  # the failed job's partial outputs go; the old finished model comes back
                p = out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            _restore_previous(out)
            log.warning("%s: the new job failed; the previous finished model was put back", cfg.run_name)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return _result(cfg, root, out, job, False, t0)


def _join(
    cfg: TrainConfig,
    root: DataRoot,
    out: Path,
    job: str,
    nproc: int | None,
    launcher: str | None,
    env: dict[str, str] | None,
    tail_lines: int,
    t0: float,
    wait_s: float = 900.0,
) -> StageResult:
    """Node ``node_rank > 0`` of a torchrun multi-node job: node 0 owns the run folder (on storage every
    node shares); this node waits for its resolved config of the same job, then starts its ranks."""
    done, marker = out / MANIFEST, out / "_job.json"
    deadline = time.monotonic() + wait_s
    while True:
        if done.exists() and json.loads(done.read_text()).get("job_fingerprint") == job:
            return _result(cfg, root, out, job, True, t0)  # node 0 found it finished: nothing to run
        try:
            mine = json.loads(marker.read_text()).get("job_fingerprint") == job
        except (OSError, ValueError):
            mine = False
        if mine and (out / RESOLVED_CONFIG).exists():
            break
        if time.monotonic() > deadline:
            raise KalmError(
                f"node {cfg.launch.node_rank}: node 0 did not set up {out} for this job in {wait_s:.0f} s "
                "(start `kalm train` on node 0 too; the run folder must be on storage every node shares)"
            )
        time.sleep(0.5)
    _launch(cfg, root, out, out / RESOLVED_CONFIG, nproc, launcher, env, tail_lines)
    return _result(cfg, root, out, job, False, t0)


def _restore_previous(out: Path) -> None:
    """Move a set-aside finished model (``<run>/.previous/``) back into the run folder."""
    previous = out / ".previous"
    if not previous.exists():
        return
    if not (previous / "final" / "kalm_run.json").exists():
        shutil.rmtree(previous, ignore_errors=True)  # never a finished model: nothing to restore
        return
    for name in STALE:
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in previous.iterdir():
        os.replace(p, out / p.name)
    previous.rmdir()


def _launch(
    cfg: TrainConfig,
    root: DataRoot,
    out: Path,
    config_file: Path,
    nproc: int | None,
    launcher: str | None,
    env: dict[str, str] | None,
    tail_lines: int,
) -> None:
    cmd = launch_command(
        config_file,
        root.uri,
        launcher=launcher or cfg.launch.launcher,
        nproc=nproc or cfg.launch.nproc_per_node,
        hostfile=cfg.launch.hostfile,
        master_port=cfg.launch.master_port,
        deepspeed_enabled=cfg.deepspeed.enabled,
        nnodes=cfg.launch.nnodes,
        node_rank=cfg.launch.node_rank,
        master_addr=cfg.launch.master_addr,
    )
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    child_env.setdefault("DS_ACCELERATOR", "cpu" if _gpu_count() == 0 else "cuda")
    # the workers import this project by module name: make sure they find it whatever the cwd
    project = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [project, child_env.get("PYTHONPATH", "")]))
    if cfg.launch.hostfile:  # the deepspeed launcher starts the other nodes over ssh: what they need
        child_env["DS_ENV_FILE"] = str(write_deepspeed_env(out, child_env, cfg.launch.forward_env))
    log.info("launching: %s", " ".join(cmd))
    cmd = guarded(cmd)  # the launcher goes when `kalm train` is killed (kalm.core.process)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env,
        cwd=project,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            log.info("%s", line)
        code = proc.wait()
    if code != 0:
        raise TrainingFailed(
            f"training job {cfg.run_name} failed (exit {code}); last lines:\n" + "\n".join(tail)
        )
    final = out / "final"
    if not (final / "kalm_run.json").exists():
        raise TrainingFailed(f"training job {cfg.run_name} exited 0 but wrote no final model in {final}")


def _result(cfg: TrainConfig, root: DataRoot, out: Path, job: str, cached: bool, t0: float) -> StageResult:
    """The run's result; with an S3 data root the final model is uploaded there too (second output)."""
    final = out / "final"
    outputs = [str(final)]
    if not root.is_local:
        rel = f"{run_rel(cfg.stage, cfg.run_name)}/final"
        if not (cached and root.exists(f"{rel}/kalm_run.json")):
            from pyarrow import fs as pafs

            pafs.copy_files(
                str(final),
                root.path(rel),
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=root.fs,
            )
        outputs.append(root.full_uri(rel))
    manifest = json.loads((out / MANIFEST).read_text())
    return StageResult(
        stage="train",
        name=cfg.run_name,
        outputs=outputs,
        rows=manifest.get("steps"),
        cached=cached,
        seconds=round(time.perf_counter() - t0, 3),
        lineage={
            "job_fingerprint": job,
            "initial_model": manifest.get("initial_model"),
            "model_fingerprint": manifest.get("model_fingerprint"),
            "sources": manifest.get("sources"),
        },
        manifest=manifest,
    )
