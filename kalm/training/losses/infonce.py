"""The one InfoNCE core. Focal weighting, hard-negative mixing and Matryoshka wrap or parameterise it.

For query ``i`` (METHOD.md [paper: code])::

    L_i = -log( e^{s(q_i, p_i)/τ} / Z_i ),   Z_i = Σ_{k ∈ candidates(i)} e^{s(q_i, k)/τ}

with ``s`` the dot product of unit vectors (cosine) and candidates = the positive, the other queries'
positives (in-batch negatives), the hard negatives (of the whole batch, or the query's own only), and the
query's extra negatives (synthetic ones from hard-negative mixing, which join only their own row). With
``cross_device`` and several ranks, positives and (batch-scope) hard negatives are gathered from all ranks
first; queries stay local, so each rank's loss is the mean over its own queries (see ``distributed.py``).

Candidates that are not negatives (copies of the query's own positive, same-class texts, padding, and what
the query's in-batch scope leaves out) are masked out of ``Z_i`` when the caller says who each candidate is
(:class:`~kalm.training.losses.candidates.Candidates`); synthetic negatives that could not be made from two
distinct hard negatives are masked too.

Columns consumed: ``query`` -> q, ``pos`` (first positive) -> p, ``neg`` -> n (M per query; absent when
``hard_negatives="none"``, the pre-training setting); ``label``, ``neg_labels`` for the mask.

>>> q = p = torch.eye(2); infonce_per_query(q, p, temperature=1.0)   # log(1 + e^{-1}) each
tensor([0.3133, 0.3133])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from kalm.training.losses.base import EmbeddingLoss
from kalm.training.losses.candidates import Candidates, candidate_masks
from kalm.training.losses.distributed import gather_rows

if TYPE_CHECKING:
    from kalm.training.losses.mixing import HardNegativeMixer

HardNegatives = Literal["batch", "own", "none"]
HARD_NEGATIVE_SCOPES: tuple[str, ...] = get_args(HardNegatives)
DEFAULT_TEMPERATURE = 0.01  # METHOD.md [paper: code]: the authors' fine-tuning script


def infonce_logits(
    q: Tensor,
    p: Tensor,
    n: Tensor | None = None,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    hard_negatives: HardNegatives = "batch",
    extra_negatives: Tensor | None = None,
    positive_offset: int = 0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scaled scores of every query against its candidates, and the column of its positive.

    Args:
        q: (N, D) queries, unit norm.
        p: (P, D) positives, P >= N; query i's positive is row ``positive_offset + i`` (all other rows are
           in-batch negatives for it).
        n: (B, M, D) hard negatives. ``"batch"``: all B·M rows are candidates of every query (B may be the
           gathered global batch). ``"own"``: B == N and row i's M negatives serve query i only.
           ``"none"`` (or n=None): in-batch negatives only.
        extra_negatives: (N, K, D) per-query extra candidates (synthetic negatives), or None.
        positive_offset: where this rank's positives start in ``p`` (0 on one device).
        mask: (N, C) bool over the logits' columns, True = not a candidate (its logit becomes -inf); never
            set on a query's own positive.

    Returns:
        logits (N, P [+ B·M | + M] [+ K]) already divided by τ, and labels (N,) int64.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hard_negatives not in HARD_NEGATIVE_SCOPES:
        raise ValueError(f"hard_negatives must be one of {HARD_NEGATIVE_SCOPES}, got {hard_negatives!r}")
    blocks = [q @ p.T]
    if n is not None and hard_negatives == "batch":
        blocks.append(q @ n.reshape(-1, n.size(-1)).T)
    elif n is not None and hard_negatives == "own":
        if n.size(0) != q.size(0):
            shapes = f"n {tuple(n.shape)}, q {tuple(q.shape)}"
            raise ValueError(f"'own' hard negatives need one row of negatives per query: {shapes}")
        blocks.append(torch.einsum("nd,nmd->nm", q, n))
    if extra_negatives is not None and extra_negatives.size(1) > 0:
        blocks.append(torch.einsum("nd,nkd->nk", q, extra_negatives))
    logits = torch.cat(blocks, dim=1) / temperature
    labels = torch.arange(q.size(0), device=q.device) + positive_offset
    if mask is not None:
        if mask.shape != logits.shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not match the logits {tuple(logits.shape)}")
        logits = logits.masked_fill(mask, float("-inf"))
    return logits, labels


def infonce_per_query(
    q: Tensor,
    p: Tensor,
    n: Tensor | None = None,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    hard_negatives: HardNegatives = "batch",
    extra_negatives: Tensor | None = None,
    positive_offset: int = 0,
    mask: Tensor | None = None,
) -> Tensor:
    """Per-query losses ``L_i = logsumexp(logits_i) - logits_i[label_i]`` -> (N,). Arguments as
    :func:`infonce_logits`. ``exp(-L_i)`` is the softmax probability of the positive (focal's ``p_i``)."""
    logits, labels = infonce_logits(
        q,
        p,
        n,
        temperature=temperature,
        hard_negatives=hard_negatives,
        extra_negatives=extra_negatives,
        positive_offset=positive_offset,
        mask=mask,
    )
    return F.cross_entropy(logits, labels, reduction="none")


class InfoNCE(EmbeddingLoss):
    """InfoNCE over in-batch and hard negatives; the core every other loss wraps.

    ``forward(q (N, D), p (N, D), n (N, M, D) | None, candidates=None) -> scalar`` = mean over this rank's
    queries. ``per_query`` gives the (N,) losses before reduction (used by :class:`FocalInfoNCE`).
    ``candidates`` (:class:`~kalm.training.losses.candidates.Candidates`) masks what is not a negative.

    Args:
        temperature: τ, default 0.01 [paper: code].
        hard_negatives: ``"batch"`` (every query sees all hard negatives of the batch, [paper: code]),
            ``"own"`` (only its own), ``"none"`` (in-batch only: pre-training, [reported]).
        cross_device: gather positives and hard negatives from all ranks when torch.distributed runs
            [paper: code]. No effect in one process.
        mixer: optional :class:`~kalm.training.losses.mixing.HardNegativeMixer`; its synthetic negatives
            join only their own query's denominator.
    """

    def __init__(
        self,
        temperature: float = DEFAULT_TEMPERATURE,
        hard_negatives: HardNegatives = "batch",
        cross_device: bool = True,
        mixer: HardNegativeMixer | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if hard_negatives not in HARD_NEGATIVE_SCOPES:
            raise ValueError(f"hard_negatives must be one of {HARD_NEGATIVE_SCOPES}, got {hard_negatives!r}")
        self.temperature = float(temperature)
        self.hard_negatives = cast(HardNegatives, hard_negatives)
        self.cross_device = cross_device
        self.mixer = mixer

    @property
    def columns(self) -> tuple[str, ...]:
        """Dataset columns this loss consumes."""
        uses_neg = self.hard_negatives != "none" or (self.mixer is not None and self.mixer.k > 0)
        return ("query", "pos", "neg") if uses_neg else ("query", "pos")

    def per_query(
        self, q: Tensor, p: Tensor, n: Tensor | None = None, candidates: Candidates | None = None
    ) -> Tensor:
        """q (N, D), p (N, D), n (N, M, D) | None, all unit norm -> (N,) per-query losses."""
        if p.shape != q.shape:
            raise ValueError(f"q and p must have the same shape, got {tuple(q.shape)} and {tuple(p.shape)}")
        negatives = n if self.hard_negatives != "none" else None
        offset = 0
        if self.cross_device:
            p, offset = gather_rows(p)
            if negatives is not None and self.hard_negatives == "batch":
                negatives, _ = gather_rows(negatives)
        # Mixing uses the local query's own negatives (padding excluded), never gathered ones.
        extra, ok = None, None
        if self.mixer is not None:
            valid = candidates.local_valid(offset, q.size(0)) if candidates is not None else None
            extra, ok = self.mixer.mix(q, n, valid)
        mask = None
        if candidates is not None or ok is not None:
            mask = self._mask(q, p, negatives, candidates, offset, ok if extra is not None else None)
        return infonce_per_query(
            q,
            p,
            negatives,
            temperature=self.temperature,
            hard_negatives=self.hard_negatives,
            extra_negatives=extra,
            positive_offset=offset,
            mask=mask,
        )

    def _mask(
        self,
        q: Tensor,
        p: Tensor,
        negatives: Tensor | None,
        candidates: Candidates | None,
        offset: int,
        ok: Tensor | None,
    ) -> Tensor:
        """(N, C) True where a column is not a negative: [positives | hard negatives | synthetic]."""
        n_q = q.size(0)
        pos_mask, neg_mask = (
            candidate_masks(candidates, offset, n_q, self.hard_negatives)
            if candidates is not None
            else (None, None)
        )
        blocks = [pos_mask if pos_mask is not None else q.new_zeros(n_q, p.size(0), dtype=torch.bool)]
        if negatives is not None:
            width = negatives.size(1) * (negatives.size(0) if self.hard_negatives == "batch" else 1)
            blocks.append(neg_mask if neg_mask is not None else q.new_zeros(n_q, width, dtype=torch.bool))
        if ok is not None:
            blocks.append(~ok.to(q.device))
        return torch.cat(blocks, dim=1)

    def forward(
        self, q: Tensor, p: Tensor, n: Tensor | None = None, candidates: Candidates | None = None
    ) -> Tensor:
        """Mean of :meth:`per_query` over this rank's queries -> scalar."""
        return self.per_query(q, p, n, candidates).mean()

    def config(self) -> dict[str, Any]:
        return {
            "name": "infonce",
            "temperature": self.temperature,
            "hard_negatives": self.hard_negatives,
            "cross_device": self.cross_device,
            "mixing": self.mixer.config() if self.mixer is not None else None,
            "columns": list(self.columns),
        }
