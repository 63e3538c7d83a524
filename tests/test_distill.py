"""Contrastive distillation against the math: the KL term by hand, alpha = 0 bitwise, what is left out.

Expected numbers come from ``math`` and the formula in kalm/training/losses/distill.py, never from the code
under test. GradCache with distillation is in tests/test_losses.py (it shares the tiny BERT fixture there).
"""

from __future__ import annotations

import math

import pytest
import torch

from kalm.training.losses import DistillLoss, InfoNCE, MatryoshkaLoss, build_loss, distill_kl
from kalm.training.losses.candidates import PAD, Candidates

NAN = float("nan")
Q = [[1.0, 0.0], [0.0, 1.0]]
P = [[0.6, 0.8], [0.8, 0.6]]
NEG = [[[0.0, 1.0], [0.8, 0.6]], [[1.0, 0.0], [0.0, 1.0]]]  # row 1's second slot is padding


def batch(teacher: list[list[float]], neg_key: list[list[int]] | None = None) -> tuple:
    c = Candidates(
        pos_key=torch.tensor([10, 11]),
        pos_label=torch.tensor([-1, -1]),
        neg_key=torch.tensor(neg_key or [[20, 21], [22, PAD]]),
        neg_label=torch.tensor([[-1, -1], [-1, -1]]),
        teacher=torch.tensor(teacher),
    )
    return torch.tensor(Q), torch.tensor(P), torch.tensor(NEG), c


def kl(t: list[float], s: list[float], tt: float, ts: float) -> float:
    """KL(softmax(t/tt) || softmax(s/ts)) with plain math."""
    zt = sum(math.exp(x / tt) for x in t)
    zs = sum(math.exp(x / ts) for x in s)
    pt = [math.exp(x / tt) / zt for x in t]
    ps = [math.exp(x / ts) / zs for x in s]
    return sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))


def test_kl_term_hand_computed_with_padding_and_missing_scores() -> None:
    # row 0: all three scored; row 1: the padding slot and a NaN score leave one candidate -> 0
    q, p, n, c = batch([[0.9, 0.2, 0.5], [0.7, NAN, 0.3]])
    got = distill_kl(q, p, n, c, 0, teacher_temperature=0.5, student_temperature=0.25)
    row0 = kl([0.9, 0.2, 0.5], [0.6, 0.0, 0.8], 0.5, 0.25)  # cosines of q0 with p0, n00, n01
    assert got.tolist() == pytest.approx([row0, 0.0], abs=1e-6)
    # row 1 with its score present: positive + first negative (the padding slot stays out)
    _, _, _, c2 = batch([[0.9, 0.2, 0.5], [0.7, 0.1, 0.3]])
    got2 = distill_kl(q, p, n, c2, 0, teacher_temperature=0.5, student_temperature=0.25)
    assert got2.tolist() == pytest.approx([row0, kl([0.7, 0.1], [0.6, 0.0], 0.5, 0.25)], abs=1e-6)
    # the row without a usable teacher distribution is a counted skip in the loss
    loss = DistillLoss(InfoNCE(temperature=0.5, cross_device=False), 1.0, 0.5, 0.25)
    loss(q, p, n, c)
    assert loss.unscored == 1 and loss.last_kl[2] == pytest.approx(row0 / 2, abs=1e-6)


def test_kl_leaves_out_a_copy_of_the_positive() -> None:
    # row 0's second negative has the positive's key: masked out of InfoNCE and out of the KL
    q, p, n, c = batch([[0.9, 0.2, 0.5], [0.7, 0.1, 0.3]], neg_key=[[20, 10], [22, PAD]])
    got = distill_kl(q, p, n, c, 0, teacher_temperature=0.5, student_temperature=0.25)
    assert float(got[0]) == pytest.approx(kl([0.9, 0.2], [0.6, 0.0], 0.5, 0.25), abs=1e-6)


def test_distill_loss_is_inner_plus_alpha_mean_kl() -> None:
    q, p, n, c = batch([[0.9, 0.2, 0.5], [0.7, 0.1, 0.3]])
    inner = InfoNCE(temperature=0.5, cross_device=False)
    loss = DistillLoss(inner, alpha=0.3, teacher_temperature=0.5, student_temperature=0.25)
    rows = [kl([0.9, 0.2, 0.5], [0.6, 0.0, 0.8], 0.5, 0.25), kl([0.7, 0.1], [0.6, 0.0], 0.5, 0.25)]
    expected = float(inner(q, p, n, c)) + 0.3 * sum(rows) / 2
    assert float(loss(q, p, n, c)) == pytest.approx(expected, abs=1e-6)
    assert loss.last_kl[2] == pytest.approx(sum(rows) / 2, abs=1e-6)


def test_alpha_zero_is_the_plain_loss_bitwise() -> None:
    """The fine-tuning loss (focal, mixing, Matryoshka) with alpha 0 and teacher scores present: the same
    loss and the same gradients, bit for bit, as the loss without distillation."""
    g = torch.Generator().manual_seed(0)
    q0 = torch.nn.functional.normalize(torch.randn(4, 64, generator=g), dim=-1)
    p0 = torch.nn.functional.normalize(q0 + 0.5 * torch.randn(4, 64, generator=g), dim=-1)
    n0 = torch.nn.functional.normalize(q0[:, None] + torch.randn(4, 3, 64, generator=g), dim=-1)
    cands = Candidates(
        pos_key=torch.arange(4),
        pos_label=torch.full((4,), -1),
        neg_key=torch.arange(12).view(4, 3) + 100,
        neg_label=torch.full((4, 3), -1),
        teacher=torch.rand(4, 4, generator=g),
    )
    results = []
    for cfg in ({"matryoshka_dims": [64, 32]}, {"matryoshka_dims": [64, 32], "distill_alpha": 0.0}):
        q, p, n = (x.clone().requires_grad_() for x in (q0, p0, n0))
        value = build_loss({**cfg, "mix_top_n": 2})(q, p, n, cands)
        value.backward()
        results.append((value.detach(), q.grad, p.grad, n.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    wrapped = DistillLoss(InfoNCE(cross_device=False), alpha=0.0)
    assert torch.equal(wrapped(q0, p0, n0, cands), wrapped.inner(q0, p0, n0, cands))


def test_build_loss_places_distillation_inside_matryoshka_and_checks_options() -> None:
    loss = build_loss({"distill_alpha": 0.5})
    assert isinstance(loss, MatryoshkaLoss) and isinstance(loss.inner, DistillLoss)
    assert loss.config()["inner"]["alpha"] == 0.5
    assert not isinstance(build_loss({"matryoshka": False}), DistillLoss)
    with pytest.raises(ValueError, match="distill_alpha must be >= 0"):
        build_loss({"distill_alpha": -1.0})
    with pytest.raises(ValueError, match="must be a number"):
        build_loss({"distill_alpha": "high"})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build_loss({"distill_alpha": 0.5, "distill_teacher_temperature": 0.0})


def test_synthetic_negatives_stay_out_of_the_kl() -> None:
    """With mixing on, the KL is the one over the real candidates: the same as with mixing off."""
    q, p, n, c = batch([[0.9, 0.2, 0.5], [0.7, 0.1, 0.3]])
    values = {}
    for k in (0, 2):
        loss = build_loss(
            {"distill_alpha": 1.0, "matryoshka": False, "focal_gamma": 0.0, "mix_k": k, "mix_top_n": 2}
        )
        loss(q, p, n, c)
        assert isinstance(loss, DistillLoss)
        values[k] = loss.last_kl[2]
    assert values[0] == values[2]
