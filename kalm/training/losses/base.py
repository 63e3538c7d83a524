"""The interface every loss here has, so callers can type against it (``build_loss`` returns one)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class EmbeddingLoss(nn.Module):
    """``forward(q (N, D), p (N, D), n (N, M, D) | None) -> scalar``, on unit vectors.

    ``columns`` names the dataset columns consumed (``query``, ``pos``, ``neg``); ``config()`` is a
    JSON-ready dict of every setting, for the run log.
    """

    @property
    def columns(self) -> tuple[str, ...]:
        raise NotImplementedError

    def forward(self, q: Tensor, p: Tensor, n: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError
