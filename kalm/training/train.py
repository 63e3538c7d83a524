"""The training job: one stage (pre-training or fine-tuning) under DeepSpeed ZeRO-1/2, torchrun or a single
process. Reads top to bottom: setup, step, train, save, main.

    deepspeed --num_gpus 8 --module kalm.training.train --config configs/finetune_qwen2.yaml --data-root s3://b/k
    torchrun --nproc_per_node 2 -m kalm.training.train --config configs/finetune_demo.yaml
    python -m kalm.training.train --config configs/pretrain_demo.yaml     # one process, no launcher

Every rank reads one config file (``kalm train`` writes the resolved one to ``<run>/config.yaml``).
Rerunning the same command resumes from the newest checkpoint in the output folder: same batch order,
same loss randomness, same final weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from kalm.core.errors import KalmError
from kalm.core.fingerprint import model_fingerprint
from kalm.core.layout import MANIFEST, run_dir, run_rel, training_data_root
from kalm.core.storage import DataRoot, read_manifest
from kalm.training.checkpoints import (
    CHECKPOINT_DONE,
    RNG_FILE,
    checkpoint_dir,
    checkpoint_files,
    complete_checkpoints,
    owned_by,
    prune,
    prune_remote,
    pull,
    rank_of,
    restore_rng,
    rng_state,
    upload,
    verify_checkpoint,
    write_marker,
)
from kalm.training.config import TrainConfig, load_train_config, model_width, resolve_model_path
from kalm.training.losses.base import shared_draws
from kalm.training.losses.candidates import Candidates
from kalm.training.losses.gradcache import GradCache
from kalm.training.losses.mixing import HardNegativeMixer
from kalm.training.sampler import PAD_TEXT, Batch, HomogeneousSampler, ShardSource, mixture

log = logging.getLogger("kalm.training.train")


# ---------------------------------------------------------------------------------------------- setup
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank). Without a launcher, become a world of one (DeepSpeed needs the env)."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank, world, local_rank


def pick_attention(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    except ImportError:
        return "sdpa"


def use_bf16(precision: str) -> bool:
    if precision == "bf16":
        return True
    return precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def data_sources(cfg: TrainConfig, root: DataRoot) -> list[ShardSource]:
    """Shard folders of the stage (mixtures or mined), weighted and with the small-source rule applied."""
    return mixture_of(cfg, root)[0]


def mixture_of(cfg: TrainConfig, root: DataRoot) -> tuple[list[ShardSource], dict[str, Any]]:
    """The stage's sources and the report of :func:`kalm.training.sampler.mixture` (merged, dropped)."""
    stage = cfg.data.stage or cfg.stage
    folders: list[str] = list(cfg.data.paths)
    if not folders:
        base = training_data_root(cfg.data.source, stage)
        names = cfg.data.recipes or root.list_dirs(base)
        folders = [f"{base}/{n}" for n in names]
    sources = []
    explicit = set()
    for rel in folders:
        m = read_manifest(root, rel)
        if m is None:
            raise KalmError(
                f"training data {root.full_uri(rel)} is missing or incomplete; run the data stage"
            )
        rows = int(m["rows_out"])
        if rows == 0:
            continue
        broken = root.files_intact(rel, m["files"])
        if broken:
            raise KalmError(
                f"training data {root.full_uri(rel)} changed after it was written ({broken}); "
                "rerun the data stage"
            )
        name = m.get("recipe") or rel.rsplit("/", 1)[-1]
        category = m.get("category", "")
        weight = cfg.data.weights.get(name, cfg.data.weights.get(category))
        if weight is not None:
            explicit.add(name)
        listed = [f for f in m["files"] if f["rows"]]
        files = [root.path(rel, f["name"]) for f in listed]
        sha = [str(f.get("sha256", "")) for f in listed]
        task = m.get("task_type", "")
        scope = cfg.data.scope(name, category, task)
        fs = None if root.is_local else root.fs
        w = float(rows if weight is None else weight)
        sources.append(ShardSource(name, files, rows, w, fs, scope, sha256=sha, task_type=task))
    d = cfg.data
    sources, report = mixture(sources, d.alpha, d.min_rows, d.drop_rows, frozenset(explicit))
    if not sources:
        raise KalmError(f"no training rows for stage {stage!r} in {root.uri} (empty, missing or dropped)")
    return sources, report


