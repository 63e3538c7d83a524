"""Training checkpoints: what a job writes, what it agrees to load, and their copy on an S3 data root.

``<run>/checkpoints/<tag>/`` holds DeepSpeed's files (``mp_rank_00_model_states.pt`` from rank 0,
``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` from every rank), one ``rng_rank<r>.pt`` per rank (DeepSpeed
keeps the client state of rank 0 only, and dropout differs per rank), and ``kalm_complete.json``, written
once every rank has saved: the step, the job's fingerprint, and size + sha256 of every file *from every
rank* (gathered, so a node that sees only its own files on a node-local disk still writes a whole record).
A folder without it was cut short (kill -9 while saving) and is never resumed; a file that differs from
the record, or one it does not list, is refused in one line (a planted pickle never loads).

With an S3 data root every rank uploads the files it wrote as soon as they are written, the marker goes up
last (``<root>/runs/<stage>/<run>/checkpoints/<tag>/``), and a node whose local disk lacks the newest
complete checkpoint of this job (a new node, a lost disk) downloads it before resuming.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kalm.core.errors import KalmError
from kalm.core.storage import DataRoot

log = logging.getLogger(__name__)
CHECKPOINT_DONE = "kalm_complete.json"  # written once every rank has saved: the checkpoint is whole
RNG_FILE = "rng_rank{rank:05d}.pt"
_PER_RANK = re.compile(r"zero_pp_rank_(\d+)_|rng_rank(\d+)\.pt$")


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def rank_of(name: str) -> int | None:
    """The rank a per-rank file belongs to (optimizer shard, RNG state); None for files every rank loads."""
    m = _PER_RANK.search(name)
    return None if m is None else int(m.group(1) or m.group(2))


def owned_by(name: str, rank: int) -> bool:
    """Whether ``rank`` wrote ``name``: its per-rank files; rank 0 also the shared ones (model states)."""
    r = rank_of(name)
    return r == rank if r is not None else rank == 0


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(path: Path) -> None:
    state = torch.load(path, weights_only=True)  # tensors only: nothing in it can run code
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_files(d: Path, keep: Callable[[str], bool] = lambda _: True) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the files of a checkpoint folder that ``keep`` selects (its marker aside)."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(p for p in d.rglob("*") if p.is_file() and p.name != CHECKPOINT_DONE):
        name = f.relative_to(d).as_posix()
        if not keep(name):
            continue
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[name] = {"bytes": f.stat().st_size, "sha256": h.hexdigest()}
    return out


def write_marker(d: Path, step: int, job: str | None, files: dict[str, dict[str, Any]]) -> None:
    """The completion marker, atomically (nodes sharing a disk may each write the same one)."""
    tmp = d / f".{CHECKPOINT_DONE}.{os.getpid()}"
    tmp.write_text(json.dumps({"step": step, "job": job, "files": files}))
    os.replace(tmp, d / CHECKPOINT_DONE)


def verify_checkpoint(d: Path, needed: Callable[[str], bool] = lambda _: True) -> None:
    """Refuse (one-line KalmError) a checkpoint folder holding a file its record does not list, or one
    that differs from it; a listed file ``needed`` selects (a rank's own, the shared ones) must be there."""
    recorded = json.loads((d / CHECKPOINT_DONE).read_text()).get("files")
    if recorded is None:
        raise KalmError(
            f"checkpoint {d} has no checksums (written by an older version): delete it to start over"
        )
    found = checkpoint_files(d)
    extra = sorted(set(found) - set(recorded))
    changed = sorted(k for k in recorded if (k in found or needed(k)) and found.get(k) != recorded[k])
    if extra or changed:
        what = f"{'added' if extra else 'changed or missing'}: {(extra or changed)[0]}"
        raise KalmError(
            f"checkpoint {d} is not what this job wrote ({what}); refusing to load it (delete it)"
        )


def complete_checkpoints(out: Path) -> list[str]:
    """Tags of the checkpoints every rank finished writing, oldest first. DeepSpeed's ``latest`` may name
    one a kill -9 cut short; resuming from that one fails, so resume uses the newest complete one."""
    return sorted(p.parent.name for p in checkpoint_dir(out).glob(f"step*/{CHECKPOINT_DONE}"))


def prune(out: Path, keep: int) -> None:
    """Delete local checkpoints older than the newest ``keep`` complete ones."""
    done = complete_checkpoints(out)
    if not done:
        return
    kept = set(done[-keep:])
    for old in sorted(p.name for p in checkpoint_dir(out).glob("step*") if p.is_dir()):
        if old not in kept and old < done[-1]:  # older than the newest complete one: never needed again
            shutil.rmtree(checkpoint_dir(out) / old, ignore_errors=True)


# -- the copy on an S3 data root -----------------------------------------------------------------------
def upload(root: DataRoot, remote: str, d: Path, names: list[str]) -> None:
    """Stream the named files of local checkpoint folder ``d`` to ``<remote>/<tag>/`` on the data root."""
    for name in names:
        with (
            (d / name).open("rb") as src,
            root.fs.open_output_stream(root.path(f"{remote}/{d.name}/{name}")) as dst,
        ):
            shutil.copyfileobj(src, dst, 8 << 20)


def remote_tags(root: DataRoot, remote: str, job: str | None) -> list[str]:
    """Complete checkpoints of job ``job`` on the data root, oldest first."""
    tags = []
    for tag in root.list_dirs(remote):
        marker = f"{remote}/{tag}/{CHECKPOINT_DONE}"
        if (
            tag.startswith("step")
            and root.exists(marker)
            and json.loads(root.read_bytes(marker)).get("job") == job
        ):
            tags.append(tag)
    return sorted(tags)


def pull(root: DataRoot, remote: str, out: Path, job: str | None) -> str | None:
    """Download the newest complete remote checkpoint of this job when the local disk lacks it (a new or
    wiped node); returns the tag downloaded, or None. The marker comes down last."""
    tags = remote_tags(root, remote, job)
    if not tags or tags[-1] in complete_checkpoints(out):
        return None
    tag = tags[-1]
    local = checkpoint_dir(out) / tag
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    record = json.loads(root.read_bytes(f"{remote}/{tag}/{CHECKPOINT_DONE}"))
    for name in record["files"]:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        with (
            root.fs.open_input_stream(root.path(f"{remote}/{tag}/{name}")) as src,
            (local / name).open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 8 << 20)
    (local / CHECKPOINT_DONE).write_text(json.dumps(record))
    (checkpoint_dir(out) / "latest").write_text(tag)
    log.info("downloaded checkpoint %s from %s", tag, root.full_uri(remote))
    return tag


def prune_remote(root: DataRoot, remote: str, keep: int, job: str | None) -> None:
    """Keep this job's newest ``keep`` complete remote checkpoints; delete its older and every other job's
    (a changed config under the same run name starts fresh, there as locally)."""
    mine = remote_tags(root, remote, job)
    if not mine:
        return
    kept = set(mine[-keep:])
    for tag in root.list_dirs(remote):  # a tag newer than our newest complete one may be being written now
        if tag.startswith("step") and tag not in kept and tag < mine[-1]:
            root.delete_dir(f"{remote}/{tag}")
