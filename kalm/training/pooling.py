"""Pooling of token states into one vector, L2 normalisation and Matryoshka truncation.

Every pooling is a small function ``(hidden (B, T, H), mask (B, T)) -> (B, H)`` in float32 (the loss divides
by τ = 0.01, so bf16 pooled vectors would lose the small score differences that matter). All of them accept
left- and right-padded batches. Names follow sentence-transformers' ``pooling_mode`` strings so a saved
model's ``1_Pooling/config.json`` maps one to one.

>>> h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]]); m = torch.tensor([[1, 1, 0]])
>>> mean_pool(h, m).tolist(), cls_pool(h, m).tolist(), last_token_pool(h, m).tolist()
([[2.0, 1.0]], [[1.0, 0.0]], [[3.0, 2.0]])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PoolFn = Callable[[Tensor, Tensor], Tensor]


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over non-pad tokens (METHOD.md [paper]). hidden (B, T, H), mask (B, T) of 0/1 -> (B, H)."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The first non-pad token (position 0 when right-padded). hidden (B, T, H), mask (B, T) -> (B, H)."""
    first = mask.to(torch.int32).argmax(dim=1)  # argmax returns the first maximal index
    return hidden[torch.arange(hidden.size(0), device=hidden.device), first].to(torch.float32)


def last_token_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The last non-pad token, whatever the padding side. hidden (B, T, H), mask (B, T) -> (B, H)."""
    seq_len = mask.size(1)
    last = seq_len - 1 - mask.to(torch.int32).flip(dims=[1]).argmax(dim=1)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last].to(torch.float32)


POOLINGS: dict[str, PoolFn] = {
    "mean": mean_pool,
    "cls": cls_pool,
    "lasttoken": last_token_pool,
}


def normalize(x: Tensor) -> Tensor:
    """L2-normalise the last dimension. (..., D) -> (..., D)."""
    return F.normalize(x, p=2.0, dim=-1)


def truncate(x: Tensor, dim: int) -> Tensor:
    """Matryoshka view: the first ``dim`` coordinates, renormalised. (..., D) -> (..., dim).

    Renormalising makes the result independent of whether ``x`` was normalised before truncation.
    """
    if not 0 < dim <= x.size(-1):
        raise ValueError(f"truncation dim must be in [1, {x.size(-1)}] (the embedding width), got {dim}")
    return normalize(x[..., :dim])