def preflight(cfg: TrainConfig, root: DataRoot) -> dict[str, Any]:
    """Every check that can fail before a process is launched: model, widths, data, negatives."""
    from kalm.training.losses import build_loss, resolve_loss_config

    model_dir = os.path.abspath(resolve_model_path(cfg.model.path, root))  # workers run elsewhere
    if os.path.isdir(model_dir):
        _check_weights(model_dir)
    width = model_width(model_dir) if os.path.isdir(model_dir) else None
    try:
        build_loss(cfg.loss_config(), embedding_dim=width)
        resolved = resolve_loss_config(cfg.loss_config())
        mix_k, alpha = resolved["mix_k"], resolved["distill_alpha"]
    except ValueError as err:
        raise KalmError(f"loss: {err}") from None
    if alpha > 0 and cfg.data.source != "scored" and not cfg.data.paths:
        raise KalmError(
            f"loss.distill_alpha {alpha} distills a teacher's scores: train on data.source 'scored' (run "
            f"`kalm score` first; it is {cfg.data.source!r}) or set loss.distill_alpha: 0"
        )
    if mix_k and cfg.data.group_size < 3:
        raise KalmError(
            f"loss.mix_k {mix_k} mixes pairs of a row's hard negatives, which needs at least 2: set "
            f"data.group_size >= 3 (it is {cfg.data.group_size}) or loss.mix_k: 0"
        )
    ds_config = deepspeed_config_path(cfg) if cfg.deepspeed.enabled else None
    if ds_config is not None:
        try:
            json.loads(ds_config.read_text())
        except (OSError, ValueError) as err:
            raise KalmError(
                f"DeepSpeed config {ds_config} is not valid JSON: {str(err).splitlines()[0]}"
            ) from None
    sources = data_sources(cfg, root)
    if cfg.data.group_size > 1:
        import pyarrow.parquet as pq

        for s in sources:
            negs = pq.read_table(s.files[0], columns=["neg"], filesystem=s.filesystem).column("neg")
            if not any(len(n) for n in negs.to_pylist()):
                raise KalmError(
                    f"group_size {cfg.data.group_size} needs hard negatives but source {s.name!r} has none "
                    "(mine negatives first, or set data.group_size: 1)"
                )
    return {
        "model_dir": model_dir,
        "width": width,
        "sources": [s.name for s in sources],
        "deepspeed_config": str(ds_config) if ds_config else None,
    }


def _check_weights(model_dir: str) -> None:
    """Models load from safetensors only (a pickle can run code): say so now, not in every worker."""
    folder = Path(model_dir)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise KalmError(
            f"model {model_dir} has only pickle weights ({pickles[0]}); kalm loads safetensors only: save it "
            "with save_pretrained(..., safe_serialization=True) first"
        )
    raise KalmError(f"model {model_dir} has no weights (no *.safetensors file)")


def deepspeed_config_path(cfg: TrainConfig) -> Path:
    """``deepspeed.config``: absolute, relative to the caller's directory, or relative to configs/."""
    from kalm.core.config import CONFIG_DIR

    path = Path(cfg.deepspeed.config).expanduser()
    for cand in (path, CONFIG_DIR / path) if not path.is_absolute() else (path,):
        if cand.exists():
            return cand.resolve()
    raise KalmError(
        f"DeepSpeed config not found: {cfg.deepspeed.config} (looked in {Path.cwd()} and {CONFIG_DIR})"
    )


def total_steps(cfg: TrainConfig, sources: list[ShardSource], world: int) -> int:
    if cfg.schedule.max_steps:
        return cfg.schedule.max_steps
    rows = sum(s.rows for s in sources)
    return max(1, math.ceil(rows * (cfg.schedule.epochs or 1.0) / (cfg.per_device_batch * world)))


def lr_lambda(cfg: TrainConfig, steps: int) -> Any:
    warm = int(steps * cfg.optim.warmup_ratio)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.optim.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, steps - warm)
        if cfg.optim.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f


