"""Focal-style reweighting of InfoNCE: hard queries (low probability on their positive) weigh more.

METHOD.md [reported]: ``p_i = e^{s(q_i,p_i)/τ} / Z_i = exp(-L_i)``, ``w_i = (1 - p_i)^γ``, γ = 0.5. Our
reduction is the mean ``(1/N) Σ_i w_i L_i`` (the paper writes ``Σ_i w_i L_i``; the mean keeps the scale of
plain InfoNCE, so γ = 0 gives exactly :class:`InfoNCE`). Whether ``w`` is detached and whether it is
renormalised to mean 1 are [open]; both are options, off by default (our choice). Renormalisation uses this
rank's queries only.

>>> focal_weights(torch.tensor([0.693147]), gamma=0.5)   # L = log 2: p = 0.5 -> w = 0.5 ** 0.5
tensor([0.7071])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kalm.training.losses.base import EmbeddingLoss
from kalm.training.losses.candidates import Candidates
from kalm.training.losses.infonce import InfoNCE

DEFAULT_GAMMA = 0.5  # METHOD.md [reported]


def focal_weights(
    per_query_loss: Tensor, gamma: float, detach: bool = False, normalize: bool = False
) -> Tensor:
    """``w_i = (1 - exp(-L_i))^γ`` from per-query InfoNCE losses. (N,) -> (N,).

    ``1 - exp(-L)`` is computed as ``-expm1(-L)`` (exact for small L) and floored at 1e-12 so a query
    with ``p_i == 1`` gets weight ~0 instead of a NaN gradient when γ < 1. γ = 0 gives ones exactly.
    """
    if gamma < 0:
        raise ValueError(f"focal gamma must be >= 0, got {gamma}")
    miss = (-torch.expm1(-per_query_loss)).clamp(min=1e-12)
    weights = miss.pow(gamma)
    if normalize:
        weights = weights / weights.mean().clamp(min=1e-12)
    return weights.detach() if detach else weights


class FocalInfoNCE(EmbeddingLoss):
    """Wraps an :class:`InfoNCE` core: ``forward(q (N, D), p (N, D), n (N, M, D) | None) -> mean_i w_i L_i``.

    Columns consumed: those of the core (``query``, ``pos``, ``neg``).
    """

    def __init__(
        self,
        inner: InfoNCE | None = None,
        gamma: float = DEFAULT_GAMMA,
        detach: bool = False,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.inner = inner if inner is not None else InfoNCE()
        self.gamma = float(gamma)
        self.detach = detach
        self.normalize = normalize

    @property
    def columns(self) -> tuple[str, ...]:
        return self.inner.columns

    def forward(
        self, q: Tensor, p: Tensor, n: Tensor | None = None, candidates: Candidates | None = None
    ) -> Tensor:
        losses = self.inner.per_query(q, p, n, candidates)
        weights = focal_weights(losses, self.gamma, detach=self.detach, normalize=self.normalize)
        return (weights * losses).mean()

    def config(self) -> dict[str, Any]:
        return {
            "name": "focal_infonce",
            "gamma": self.gamma,
            "detach": self.detach,
            "normalize": self.normalize,
            "inner": self.inner.config(),
        }
