"""Matryoshka: the same loss on the first d dims of every embedding (renormalised), weighted and summed.

METHOD.md [paper: authors' code]: dims 896/512/256/128/64 with weights 1/0.3/0.2/0.1/0.1, for Qwen2-0.5B
(width 896). Two ways to choose dims:

- defaults (``dims=None``): clipped to the model's width D. The first default (896, weight 1) stands for
  the full embedding and becomes D; the other defaults are kept where they are below D, dropped otherwise
  (our choice: the full embedding is always trained). D=896 gives exactly the paper's list; MiniLM (D=384)
  gets 384/256/128/64 with 1/0.2/0.1/0.1; a 1536-wide model 1536/512/256/128/64 with 1/0.3/0.2/0.1/0.1.
- explicit (``dims=[...]``): used as given; a dim above D is a configuration error (ValueError naming D).

>>> loss = MatryoshkaLoss(InfoNCE())                   # defaults, clipped at the first call
>>> loss = MatryoshkaLoss(InfoNCE(), dims=[384, 128])  # explicit, weights 1 each unless given
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from kalm.training.losses.base import EmbeddingLoss, shared_draws
from kalm.training.losses.candidates import Candidates
from kalm.training.pooling import truncate

DEFAULT_DIMS: tuple[int, ...] = (896, 512, 256, 128, 64)  # [paper: code]
DEFAULT_WEIGHTS: tuple[float, ...] = (1.0, 0.3, 0.2, 0.1, 0.1)  # [paper: code]


def resolve_dims(
    width: int, dims: Sequence[int] | None = None, weights: Sequence[float] | None = None
) -> list[tuple[int, float]]:
    """(dim, weight) pairs for a model of width ``width``, largest dim first (see the module docstring)."""
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka weights given without dims: give dims too")
        # The first default stands for "the full embedding": it becomes the width, whatever the width is.
        rest = [(d, w) for d, w in zip(DEFAULT_DIMS[1:], DEFAULT_WEIGHTS[1:], strict=True) if d < width]
        return [(width, DEFAULT_WEIGHTS[0]), *rest]
    if not dims:
        raise ValueError("matryoshka dims must not be empty")
    if weights is None:
        weights = [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka dims {list(dims)} and weights {list(weights)} differ in length")
    too_big = [d for d in dims if d > width]
    if too_big:
        raise ValueError(f"matryoshka dims {too_big} exceed the model's embedding width {width}")
    if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
        raise ValueError(f"matryoshka dims must be distinct positive integers, got {list(dims)}")
    if any(w < 0 for w in weights):
        raise ValueError(f"matryoshka weights must be >= 0, got {list(weights)}")
    pairs = zip((int(d) for d in dims), (float(w) for w in weights), strict=True)
    return sorted(pairs, key=lambda dw: -dw[0])


def _cut(x: Tensor, dim: int) -> Tensor:
    # The full width is passed through untouched (inputs are unit vectors): renormalising it again would
    # move the last bits and break "one dim D with weight 1 == the inner loss" exactly.
    return x if dim == x.size(-1) else truncate(x, dim)


class MatryoshkaLoss(EmbeddingLoss):
    """``forward(q (N, D), p (N, D), n (N, M, D) | None) -> Σ_d w_d · inner(q[:, :d], p[:, :d], n[..., :d])``.

    Each truncation is renormalised (inputs are unit vectors; the full width D is passed through as is, so
    one dim D with weight 1 is exactly the inner loss). The inner loss is any (q, p, n) -> scalar module:
    :class:`InfoNCE` or :class:`FocalInfoNCE`. Columns consumed: those of the inner loss. Hard-negative
    mixing inside the inner loss draws once per call, at the largest dim, and every dim mixes the same
    negatives with the same λ (truncated and renormalised): the dims differ only in resolution.
    """

    def __init__(
        self, inner: EmbeddingLoss, dims: Sequence[int] | None = None, weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.inner = inner
        self.dims = list(dims) if dims is not None else None
        self.weights = list(weights) if weights is not None else None
        self.resolved: list[tuple[int, float]] | None = None  # the (dim, weight) pairs of the last call
        if self.dims is not None:  # catch length/sign mistakes now; the width is checked on first use
            resolve_dims(max(self.dims), self.dims, self.weights)
        elif self.weights is not None:
            raise ValueError("matryoshka weights given without dims: give dims too")

    @property
    def columns(self) -> tuple[str, ...]:
        return self.inner.columns

    def forward(
        self, q: Tensor, p: Tensor, n: Tensor | None = None, candidates: Candidates | None = None
    ) -> Tensor:
        total: Tensor | None = None
        self.resolved = resolve_dims(q.size(-1), self.dims, self.weights)
        with shared_draws(self.inner):  # one mixer draw (made at the full dim) for every dim
            for dim, weight in self.resolved:
                cut_n = _cut(n, dim) if n is not None else None
                term = weight * self.inner(_cut(q, dim), _cut(p, dim), cut_n, candidates)
                total = term if total is None else total + term
        assert total is not None  # resolve_dims never returns an empty list
        return total

    def config(self) -> dict[str, Any]:
        return {
            "name": "matryoshka",
            "dims": self.dims if self.dims is not None else "default",
            "weights": self.weights if self.weights is not None else "default",
            "resolved": [list(dw) for dw in self.resolved] if self.resolved is not None else None,
            "inner": self.inner.config(),
        }