def deepspeed_config(cfg: TrainConfig, bf16: bool, grad_accum: int = 1) -> dict[str, Any]:
    """The DeepSpeed config: the JSON file plus what the training config decides. ``grad_accum`` > 1 only for
    GradCache, whose chunk backward passes are DeepSpeed micro-steps of one optimizer step."""
    ds = json.loads(deepspeed_config_path(cfg).read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.per_device_batch
    ds["gradient_accumulation_steps"] = grad_accum
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["bf16"] = {"enabled": bf16}
    ds.setdefault("zero_optimization", {})
    if cfg.deepspeed.zero_stage is not None:
        ds["zero_optimization"]["stage"] = cfg.deepspeed.zero_stage
    ds["steps_per_print"] = 10**9  # we log ourselves
    ds.pop("train_batch_size", None)
    return ds


@dataclass
class Trainer:
    """What one rank holds during a run."""

    cfg: TrainConfig
    engine: Any  # a DeepSpeed engine (or a thin torch stand-in)
    model: Any  # kalm.training.model.Embedder
    loss_fn: torch.nn.Module
    sampler: HomogeneousSampler
    steps: int
    out: Path
    rank: int
    world: int
    mixture: dict[str, Any] = field(default_factory=dict)  # kalm.training.sampler.mixture's report
    root: DataRoot | None = None
    local_rank: int = 0
    job: str | None = None  # the launcher's job fingerprint (<run>/_job.json): checkpoints are tagged with it


def setup(cfg: TrainConfig, root: DataRoot, out: Path) -> Trainer:
    import deepspeed

    from kalm.training.losses import build_loss
    from kalm.training.model import Embedder

    rank, world, local_rank = init_distributed()
    torch.manual_seed(cfg.seed)
    bf16 = use_bf16(cfg.precision)
    model_dir = resolve_model_path(cfg.model.path, root)
    model = Embedder.from_pretrained(
        model_dir,
        attn_implementation=pick_attention(cfg.model.attn_implementation),
        pooling=cfg.model.pooling,
        max_length=cfg.model.max_length,
        query_template=cfg.model.query_template,
        instructions=cfg.model.instructions,  # off: bare texts in training, saved without a template
    )
    if rank == 0:
        log.info(
            "instructions: %s (model.instructions=%s)",
            "on" if model.query_template else "off (bare texts)",
            cfg.model.instructions,
        )
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if torch.cuda.is_available():
        model.to(f"cuda:{local_rank}")
    loss_fn = build_loss(cfg.loss_config(), embedding_dim=model.embedding_dim)
    sources, mix = mixture_of(cfg, root)
    d = cfg.data
    sampler = HomogeneousSampler(
        sources,
        cfg.per_device_batch,
        world,
        rank,
        d.group_size,
        cfg.seed,
        d.homogeneous,
        window=d.shuffle_window,
        buffer_mb=d.buffer_mb,
    )
    steps = total_steps(cfg, sources, world)
    grad_accum = 1
    if isinstance(loss_fn, GradCache):
        grad_accum = loss_fn.backward_passes(cfg.per_device_batch, cfg.data.group_size - 1)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    # Plain AdamW: DeepSpeed's fused CPU Adam JIT-compiles for minutes (ENV.md); on GPU torch's is fused.
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        fused=torch.cuda.is_available(),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    if not torch.cuda.is_available():
        # The CPU shared-memory comm op JIT-builds for ~35 s per process and is not needed with gloo.
        import deepspeed.comm.torch as ds_torch

        ds_torch.build_shm_op = lambda: None
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, bf16, grad_accum),
        dist_init_required=False,
    )
    _weights_only_loads(engine)
    # every rank starts from the same weights (DeepSpeed broadcasts rank 0's); dropout must differ per rank
    torch.manual_seed(cfg.seed + 1_000_003 * rank)
    job_file = out / "_job.json"
    job = json.loads(job_file.read_text()).get("job_fingerprint") if job_file.exists() else None
    return Trainer(cfg, engine, model, loss_fn, sampler, steps, out, rank, world, mix, root, local_rank, job)


