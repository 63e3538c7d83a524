"""KaLM-V2 losses: one InfoNCE core; focal weighting, hard-negative mixing and Matryoshka around it.

``LOSSES`` names the building blocks; :func:`build_loss` composes them from one flat, validated dict::

    loss = build_loss({"stage": "finetune"})                   # τ 0.01, focal γ 0.5, mixing k 2, Matryoshka
    loss = build_loss({"stage": "pretrain"})                   # in-batch negatives only, Matryoshka
    loss = build_loss({"focal_gamma": 0.0, "mix_k": 0, "matryoshka": False})   # plain InfoNCE
    value = loss(q, p, n)          # q (N, D), p (N, D), n (N, M, D) or None, unit vectors -> scalar
    run_log["loss"] = loss.config()

See docs/model_and_losses.md for every option, its default and where the default comes from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kalm.training.losses.base import EmbeddingLoss
from kalm.training.losses.distill import (
    DEFAULT_STUDENT_TEMPERATURE,
    DEFAULT_TEACHER_TEMPERATURE,
    DistillLoss,
    distill_kl,
)
from kalm.training.losses.distributed import gather_rows, world
from kalm.training.losses.focal import DEFAULT_GAMMA, FocalInfoNCE, focal_weights
from kalm.training.losses.gradcache import GradCache, RandContext
from kalm.training.losses.infonce import DEFAULT_TEMPERATURE, InfoNCE, infonce_logits, infonce_per_query
from kalm.training.losses.matryoshka import DEFAULT_DIMS, DEFAULT_WEIGHTS, MatryoshkaLoss, resolve_dims
from kalm.training.losses.mixing import HardNegativeMixer, sample_beta, sample_dirichlet

# Short name -> class. Each takes its options as keyword arguments; wrappers take the wrapped loss first.
LOSSES: dict[str, type[EmbeddingLoss]] = {
    "infonce": InfoNCE,
    "focal_infonce": FocalInfoNCE,
    "distill": DistillLoss,
    "matryoshka": MatryoshkaLoss,
    "gradcache": GradCache,
}

# Every key build_loss accepts, with the fine-tuning default. Provenance in docs/model_and_losses.md.
LOSS_DEFAULTS: dict[str, Any] = {
    "stage": "finetune",
    "temperature": DEFAULT_TEMPERATURE,
    "hard_negatives": "batch",
    "cross_device": True,
    "focal_gamma": DEFAULT_GAMMA,
    "focal_detach": False,
    "focal_normalize": False,
    "mix_k": 2,
    "mix_mode": "pair",
    "mix_alpha": 2.0,
    "mix_top_n": 4,
    "mix_detach": True,
    "mix_softmax_temperature": 0.05,
    "mix_seed": 0,
    "matryoshka": True,
    "matryoshka_dims": None,
    "matryoshka_weights": None,
    "gradcache_chunk_size": None,
    # Contrastive distillation (V2.5 [reported]): KL to a teacher's scores over each query's own candidates,
    # weight alpha (0 = off); needs scored training data (``kalm score``, ``data.source: scored``).
    "distill_alpha": 0.0,
    "distill_teacher_temperature": DEFAULT_TEACHER_TEMPERATURE,
    "distill_student_temperature": DEFAULT_STUDENT_TEMPERATURE,
    # Mask our own false negatives (copies of the positive, same-class candidates, the in-batch scope);
    # padding is masked either way. Consumed by the training step (it builds the candidates); off only to
    # measure what masking buys (kalm ablate).
    "mask_false_negatives": True,
}

# What a stage changes before the user's own keys apply.
STAGE_PRESETS: dict[str, dict[str, Any]] = {
    "finetune": {},
    "pretrain": {"hard_negatives": "none", "focal_gamma": 0.0, "mix_k": 0},
}


def resolve_loss_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, then the stage preset, then ``cfg``. Unknown keys/stages: ValueError naming the allowed."""
    unknown = sorted(set(cfg) - set(LOSS_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown loss option(s) {unknown} (allowed: {', '.join(LOSS_DEFAULTS)})")
    stage = cfg.get("stage", LOSS_DEFAULTS["stage"])
    if stage not in STAGE_PRESETS:
        raise ValueError(f"unknown loss stage {stage!r} (allowed: {', '.join(STAGE_PRESETS)})")
    resolved = {**LOSS_DEFAULTS, **STAGE_PRESETS[stage], **cfg}
    _check_types(resolved)
    return resolved


_BOOL_KEYS = (
    "cross_device",
    "focal_detach",
    "focal_normalize",
    "mix_detach",
    "matryoshka",
    "mask_false_negatives",
)
_INT_KEYS = ("mix_k", "mix_seed")
_FLOAT_KEYS = (
    "temperature",
    "focal_gamma",
    "mix_alpha",
    "mix_softmax_temperature",
    "distill_alpha",
    "distill_teacher_temperature",
    "distill_student_temperature",
)
_OPTIONAL_INT_KEYS = ("mix_top_n", "gradcache_chunk_size")


def _check_types(c: Mapping[str, Any]) -> None:
    def bad(key: str, want: str) -> ValueError:
        return ValueError(f"loss option {key!r} must be {want}, got {c[key]!r}")

    for key in _BOOL_KEYS:
        if not isinstance(c[key], bool):
            raise bad(key, "true or false")
    for key in _INT_KEYS:
        if isinstance(c[key], bool) or not isinstance(c[key], int):
            raise bad(key, "an integer")
    for key in _FLOAT_KEYS:
        if isinstance(c[key], bool) or not isinstance(c[key], int | float):
            raise bad(key, "a number")
    for key in _OPTIONAL_INT_KEYS:
        if c[key] is not None and (isinstance(c[key], bool) or not isinstance(c[key], int)):
            raise bad(key, "an integer or null")
    for key in ("matryoshka_dims", "matryoshka_weights"):
        if c[key] is not None and not isinstance(c[key], list | tuple):
            raise bad(key, "a list or null")


def build_loss(cfg: Mapping[str, Any], embedding_dim: int | None = None) -> EmbeddingLoss:
    """Compose the loss: InfoNCE core (+ mixer) -> focal (γ > 0) -> distillation (α > 0) -> Matryoshka ->
    GradCache (chunk size set).

    ``embedding_dim`` (the model width) lets explicit Matryoshka dims be checked now instead of at the
    first step. The result maps ``(q (N, D), p (N, D), n (N, M, D) | None) -> scalar`` and has ``config()``.
    """
    c = resolve_loss_config(cfg)
    mixer = None
    if c["mix_k"]:
        mixer = HardNegativeMixer(
            k=c["mix_k"],
            alpha=c["mix_alpha"],
            top_n=c["mix_top_n"],
            mode=c["mix_mode"],
            detach=c["mix_detach"],
            softmax_temperature=c["mix_softmax_temperature"],
            seed=c["mix_seed"],
        )
    core = InfoNCE(
        temperature=c["temperature"],
        hard_negatives=c["hard_negatives"],
        cross_device=c["cross_device"],
        mixer=mixer,
    )
    loss: EmbeddingLoss = core
    if c["focal_gamma"] < 0:
        raise ValueError(f"focal_gamma must be >= 0, got {c['focal_gamma']}")
    if c["focal_gamma"] > 0 or c["focal_detach"] or c["focal_normalize"]:
        loss = FocalInfoNCE(
            core, gamma=c["focal_gamma"], detach=c["focal_detach"], normalize=c["focal_normalize"]
        )
    if c["distill_alpha"] < 0:
        raise ValueError(f"distill_alpha must be >= 0, got {c['distill_alpha']}")
    if c["distill_alpha"] > 0:
        loss = DistillLoss(
            loss,
            alpha=c["distill_alpha"],
            teacher_temperature=c["distill_teacher_temperature"],
            student_temperature=c["distill_student_temperature"],
        )
    if c["matryoshka"]:
        loss = MatryoshkaLoss(loss, dims=c["matryoshka_dims"], weights=c["matryoshka_weights"])
        if embedding_dim is not None:
            resolve_dims(embedding_dim, c["matryoshka_dims"], c["matryoshka_weights"])
    elif c["matryoshka_dims"] is not None or c["matryoshka_weights"] is not None:
        raise ValueError("matryoshka_dims/matryoshka_weights given but matryoshka is False")
    if c["gradcache_chunk_size"] is not None:
        loss = GradCache(loss, chunk_size=c["gradcache_chunk_size"])
    return loss


__all__ = [
    "DEFAULT_DIMS",
    "DEFAULT_GAMMA",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_WEIGHTS",
    "DistillLoss",
    "EmbeddingLoss",
    "LOSSES",
    "LOSS_DEFAULTS",
    "STAGE_PRESETS",
    "FocalInfoNCE",
    "GradCache",
    "HardNegativeMixer",
    "InfoNCE",
    "MatryoshkaLoss",
    "RandContext",
    "build_loss",
    "distill_kl",
    "focal_weights",
    "gather_rows",
    "infonce_logits",
    "infonce_per_query",
    "resolve_dims",
    "resolve_loss_config",
    "sample_beta",
    "sample_dirichlet",
    "world",
]
