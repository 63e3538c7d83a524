"""The data-root layout: every path a stage reads or writes, in one place.

Paths are relative to the data root (a local folder or ``s3://bucket/prefix``, see
:class:`kalm.core.storage.DataRoot`), except training runs, whose checkpoints need a local disk::

    shards/<stage>/<recipe>/            one recipe's cleaned shards          (data stage: ingest)
    holdout/<recipe>/                   its held-out evaluation rows          (data stage: ingest)
    mixtures/<stage>/<recipe>/          after cross-recipe dedup + decontam   (data stage: mixtures)
    mined/<stage>/<recipe>/             rows with mined hard negatives        (mining)
    mined/_work/<stage>/<recipe>/<job>/ resumable chunks of an unfinished mining job
    scored/<stage>/<recipe>/            mined rows with a teacher's scores    (score)
    scored/_work/<stage>/<recipe>/<job>/ resumable chunks of an unfinished scoring job
    cache/embeddings/<model key>/       the embedding cache                   (mining, score)
    runs/<stage>/<run>/                 a training run: final/, metrics, loss.png, checkpoints/
    runs/soup/<pipeline>/               the model soup
    eval/<fingerprint>/                 one model's evaluation results        (evaluation)
    eval/compare/<key>/                 one comparison table
    eval_data/                          generated local evaluation tasks
    pipeline/<name>/runs/<time>.json    run manifests (and latest.json)
    prefect/                            the local Prefect server's database (local roots only)

With an ``s3://`` root, training runs (checkpoints included) live under ``$KALM_LOCAL_DIR`` (default
``~/.cache/kalm/<hash of the root>``) and their ``final/`` model is uploaded to ``runs/<stage>/<run>/final``.

>>> mixture_dir("finetune", "squad")
'mixtures/finetune/squad'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from kalm.core.hashing import hash_obj

if TYPE_CHECKING:
    from kalm.core.storage import DataRoot

MANIFEST = "_manifest.json"
STAGING = ".staging"


# -- data stage ------------------------------------------------------------------------------------------
def shard_dir(stage: str, recipe: str) -> str:
    return f"shards/{stage}/{recipe}"


def holdout_root() -> str:
    return "holdout"


def holdout_dir(recipe: str) -> str:
    return f"{holdout_root()}/{recipe}"


def mixture_root(stage: str) -> str:
    return f"mixtures/{stage}"


def mixture_dir(stage: str, recipe: str) -> str:
    return f"{mixture_root(stage)}/{recipe}"


# -- mining ----------------------------------------------------------------------------------------------
def mined_root(stage: str) -> str:
    return f"mined/{stage}"


def mined_dir(stage: str, recipe: str) -> str:
    return f"{mined_root(stage)}/{recipe}"


def mined_work_dir(stage: str, recipe: str) -> str:
    """Where a recipe's unfinished mining jobs keep their chunks (``_`` prefix: never listed as a recipe)."""
    return f"mined/_work/{stage}/{recipe}"


def scored_root(stage: str) -> str:
    return f"scored/{stage}"


def scored_dir(stage: str, recipe: str) -> str:
    return f"{scored_root(stage)}/{recipe}"


def scored_work_dir(stage: str, recipe: str) -> str:
    return f"scored/_work/{stage}/{recipe}"


def embedding_cache_dir(key: str) -> str:
    return f"cache/embeddings/{key}"


def training_data_root(source: str, stage: str) -> str:
    """The folder whose recipe subfolders a training run reads: stage mixtures, mined or scored shards."""
    roots = {"mixtures": mixture_root, "mined": mined_root, "scored": scored_root}
    return roots[source](stage)


# -- training --------------------------------------------------------------------------------------------
def run_rel(stage: str, name: str) -> str:
    """A run's folder relative to the data root (where an S3 root receives the final model)."""
    return f"runs/{stage}/{name}"


def local_runs_base(root: DataRoot) -> Path:
    """The local folder that holds ``runs/``: the data root itself, or a local mirror for S3 roots."""
    if root.is_local:
        return Path(root.base)
    env = os.environ.get("KALM_LOCAL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kalm" / hash_obj(root.uri, 8)


def run_dir(root: DataRoot, stage: str, name: str) -> Path:
    """Where a training run (or soup) writes, on local disk: checkpoints need one."""
    return local_runs_base(root) / run_rel(stage, name)


def final_dir(root: DataRoot, stage: str, name: str) -> Path:
    return run_dir(root, stage, name) / "final"


def soup_dir(root: DataRoot, pipeline: str) -> Path:
    return run_dir(root, "soup", pipeline)


# -- evaluation ------------------------------------------------------------------------------------------
def eval_dir(fingerprint: str, output: str = "eval") -> str:
    return f"{output.strip('/')}/{fingerprint}"


def compare_dir(key: str, output: str = "eval") -> str:
    return f"{output.strip('/')}/compare/{key}"


def eval_data_dir(name: str = "") -> str:
    return f"eval_data/{name}".rstrip("/")


# -- pipeline --------------------------------------------------------------------------------------------
def pipeline_run_manifest(pipeline: str, stamp: str) -> str:
    return f"pipeline/{pipeline}/runs/{stamp}.json"


def pipeline_latest(pipeline: str) -> str:
    return f"pipeline/{pipeline}/latest.json"


def prefect_home(root_uri: str) -> Path:
    """The local Prefect server's state (SQLite) for a data root: under a local root, else under ~/.kalm."""
    if root_uri.startswith("s3://"):
        return Path.home() / ".kalm" / "prefect" / hash_obj(root_uri, 8)
    return Path(root_uri) / "prefect"