def _checkpoint_globals() -> list[Any]:
    """The only non-tensor types a DeepSpeed ZeRO-1/2 checkpoint of ours holds (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``): everything else is refused on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_loads(engine: Any) -> None:
    """Make DeepSpeed's checkpoint reads ``torch.load(weights_only=True)`` with an allow-list (its own
    engine passes ``weights_only=False``, which runs any pickled object a planted file holds)."""
    allowed = _checkpoint_globals()

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                why = str(err).split("\n")[0][:200]
                raise KalmError(f"refusing to load {path}: not a plain checkpoint ({why})") from None

    engine.checkpoint_engine.load = load


# ----------------------------------------------------------------------------------------------- step
def format_batch(t: Trainer, batch: Batch) -> tuple[list[str], list[list[str]]]:
    """Queries with their instruction; documents bare (or with it for symmetric tasks), one list per row:
    [positive, negative_1, ..., negative_M] (padding slots stay empty: the loss masks them)."""
    from kalm.training.instructions import format_document, format_query

    tmpl = t.model.query_template
    q_texts = [format_query(q, i, tmpl) for q, i in zip(batch.queries, batch.instructions, strict=True)]
    docs = [
        [d if d == PAD_TEXT else format_document(d, i, s, tmpl) for d in row]
        for row, i, s in zip(batch.docs, batch.instructions, batch.symmetric, strict=True)
    ]
    return q_texts, docs


def encode_batch(t: Trainer, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Returns q (N, D), p (N, D), n (N, M, D) or None, and the number of real tokens."""
    q_texts, docs = format_batch(t, batch)
    d_texts = [d for row in docs for d in row]
    q_tok = t.model.tokenize(q_texts)
    d_tok = t.model.tokenize(d_texts)
    q = t.engine(**q_tok).float()
    d = t.engine(**d_tok).float().view(batch.size, -1, q.shape[-1])
    n = d[:, 1:] if d.shape[1] > 1 else None
    tokens = int(q_tok["attention_mask"].sum() + d_tok["attention_mask"].sum())
    return q, d[:, 0], n, tokens


def focal_weight_mean(
    loss_fn: torch.nn.Module,
    q: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor | None,
    candidates: Candidates | None = None,
) -> float:
    """The mean focal weight of the batch (1.0 when focal reweighting is off), for the run log. Call it
    inside the step's ``shared_draws`` block: it then sees the synthetic negatives the loss saw."""
    from kalm.training.losses import FocalInfoNCE, focal_weights

    focal = next((m for m in loss_fn.modules() if isinstance(m, FocalInfoNCE)), None)
    if focal is None:
        return 1.0
    with torch.no_grad():
        detached = None if n is None else n.detach()
        losses = focal.inner.per_query(q.detach(), p.detach(), detached, candidates)
        return float(focal_weights(losses, focal.gamma, detach=True, normalize=focal.normalize).mean())


def distill_metrics(loss_fn: torch.nn.Module) -> dict[str, Any]:
    """The last step's distillation KL at the full width (None: no distillation, or no teacher scores) and
    how many of the rank's rows had no usable teacher scores (counted skips: they add no KL)."""
    from kalm.training.losses import DistillLoss

    d = next((m for m in loss_fn.modules() if isinstance(m, DistillLoss)), None)
    if d is None:
        return {"distill_kl": None, "distill_unscored_rows": 0}
    return {
        "distill_kl": d.last_kl[max(d.last_kl)] if d.last_kl else None,
        "distill_unscored_rows": d.unscored,
    }


