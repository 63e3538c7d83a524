"""Contrastive distillation (KaLM-Embedding-V2.5): a teacher's scores over each query's own candidates
pulled into the student, added to the contrastive loss as a wrapper around it (not a copy of it).

For query ``i`` with own candidates ``C_i = [p_i, n_i1 .. n_iM]`` (positive first) [reported]::

    t_i = softmax(teacher_i / T_t),   s_i = softmax(cos(q_i, C_i) / T_s)
    KL_i = Σ_c t_ic (log t_ic - log s_ic)
    L = inner(q, p, n) + α · (1/N) Σ_i KL_i

- Only the query's *own* candidates take part (the teacher scored exactly those); in-batch negatives do not.
- Left out of both distributions: padding slots, candidates the InfoNCE mask drops (copies of the positive,
  same-class texts), candidates whose teacher score is missing (NaN). A row with fewer than two such
  candidates adds 0 (a one-point distribution carries no signal).
- Synthetic negatives from hard-negative mixing have no teacher score: they stay in InfoNCE's denominator
  and are not in the KL (our choice, [open]).
- The mean is over this rank's N queries, rows without a teacher included as 0, like the inner loss's mean,
  so per-rank averaging over ranks and GradCache chunking see one well-defined batch loss.
- Under :class:`~kalm.training.losses.matryoshka.MatryoshkaLoss` the term is computed at every dim with the
  dim's weight (the wrapper sits inside it); under GradCache the cached embeddings go through it unchanged.
- α = 0 returns the inner loss itself: bitwise the loss without distillation.

The teacher scores travel with the batch in :class:`~kalm.training.losses.candidates.Candidates`
(``teacher``, (G, 1 + M) for the global batch, NaN = no score).

>>> c = Candidates(pos_key=torch.tensor([1]), pos_label=torch.tensor([-1]), neg_key=torch.tensor([[2]]),
...                teacher=torch.tensor([[0.9, 0.1]]))
>>> kl = distill_kl(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.0, 1.0]]]),
...                 c, 0, teacher_temperature=1.0, student_temperature=1.0)
>>> round(float(kl[0]), 6)   # t = softmax([.9, .1]), s = softmax([1, 0])
0.004166
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kalm.training.losses.base import EmbeddingLoss
from kalm.training.losses.candidates import Candidates, candidate_masks
from kalm.training.losses.distributed import rank_offset

DEFAULT_TEACHER_TEMPERATURE = 0.05  # [open]: cosine teachers; cross-encoder logits usually want 1.0
DEFAULT_STUDENT_TEMPERATURE = 0.05  # [open]


def distill_kl(
    q: Tensor,
    p: Tensor,
    n: Tensor | None,
    candidates: Candidates,
    offset: int,
    *,
    teacher_temperature: float = DEFAULT_TEACHER_TEMPERATURE,
    student_temperature: float = DEFAULT_STUDENT_TEMPERATURE,
) -> Tensor:
    """Per-query ``KL(teacher || student)`` over the own candidates of this rank's rows -> (N,).

    q, p: (N, D) unit vectors; n: (N, M, D) or None; ``candidates.teacher``: (G, 1 + M) for the global
    batch, this rank's rows at ``offset``. Rows without two scored candidates get 0.
    """
    return _kl_terms(q, p, n, candidates, offset, teacher_temperature, student_temperature)[0]


def _kl_terms(
    q: Tensor,
    p: Tensor,
    n: Tensor | None,
    candidates: Candidates,
    offset: int,
    teacher_temperature: float,
    student_temperature: float,
) -> tuple[Tensor, Tensor]:
    """(per-query KL (N,), which rows had a usable teacher distribution (N,) bool)."""
    assert candidates.teacher is not None
    rows = q.size(0)
    student = (q * p).sum(-1, keepdim=True)
    if n is not None and n.size(1):
        student = torch.cat([student, torch.einsum("nd,nmd->nm", q, n)], dim=1)
    teacher = candidates.teacher[offset : offset + rows].to(student.device, torch.float32)
    if teacher.shape != student.shape:
        shapes = f"{tuple(teacher.shape)} vs {tuple(student.shape)}"
        raise ValueError(f"teacher scores do not match the candidates: {shapes}")
    keep = torch.isfinite(teacher)
    if candidates.neg_key is not None and n is not None and n.size(1):
        _, neg_mask = candidate_masks(candidates, offset, rows, "own")
        assert neg_mask is not None
        keep[:, 1:] &= ~neg_mask.to(keep.device)  # padding, copies of the positive, same-class texts
    usable = keep.sum(1) >= 2
    minus_inf = torch.finfo(torch.float32).min
    t_logits = (torch.where(keep, teacher, 0.0) / teacher_temperature).masked_fill(~keep, minus_inf)
    s_logits = (student.float() / student_temperature).masked_fill(~keep, minus_inf)
    log_t = F.log_softmax(t_logits, dim=1)
    log_s = F.log_softmax(s_logits, dim=1)
    terms = torch.where(keep, log_t.exp() * (log_t - log_s), 0.0)
    return torch.where(usable, terms.sum(1), 0.0), usable


class DistillLoss(EmbeddingLoss):
    """``inner(q, p, n) + α · mean_i KL_i`` (see the module docstring); ``last_kl`` holds the last step's
    term per embedding width (one entry per Matryoshka dim) and ``unscored`` how many of its rows had no
    usable teacher distribution (fewer than two scored candidates: counted, they add 0), for the run log.

    Args:
        inner: the contrastive loss (InfoNCE, focal InfoNCE).
        alpha: weight of the KL term; 0 = the inner loss exactly.
        teacher_temperature, student_temperature: T_t, T_s [open].
    """

    def __init__(
        self,
        inner: EmbeddingLoss,
        alpha: float,
        teacher_temperature: float = DEFAULT_TEACHER_TEMPERATURE,
        student_temperature: float = DEFAULT_STUDENT_TEMPERATURE,
    ) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"distill alpha must be >= 0, got {alpha}")
        for name, value in (("teacher", teacher_temperature), ("student", student_temperature)):
            if value <= 0:
                raise ValueError(f"distill {name} temperature must be > 0, got {value}")
        self.inner = inner
        self.alpha = float(alpha)
        self.teacher_temperature = float(teacher_temperature)
        self.student_temperature = float(student_temperature)
        self.last_kl: dict[int, float] = {}
        self.unscored = 0

    @property
    def columns(self) -> tuple[str, ...]:
        return self.inner.columns

    def forward(
        self, q: Tensor, p: Tensor, n: Tensor | None = None, candidates: Candidates | None = None
    ) -> Tensor:
        base = self.inner(q, p, n, candidates)
        if self.alpha == 0 or candidates is None or candidates.teacher is None:
            return base
        per_row, usable = _kl_terms(
            q,
            p,
            n,
            candidates,
            rank_offset(q.size(0), q.device),
            self.teacher_temperature,
            self.student_temperature,
        )
        kl = per_row.mean()
        self.last_kl[q.size(-1)] = float(kl.detach())
        self.unscored = int((~usable).sum())
        return base + self.alpha * kl

    def config(self) -> dict[str, Any]:
        return {
            "name": "distill",
            "alpha": self.alpha,
            "teacher_temperature": self.teacher_temperature,
            "student_temperature": self.student_temperature,
            "inner": self.inner.config(),
        }
