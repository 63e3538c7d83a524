"""Who each candidate of a batch is, so the loss can drop the false negatives our own data creates.

A query's denominator holds its positive, the other queries' positives (in-batch negatives), hard negatives
and synthetic ones. Three kinds of candidates are not negatives at all and are masked out (never the query's
own positive column):

- a text equal (after normalisation) to the query's own positive: the same pair twice in a batch, a
  duplicate across sources, or a positive reused as another row's negative (the loss could not fall below
  log 2 with one such copy);
- where the query has a class (classification/clustering rows), any candidate of the same class;
- padding: a row with fewer than M distinct hard negatives gets padded slots (key ``PAD``), never a copy.

The in-batch scope of each query (per recipe or task type, as FlagEmbedding's ``no_in_batch_neg`` folders):
``batch`` = every candidate of the batch, ``own`` = the other queries' positives but only its own hard
negatives, ``none`` = its own group only (positive + its own hard negatives).

Keys are int64 hashes of normalised texts (:func:`text_key`), labels int64 class ids (``NO_LABEL`` = none),
both for the *global* batch (every rank knows the whole batch, so no gather is needed).

>>> c = Candidates(pos_key=torch.tensor([1, 1]), pos_label=torch.tensor([-1, -1]))
>>> candidate_masks(c, offset=0, n=2)[0]          # query 0's column 1 is a copy of its positive
tensor([[False,  True],
        [ True, False]])
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, fields

import torch
from torch import Tensor

PAD = -1  # key of a padding slot: masked for every query
NO_LABEL = -1
SCOPES = {"batch": 0, "own": 1, "none": 2}


def text_key(text: str) -> int:
    """A signed 63-bit hash of a text's comparison form (NFKC, case-folded, whitespace collapsed)."""
    norm = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=8).digest()) >> 1


@dataclass
class Candidates:
    """Identity of every candidate of a global batch of G rows with M hard-negative slots each.

    pos_key, pos_label: (G,) the rows' positives; neg_key, neg_label: (G, M) their hard negatives
    (``PAD`` keys for empty slots); scope: (G,) in-batch scope per row (``SCOPES`` values); teacher:
    (G, 1 + M) float teacher scores of each row's positive and negatives (NaN = none; for distillation).
    """

    pos_key: Tensor
    pos_label: Tensor
    neg_key: Tensor | None = None
    neg_label: Tensor | None = None
    scope: Tensor | None = None
    teacher: Tensor | None = None

    def local_valid(self, offset: int, n: int) -> Tensor | None:
        """(n, M) True for real (non-padding) hard negatives of this rank's rows."""
        return None if self.neg_key is None else self.neg_key[offset : offset + n] != PAD

    def padding_only(self) -> Candidates:
        """The same batch with every candidate made distinct and unlabelled: only padding is masked (what
        the loss saw before false-negative masking; for ablations)."""
        g = self.pos_key.size(0)
        distinct = torch.arange(g, dtype=torch.int64) + (1 << 40)
        neg_key = None
        if self.neg_key is not None:
            ids = torch.arange(self.neg_key.numel(), dtype=torch.int64).view_as(self.neg_key) + (1 << 41)
            neg_key = torch.where(self.neg_key == PAD, self.neg_key, ids.to(self.neg_key.device))
        return Candidates(
            pos_key=distinct.to(self.pos_key.device),
            pos_label=torch.full_like(self.pos_label, NO_LABEL),
            neg_key=neg_key,
            neg_label=None if self.neg_label is None else torch.full_like(self.neg_label, NO_LABEL),
            scope=None,
            teacher=self.teacher,
        )

    def to(self, device: torch.device) -> Candidates:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Candidates(**{k: None if v is None else v.to(device) for k, v in moved.items()})  # type: ignore[arg-type]


def candidate_masks(
    c: Candidates, offset: int, n: int, hard_negatives: str = "batch"
) -> tuple[Tensor, Tensor | None]:
    """Masks (True = not a negative, drop it) of this rank's ``n`` queries (global rows offset..offset+n-1).

    Returns (n, G) over the positives and, with negatives, (n, G·M) for ``hard_negatives="batch"`` or
    (n, M) for ``"own"`` (the query's own negatives), in the column order of
    :func:`~kalm.training.losses.infonce.infonce_logits`.
    """
    rows = torch.arange(offset, offset + n, device=c.pos_key.device)
    g = c.pos_key.size(0)
    my_key = c.pos_key[rows][:, None]
    my_label = c.pos_label[rows][:, None]
    scope = c.scope[rows][:, None] if c.scope is not None else torch.zeros_like(my_key)
    labelled = my_label != NO_LABEL
    same_label = labelled & (c.pos_label[None, :] == my_label)
    other_row = torch.arange(g, device=rows.device)[None, :] != rows[:, None]
    pos_mask = other_row & ((c.pos_key[None, :] == my_key) | same_label | (scope == SCOPES["none"]))
    if c.neg_key is None or hard_negatives == "none":
        return pos_mask, None
    neg_label = c.neg_label if c.neg_label is not None else torch.full_like(c.neg_key, NO_LABEL)
    if hard_negatives == "own":
        keys, labs = c.neg_key[rows], neg_label[rows]  # (n, M)
        owner_other = torch.zeros_like(keys, dtype=torch.bool)
    else:
        m = c.neg_key.size(1)
        keys = c.neg_key.reshape(1, -1).expand(n, -1)  # (n, G·M)
        labs = neg_label.reshape(1, -1).expand(n, -1)
        owner = torch.arange(g, device=rows.device).repeat_interleave(m)
        owner_other = owner[None, :] != rows[:, None]
    neg_mask = (
        (keys == PAD)
        | (keys == my_key)
        | (labelled & (labs == my_label))
        | (owner_other & (scope != SCOPES["batch"]))
    )
    return pos_mask, neg_mask