Embeddings = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def gradcache_step(t: Trainer, batch: Batch) -> tuple[Embeddings, torch.Tensor, int, int]:
    """One optimizer step with GradCache: embeddings in chunks without grad, the loss on them, then one
    DeepSpeed micro-step (``engine.backward`` + ``engine.step``) per re-embedded chunk; the optimizer
    steps at the last one (``gradient_accumulation_steps`` = the number of chunks, loss not rescaled).
    Same loss and gradients as the full batch, activation memory of one chunk."""
    q_texts, fmt = format_batch(t, batch)
    q_tok = t.model.tokenize(q_texts)
    p_tok = t.model.tokenize([docs[0] for docs in fmt])
    negs = [d for docs in fmt for d in docs[1:]]
    if len(negs) != batch.size * (t.cfg.data.group_size - 1):  # micro-steps per step are fixed at setup
        raise KalmError(
            f"step {batch.step + 1}: rows without negatives for group size {t.cfg.data.group_size}"
        )
    n_tok = t.model.tokenize(negs) if negs else None
    tokens = sum(int(x["attention_mask"].sum()) for x in (q_tok, p_tok, n_tok) if x is not None)

    passes = [0]

    def micro_step(surrogate: torch.Tensor) -> None:
        t.engine.backward(surrogate, scale_wrt_gas=False)
        t.engine.step()
        passes[0] += 1

    cache = t.loss_fn
    assert isinstance(cache, GradCache)
    loss = cache.step(
        lambda **f: t.engine(**f).float(),
        query=q_tok,
        pos=p_tok,
        neg=n_tok,
        backward=micro_step,
        candidates=_candidates(t, batch),
    )
    assert cache.last is not None
    expected = t.engine.gradient_accumulation_steps()
    if passes[0] != expected:  # the optimizer would step mid-batch or not at all
        raise KalmError(f"GradCache ran {passes[0]} chunk passes where DeepSpeed expects {expected}")
    return cache.last, loss, tokens, passes[0]


def _candidates(t: Trainer, batch: Batch) -> Candidates | None:
    """Who each candidate of the global batch is (the loss masks copies, same-class texts and padding)."""
    if batch.candidates is None:
        return None
    cands = cast(Candidates, batch.candidates)
    if not t.cfg.loss_config().get("mask_false_negatives", True):
        cands = cands.padding_only()
    return cands.to(t.model.device)


def train_step(t: Trainer) -> dict[str, Any]:
    batch = t.sampler.next_batch()
    start = time.perf_counter()
    cands = _candidates(t, batch)
    with shared_draws(t.loss_fn):  # one mixer draw per step: every Matryoshka dim and the metrics share it
        if isinstance(t.loss_fn, GradCache):
            (q, p, n), loss, tokens, passes = gradcache_step(t, batch)
        else:
            q, p, n, tokens = encode_batch(t, batch)
            passes = 1
            loss = t.loss_fn(q, p, n, cands)
            t.engine.backward(loss)
            t.engine.step()
        dt = time.perf_counter() - start
        focal = focal_weight_mean(t.loss_fn, q, p, n, cands)
    grad_norm = t.engine.get_global_grad_norm()
    valid = cands.local_valid(batch.offset, batch.size) if cands is not None else None
    return {
        "step": batch.step + 1,
        "loss": float(loss.detach()),
        "focal_weight": focal,
        "padded_negatives": int((~valid).sum()) if valid is not None else 0,
        "mix_skipped": sum(m.skipped for m in t.loss_fn.modules() if isinstance(m, HardNegativeMixer)),
        **distill_metrics(t.loss_fn),
        "lr": float(t.engine.get_lr()[0]),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "samples_per_s": batch.size * t.world / dt,
        "tokens_per_s": tokens * t.world / dt,
        "source": batch.sources[0] if batch.sources else "",
        "backward_passes": passes,
    }


# ---------------------------------------------------------------------------------------------- train
def remote_checkpoints(t: Trainer) -> tuple[DataRoot, str] | None:
    """The S3 data root and the folder on it checkpoints are copied to (None for a local root: they are
    already there)."""
    if t.root is None or t.root.is_local:
        return None
    return t.root, f"{run_rel(t.cfg.stage, t.cfg.run_name)}/checkpoints"


