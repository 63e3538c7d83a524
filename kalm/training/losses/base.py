"""The interface every loss here has, so callers can type against it (``build_loss`` returns one)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from kalm.training.losses.candidates import Candidates


class EmbeddingLoss(nn.Module):
    """``forward(q (N, D), p (N, D), n (N, M, D) | None, candidates=None) -> scalar``, on unit vectors.

    ``candidates`` (:class:`~kalm.training.losses.candidates.Candidates`) says who each candidate is, so
    the core can mask what is not a negative. ``columns`` names the dataset columns consumed (``query``,
    ``pos``, ``neg``); ``config()`` is a JSON-ready dict of every setting, for the run log.
    """

    @property
    def columns(self) -> tuple[str, ...]:
        raise NotImplementedError

    def forward(
        self, q: Tensor, p: Tensor, n: Tensor | None = None, candidates: Candidates | None = None
    ) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError


@contextlib.contextmanager
def shared_draws(loss: nn.Module) -> Iterator[None]:
    """Every hard-negative mixer inside ``loss`` draws once within this block and reuses that draw: one
    draw per training step, shared by every Matryoshka dim and by metrics computed after the loss."""
    from kalm.training.losses.mixing import HardNegativeMixer

    with contextlib.ExitStack() as stack:
        for m in loss.modules():
            if isinstance(m, HardNegativeMixer):
                stack.enter_context(m.shared_draw())
        yield
