"""Cross-device negatives: all-gather embeddings so every rank scores its queries against the global batch.

The gather is differentiable and its backward SUMS the incoming gradient over ranks before keeping the local
slice. Why: rank ``s``'s loss uses rank ``r``'s positives as negatives, so ``∂L_s/∂e_r`` is computed on rank
``s`` and must reach rank ``r``. With a per-rank loss ``L_r`` = mean over its local queries, rank ``r`` then
holds ``Σ_s ∂L_s/∂e_r``, and DDP/DeepSpeed's gradient *averaging* over ``W`` ranks yields exactly the gradient
of ``(1/W) Σ_s L_s``, which is the mean over all queries of the global batch when every rank holds the same
number of queries. So: the average of the per-rank losses equals the single-process loss on the concatenated
batch, and the averaged gradients equal its gradients (tests/test_distributed_loss.py checks both).

The plain recipe "all_gather, then put the local tensor back for autograd" drops the ``s != r`` terms; it is
only right when every rank computes the *global* loss (and then the loss must be multiplied by ``W``).

Ranks may hold different numbers of rows (a last, smaller batch): rows are padded for the collective and cut
afterwards. All other dimensions must agree across ranks, and all ranks must call the gather (no rank may
skip the negatives while another gathers them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _row_counts(x: Tensor, size: int) -> list[int]:
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([x.size(0)], dtype=torch.long, device=x.device))
    return [int(c.item()) for c in counts]


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 with known per-rank row counts; backward = all-reduce(sum), local slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], offset: int) -> Tensor:
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.size(0)] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.offset, ctx.rows = offset, x.size(0)
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)], dim=0)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None, None]:
        total = grads[0].contiguous().clone()  # all_reduce works in place; never write into autograd's buffer
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[ctx.offset : ctx.offset + ctx.rows], None, None


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' rows concatenated in rank order, and the offset of this rank's rows.

    x (n_r, ...) -> ((Σ_r n_r, ...), Σ_{s<r} n_s). Single process: ``(x, 0)``, untouched.

    >>> p_all, offset = gather_rows(p)        # p (N, D) -> (W·N, D); local rows at offset..offset+N
    """
    rank, size = world()
    if size == 1:
        return x, 0
    sizes = _row_counts(x, size)
    offset = sum(sizes[:rank])
    return _GatherRows.apply(x, sizes, offset), offset


def rank_offset(rows: int, device: torch.device | None = None) -> int:
    """Where this rank's ``rows`` start in the global batch (every rank must call it); 0 in one process."""
    rank, size = world()
    if size == 1:
        return 0
    return sum(_row_counts(torch.empty(rows, device=device), size)[:rank])