def save_checkpoint(t: Trainer) -> None:
    """DeepSpeed checkpoint + everything that makes the rest of the run reproducible (see
    :mod:`kalm.training.checkpoints`): each rank's RNG, every rank's checksums, the S3 copy."""
    tag = f"step{t.sampler.step:08d}"
    d = checkpoint_dir(t.out) / tag
    client = {"sampler": t.sampler.state_dict(), "loss": t.loss_fn.state_dict()}
    t.engine.save_checkpoint(str(checkpoint_dir(t.out)), tag=tag, client_state=client)
    torch.save(rng_state(), d / RNG_FILE.format(rank=t.rank))
    mine = checkpoint_files(d, lambda name: owned_by(name, t.rank))
    remote = remote_checkpoints(t)
    if remote:
        upload(*remote, d, sorted(mine))  # as it is written: a node's disk may not survive it
    gathered: list[Any] = [None] * t.world
    torch.distributed.all_gather_object(gathered, mine)  # every rank's record, whatever disk it is on
    files = {k: v for part in gathered for k, v in part.items()}
    if t.local_rank == 0:  # one per node (on storage every node shares, the same marker several times)
        write_marker(d, t.sampler.step, t.job, files)
        prune(t.out, t.cfg.schedule.keep_checkpoints)
    torch.distributed.barrier()
    if t.rank == 0 and remote:
        root, rel = remote
        if (t.out / "metrics.jsonl").exists():  # before the marker: a complete copy has its steps' metrics
            root.write_bytes(f"{rel}/metrics.jsonl", (t.out / "metrics.jsonl").read_bytes())
        upload(root, rel, d, [CHECKPOINT_DONE])  # last: the remote copy is now complete
        prune_remote(root, rel, t.cfg.schedule.keep_checkpoints, t.job)
    torch.distributed.barrier()


def maybe_resume(t: Trainer) -> bool:
    ckpt = checkpoint_dir(t.out)
    remote = remote_checkpoints(t)
    if remote and t.local_rank == 0 and pull(*remote, t.out, t.job):
        root, rel = remote
        if t.rank == 0 and not (t.out / "metrics.jsonl").exists() and root.exists(f"{rel}/metrics.jsonl"):
            (t.out / "metrics.jsonl").write_bytes(root.read_bytes(f"{rel}/metrics.jsonl"))
    torch.distributed.barrier()  # every node has the checkpoint it resumes from
    if not (ckpt / "latest").exists():
        return False
    done = complete_checkpoints(t.out)
    if not done:  # only cut-short checkpoints (or ones saved before completion markers): start over
        log.warning("no complete checkpoint under %s; starting from step 0", ckpt)
        return False
    tag = done[-1]
    latest = (ckpt / "latest").read_text().strip()
    if tag != latest:
        log.warning("checkpoint %s is incomplete (killed while saving?); resuming from %s", latest, tag)
    # this rank loads the shared files and its own: those must be there; any other file must match too
    verify_checkpoint(ckpt / tag, lambda name: rank_of(name) in (None, t.rank))
    path, client = t.engine.load_checkpoint(str(ckpt), tag=tag)
    if path is None:
        return False
    t.sampler.load_state_dict(client["sampler"])
    t.loss_fn.load_state_dict(client["loss"])
    rng = ckpt / tag / RNG_FILE.format(rank=t.rank)
    if rng.exists():
        restore_rng(rng)
    else:  # written with another world size (or before per-rank files): the run goes on, not bit-exactly
        log.warning(
            "%s has no RNG state for rank %d: dropout draws differ from an uninterrupted run", tag, t.rank
        )
    log.info("resumed from %s at step %d", path, t.sampler.step)
    return True


def train(t: Trainer) -> list[dict[str, Any]]:
    metrics_path = t.out / "metrics.jsonl"
    resumed = maybe_resume(t)
    if t.rank == 0 and metrics_path.exists():
        # keep the metrics of the steps the checkpoint covers; a killed run may have logged a few more
        keep = [ln for ln in metrics_path.read_text().splitlines() if ln.strip()] if resumed else []
        keep = [ln for ln in keep if json.loads(ln)["step"] <= t.sampler.step]
        metrics_path.write_text("".join(ln + "\n" for ln in keep))
    history: list[dict[str, Any]] = []
    tracker = None
    if t.rank == 0:
        from kalm.training.tracking import Tracker

        tracker = Tracker(
            t.out,
            t.cfg.run_name,
            tensorboard=t.cfg.tracking.tensorboard,
            mlflow=t.cfg.tracking.mlflow,
            start_step=t.sampler.step + 1 if resumed else 0,
            params={"stage": t.cfg.stage, "seed": t.cfg.seed, "batch": t.cfg.per_device_batch, **t.cfg.loss},
        )
    dev = _dev_set(t, resumed)
    t.engine.train()
    try:
        _train_loop(t, metrics_path, history, tracker, dev)
    finally:
        if tracker is not None:
            tracker.close()
    return history


def _dev_set(t: Trainer, resumed: bool) -> Any:
    """Rank 0's dev set (None when dev.every is 0 or there are no rows); a best saved after the
    checkpoint a run resumed from is forgotten (the resumed run recomputes it)."""
    from kalm.training.dev import BEST_DIR, BEST_FILE, load_dev_set, read_best

    if not t.cfg.dev.every or t.rank != 0 or t.root is None:
        return None
    best = read_best(t.out)
    if best is not None and (not resumed or best["step"] > t.sampler.step):
        shutil.rmtree(t.out / BEST_DIR, ignore_errors=True)
        (t.out / BEST_FILE).unlink(missing_ok=True)
    recipes = sorted({r for s in t.sampler.sources for r in (list(s.members) or [s.name])})
    return load_dev_set(t.root, recipes, t.cfg.dev.path, t.cfg.dev.max_rows)


def _dev_step(t: Trainer, dev: Any, m: dict[str, Any]) -> None:
    """Score the dev set at this step (rank 0; the others wait) and keep the best model."""
    from kalm.training.dev import BEST_DIR, BEST_FILE, dev_mrr, read_best

    if t.rank == 0 and dev is not None:
        score = dev_mrr(t.model, dev, t.cfg.dev.batch_size)
        m["dev_mrr10"] = score
        best = read_best(t.out)
        if best is None or score > best["score"]:
            folder = t.out / BEST_DIR
            save_model_folder(t, folder, training_goes_on=True)
            best = {"step": m["step"], "score": score, "metric": "mrr@10", "rows": len(dev)}
            (t.out / BEST_FILE).write_text(json.dumps({**best, "source": dev.source}, indent=2))
        log.info(
            "step %d dev MRR@10 %.4f (best %.4f, step %d)", m["step"], score, best["score"], best["step"]
        )
    if t.world > 1:
        torch.distributed.barrier()


def _train_loop(
    t: Trainer, metrics_path: Path, history: list[dict[str, Any]], tracker: Any, dev: Any
) -> None:
    every = t.cfg.dev.every
    while t.sampler.step < t.steps:
        m = train_step(t)
        history.append(m)
        if every and (m["step"] % every == 0 or m["step"] == t.steps):
            _dev_step(t, dev, m)
        if t.rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(m) + "\n")
            tracker.step(m)
            if m["step"] % t.cfg.schedule.log_every == 0:
                log.info(
                    "step %d/%d loss %.4f%s lr %.2e %.1f samples/s",
                    m["step"],
                    t.steps,
                    m["loss"],
                    f" (distill KL {m['distill_kl']:.4f})" if m["distill_kl"] is not None else "",
                    m["lr"],
                    m["samples_per_s"],
                )
        if t.sampler.step % t.cfg.schedule.checkpoint_every == 0 or t.sampler.step == t.steps:
            save_checkpoint(t)


# ----------------------------------------------------------------------------------------------- save
def save_model_folder(t: Trainer, folder: Path, *, training_goes_on: bool = False) -> None:
    """Rank 0's model as a sentence-transformers folder (fp32, the declared max length).

    ZeRO-1/2 shard optimizer states and gradients only: rank 0's module holds the full weights. While
    training goes on (the dev best) a low-precision module is copied to fp32 rather than converted in
    place: DeepSpeed's flat parameter buffers must keep their views.
    """
    import copy

    from kalm.training.model import declared_max_length

    model = t.model
    if next(model.parameters()).dtype != torch.float32 and training_goes_on:
        model = copy.deepcopy(model).float()
    else:
        model = model.float()
    train_length = model.max_length
    model_dir = resolve_model_path(t.cfg.model.path, t.root)
    model.max_length = t.cfg.model.save_max_length or declared_max_length(model_dir) or train_length
    try:
        model.save(folder)
    finally:
        model.max_length = train_length


def save_final(t: Trainer, root: DataRoot, info: dict[str, Any]) -> Path | None:
    """Consolidated fp32 sentence-transformers model + run manifest + loss curve (rank 0)."""
    torch.distributed.barrier()
    if t.rank != 0:
        torch.distributed.barrier()  # exit only once it is written: another node's launcher checks for it
        return None
    final = t.out / "final"
    tmp = t.out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    from kalm.core.modelcard import portable_paths, training_card, write_card
    from kalm.training.config import base_model_name
    from kalm.training.dev import BEST_DIR, read_best
    from kalm.training.model import saved_prompts

    best = read_best(t.out) if t.cfg.dev.every else None
    if best is not None and t.cfg.dev.final == "best":  # the best dev step's model becomes final/
        shutil.copytree(t.out / BEST_DIR, tmp)
    else:
        save_model_folder(t, tmp)
    metrics = [json.loads(x) for x in (t.out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    plot_loss(metrics, t.out / "loss.png")
    job = t.out / "_job.json"
    manifest = {
        **info,
        "job_fingerprint": json.loads(job.read_text())["job_fingerprint"] if job.exists() else None,
        "stage": t.cfg.stage,
        "run_name": t.cfg.run_name,
        "config": t.cfg.model_dump(mode="json"),
        "config_hash": t.cfg.config_hash(),
        "loss": getattr(t.loss_fn, "config", dict)(),
        "steps": t.sampler.step,
        "world_size": t.world,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "dev": {**best, "final": t.cfg.dev.final} if best is not None else None,
        "rows_without_negatives": t.sampler.rows_without_negatives,
        "mixture": {  # the sampler's sources: rows, draw probability, the recipes a merged one holds
            "sources": {
                s.name: {"rows": s.rows, "p": round(float(p), 6), "recipes": list(s.members) or [s.name]}
                for s, p in zip(t.sampler.sources, t.sampler.probs, strict=True)
            },
            "dropped": t.mixture.get("dropped", {}),
            "alpha": t.cfg.data.alpha,
        },
        "initial_model": model_fingerprint(info["model_dir"]),
        "base_model": base_model_name(info["model_dir"]),
        "model_fingerprint": model_fingerprint(tmp),  # kalm_run.json and README.md are not part of it
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # the model folder's copy: paths relative to the data root or the project (the run's manifest keeps
    # this machine's absolute paths for the stage's own bookkeeping)
    record = portable_paths(json.loads(json.dumps(manifest, default=str)), t.out.parents[2])
    (tmp / "kalm_run.json").write_text(json.dumps(record, indent=2))
    write_card(tmp, training_card(manifest, t.out.parents[2], saved_prompts(tmp)))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (t.out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    torch.distributed.barrier()
    return final


def plot_loss(metrics: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def output_dir(cfg: TrainConfig, root: DataRoot) -> Path:
    """``output_dir`` when set, else the data-root layout's run folder (a local mirror for S3 roots)."""
    return Path(cfg.output_dir) if cfg.output_dir else run_dir(root, cfg.stage, cfg.run_name)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kalm.training.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="stage config YAML (resolved: <run>/config.yaml)")
    ap.add_argument("--data-root", default=None, help="data root (default: $KALM_DATA_ROOT or ./data)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)
    from kalm.core.process import die_with_parent

    die_with_parent()  # a rank never outlives its launcher (torchrun puts ranks in sessions of their own)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s rank%(rank)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    old_factory = logging.getLogRecordFactory()

    def factory(*a: Any, **k: Any) -> logging.LogRecord:
        record = old_factory(*a, **k)
        record.rank = os.environ.get("RANK", "0")
        return record

    logging.setLogRecordFactory(factory)
    try:
        cfg = load_train_config(args.config)
        root = DataRoot.from_uri(args.data_root)
        info = preflight(cfg, root)
        out = output_dir(cfg, root)
        out.mkdir(parents=True, exist_ok=True)
        t = setup(cfg, root, out)
        train(t)
        final = save_final(t, root, info)
        if final is not None:
            log.info("final model: %s", final)
        torch.distributed.destroy_process_group()
    except KalmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
