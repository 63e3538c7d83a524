"""The KaLM-V2 losses against the math: hand-computed values, exact-equality cases, gradient flow, GradCache.

Expected numbers are computed here with ``math``/``numpy`` from the formulas in METHOD.md, never by calling
the code under test.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kalm.training.losses import (
    LOSS_DEFAULTS,
    LOSSES,
    FocalInfoNCE,
    GradCache,
    HardNegativeMixer,
    InfoNCE,
    MatryoshkaLoss,
    build_loss,
    focal_weights,
    resolve_dims,
    sample_beta,
    sample_dirichlet,
)
from kalm.training.losses.mixing import sample_gamma

# -- fixtures ----------------------------------------------------------------------------------------------

# Two queries, unit vectors in 2-D, one hard negative each; τ = 0.5 keeps the exponents readable.
Q = [[1.0, 0.0], [0.0, 1.0]]
P = [[0.6, 0.8], [0.8, 0.6]]
NEG = [[[0.0, 1.0]], [[1.0, 0.0]]]
TAU = 0.5


def tensors(requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(Q, requires_grad=requires_grad),
        torch.tensor(P, requires_grad=requires_grad),
        torch.tensor(NEG, requires_grad=requires_grad),
    )


def random_batch(n: int = 6, m: int = 3, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    p = F.normalize(q + 0.5 * torch.randn(n, d, generator=g), dim=-1)
    neg = F.normalize(q.unsqueeze(1) + 0.8 * torch.randn(n, m, d, generator=g), dim=-1)
    return q, p, neg


def hand_loss(scores_pos: float, others: list[float], tau: float) -> float:
    """-log( e^{s+/τ} / (e^{s+/τ} + Σ e^{s/τ}) ) with plain math."""
    z = math.exp(scores_pos / tau) + sum(math.exp(s / tau) for s in others)
    return -math.log(math.exp(scores_pos / tau) / z)


# -- InfoNCE -----------------------------------------------------------------------------------------------


def test_infonce_hand_computed_batch_negatives() -> None:
    # q1=(1,0): positive 0.6; other positive 0.8; hard negatives of the whole batch 0 and 1.
    # q2=(0,1): positive 0.6; other positive 0.8; hard negatives 1 and 0.
    l1 = hand_loss(0.6, [0.8, 0.0, 1.0], TAU)
    l2 = hand_loss(0.6, [0.8, 1.0, 0.0], TAU)
    q, p, n = tensors()
    loss = InfoNCE(temperature=TAU, hard_negatives="batch")
    assert loss.per_query(q, p, n).tolist() == pytest.approx([l1, l2], abs=1e-6)
    assert loss(q, p, n).item() == pytest.approx((l1 + l2) / 2, abs=1e-6)


def test_infonce_hand_computed_own_and_none_scopes() -> None:
    q, p, n = tensors()
    own = InfoNCE(temperature=TAU, hard_negatives="own").per_query(q, p, n)
    # Own negatives only: q1·n1 = (1,0)·(0,1) = 0 and q2·n2 = (0,1)·(1,0) = 0.
    assert own.tolist() == pytest.approx([hand_loss(0.6, [0.8, 0.0], TAU)] * 2)
    none = InfoNCE(temperature=TAU, hard_negatives="none").per_query(q, p, n)
    assert none.tolist() == pytest.approx([hand_loss(0.6, [0.8], TAU)] * 2)
    # n=None is the same as in-batch only (pre-training batches carry no negatives).
    assert torch.equal(InfoNCE(temperature=TAU).per_query(q, p, None), none)


def test_infonce_default_temperature_is_paper_value() -> None:
    assert InfoNCE().temperature == 0.01
    assert LOSS_DEFAULTS["temperature"] == 0.01


def test_infonce_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="temperature"):
        InfoNCE(temperature=0.0)
    with pytest.raises(ValueError, match="hard_negatives"):
        InfoNCE(hard_negatives="all")  # type: ignore[arg-type]


# -- focal -------------------------------------------------------------------------------------------------


def test_focal_weights_and_loss_hand_computed() -> None:
    z1 = [math.exp(s / TAU) for s in (0.6, 0.8, 0.0, 1.0)]
    z2 = [math.exp(s / TAU) for s in (0.6, 0.8, 1.0, 0.0)]
    p1, p2 = z1[0] / sum(z1), z2[0] / sum(z2)
    l1, l2 = -math.log(p1), -math.log(p2)
    w1, w2 = (1 - p1) ** 0.5, (1 - p2) ** 0.5
    q, p, n = tensors()
    loss = FocalInfoNCE(InfoNCE(temperature=TAU), gamma=0.5)
    assert loss(q, p, n).item() == pytest.approx((w1 * l1 + w2 * l2) / 2, abs=1e-6)
    weights = focal_weights(torch.tensor([l1, l2]), gamma=0.5)
    assert weights.tolist() == pytest.approx([w1, w2], abs=1e-6)
    normed = focal_weights(torch.tensor([l1, l2]), gamma=0.5, normalize=True)
    assert normed.tolist() == pytest.approx([2 * w1 / (w1 + w2), 2 * w2 / (w1 + w2)], abs=1e-6)


def test_focal_gamma_zero_is_exactly_infonce() -> None:
    q, p, n = (t.requires_grad_() for t in random_batch())
    plain = InfoNCE()(q, p, n)
    grads_plain = torch.autograd.grad(plain, (q, p, n))
    for normalize in (False, True):
        focal = FocalInfoNCE(InfoNCE(), gamma=0.0, normalize=normalize)(q, p, n)
        assert torch.equal(focal, plain)
        for a, b in zip(torch.autograd.grad(focal, (q, p, n)), grads_plain, strict=True):
            assert torch.equal(a, b)


def test_focal_detach_changes_gradient_as_documented() -> None:
    q, p, n = (t.requires_grad_() for t in random_batch())
    per_query = InfoNCE().per_query(q, p, n)
    # With detached weights, the gradient is Σ_i w_i ∇L_i / N with w_i constants (numbers, no graph).
    w_const = [(1 - math.exp(-v)) ** 0.5 for v in per_query.tolist()]
    expected = torch.autograd.grad((torch.tensor(w_const) * per_query).mean(), q, retain_graph=True)[0]
    detached = torch.autograd.grad(FocalInfoNCE(InfoNCE(), gamma=0.5, detach=True)(q, p, n), q)[0]
    attached = torch.autograd.grad(FocalInfoNCE(InfoNCE(), gamma=0.5, detach=False)(q, p, n), q)[0]
    torch.testing.assert_close(detached, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(attached, detached, atol=1e-6)


def test_focal_weight_has_no_nan_gradient_when_positive_is_certain() -> None:
    q = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p = torch.tensor([[1.0, 0.0]])
    loss = FocalInfoNCE(InfoNCE(), gamma=0.5)(q, p, None)  # one candidate: p_i == 1, L_i == 0
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# -- hard-negative mixing ----------------------------------------------------------------------------------


def test_mixing_one_pair_draw_hand_computed() -> None:
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = F.normalize(torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.9, 0.3]]), dim=-1)
    n = F.normalize(
        torch.tensor([[[0.5, 0.5, 0.7], [0.7, -0.2, 0.5]], [[0.3, 0.6, -0.6], [-0.4, 0.5, 0.6]]]), dim=-1
    )
    mixer = HardNegativeMixer(k=1, alpha=2.0, top_n=2, mode="pair", seed=123)
    value = InfoNCE(temperature=TAU, hard_negatives="batch", mixer=mixer)(q, p, n).item()

    draw = mixer.last_draw
    a, b, lam = draw["idx_a"].numpy(), draw["idx_b"].numpy(), draw["lam"].numpy()
    assert {int(a[0, 0]), int(b[0, 0])} == {0, 1} and 0.0 < lam[0, 0] < 1.0  # two distinct of 2
    qn, pn, nn_ = q.numpy().astype(np.float64), p.numpy().astype(np.float64), n.numpy().astype(np.float64)
    expected = []
    for i in range(2):
        h = lam[i, 0] * nn_[i, a[i, 0]] + (1 - lam[i, 0]) * nn_[i, b[i, 0]]
        h /= np.linalg.norm(h)
        others = [qn[i] @ pn[j] for j in range(2) if j != i]
        others += [qn[i] @ nn_[j, m] for j in range(2) for m in range(2)]
        others += [qn[i] @ h]  # the synthetic negative joins only its own query's denominator
        expected.append(hand_loss(float(qn[i] @ pn[i]), [float(s) for s in others], TAU))
    assert value == pytest.approx(float(np.mean(expected)), abs=1e-5)


def test_mixing_pair_picks_from_the_hardest() -> None:
    q, _, n = random_batch(n=4, m=6, d=8)
    mixer = HardNegativeMixer(k=8, top_n=2, seed=0)
    mixer(q, n)
    hardest2 = torch.einsum("nd,nmd->nm", q, n).topk(2, dim=1).indices
    for i in range(4):
        allowed = set(hardest2[i].tolist())
        assert set(mixer.last_draw["idx_a"][i].tolist()) <= allowed
        assert set(mixer.last_draw["idx_b"][i].tolist()) <= allowed
        assert (mixer.last_draw["idx_a"][i] != mixer.last_draw["idx_b"][i]).all()


def test_mixing_listwise_modes_hand_computed() -> None:
    q, _, n = random_batch(n=3, m=4, d=8)
    qn, nn_ = q.double().numpy(), n.double().numpy()
    dirichlet = HardNegativeMixer(k=2, alpha=1.0, mode="dirichlet", seed=5)
    out = dirichlet(q, n)
    assert out is not None
    w = dirichlet.last_draw["weights"].numpy()  # (N, K, M), rows on the simplex
    assert np.allclose(w.sum(-1), 1.0) and (w > 0).all()
    h = np.einsum("nkm,nmd->nkd", w, nn_)
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    np.testing.assert_allclose(out.numpy(), h, atol=1e-6)

    soft = HardNegativeMixer(k=1, mode="softmax", softmax_temperature=0.1)
    out = soft(q, n)
    assert out is not None
    s = np.einsum("nd,nmd->nm", qn, nn_) / 0.1
    ws = np.exp(s - s.max(1, keepdims=True))
    ws /= ws.sum(1, keepdims=True)
    h = np.einsum("nm,nmd->nd", ws, nn_)
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    np.testing.assert_allclose(out[:, 0].numpy(), h, atol=1e-6)
    with pytest.raises(ValueError, match="softmax"):
        HardNegativeMixer(k=2, mode="softmax")


def test_mixing_k_zero_is_exactly_unmixed() -> None:
    q, p, n = (t.requires_grad_() for t in random_batch())
    plain = InfoNCE()(q, p, n)
    mixed = InfoNCE(mixer=HardNegativeMixer(k=0))(q, p, n)
    assert torch.equal(plain, mixed)
    for a, b in zip(
        torch.autograd.grad(plain, (q, p, n)), torch.autograd.grad(mixed, (q, p, n)), strict=True
    ):
        assert torch.equal(a, b)
    off = build_loss({"mix_k": 0, "focal_gamma": 0.0, "matryoshka": False})
    assert torch.equal(off(q, p, n), plain)


@pytest.mark.parametrize("detach", [True, False])
def test_mixing_gradient_flow_through_synthetics(detach: bool) -> None:
    q, p, n = (t.requires_grad_() for t in random_batch())
    # hard_negatives="none": the real negatives enter the loss only through the synthetic ones.
    loss = InfoNCE(hard_negatives="none", mixer=HardNegativeMixer(k=2, detach=detach))(q, p, n)
    (grad_n,) = torch.autograd.grad(loss, n, allow_unused=True)
    if detach:
        assert grad_n is None or not grad_n.abs().sum().item()
    else:
        assert grad_n is not None and grad_n.abs().sum().item() > 0


def test_mixing_state_dict_reproduces_draws_on_resume() -> None:
    q, p, n = random_batch()
    loss = build_loss({"mix_k": 3, "mix_seed": 7})
    loss(q, p, n)  # advance the generator: resuming mid-run, not from the seed
    state = copy.deepcopy(loss.state_dict())
    expected = loss(q, p, n)
    resumed = build_loss({"mix_k": 3, "mix_seed": 999})
    assert not torch.equal(resumed(q, p, n), expected)  # a different seed draws differently
    resumed.load_state_dict(state)
    assert torch.equal(resumed(q, p, n), expected)


def test_samplers_match_their_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    lam = sample_beta(2.0, (20000,), g)
    assert lam.mean().item() == pytest.approx(0.5, abs=0.01)
    assert lam.var().item() == pytest.approx(1 / 20, abs=0.003)  # αβ/((α+β)²(α+β+1)) = 4/80
    assert sample_gamma(0.5, (20000,), g).mean().item() == pytest.approx(0.5, abs=0.03)  # the α<1 path
    w = sample_dirichlet(2.0, (5000, 4), g)
    assert torch.allclose(w.sum(-1), torch.ones(5000, dtype=torch.float64))
    assert w.mean(0).tolist() == pytest.approx([0.25] * 4, abs=0.01)


# -- Matryoshka --------------------------------------------------------------------------------------------


def test_matryoshka_single_full_dim_is_exactly_inner() -> None:
    q, p, n = (t.requires_grad_() for t in random_batch(d=16))
    inner = InfoNCE()
    plain = inner(q, p, n)
    wrapped = MatryoshkaLoss(inner, dims=[16], weights=[1.0])(q, p, n)
    assert torch.equal(plain, wrapped)
    for a, b in zip(
        torch.autograd.grad(plain, (q, p, n)), torch.autograd.grad(wrapped, (q, p, n)), strict=True
    ):
        assert torch.equal(a, b)


def test_matryoshka_weighted_sum_of_truncations() -> None:
    q, p, n = tensors()
    q3 = F.normalize(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]), dim=-1)
    p3 = F.normalize(torch.tensor([[0.6, 0.8, 0.5], [0.8, 0.6, -0.5]]), dim=-1)
    n3 = F.normalize(torch.tensor([[[0.0, 1.0, 0.3]], [[1.0, 0.0, 0.2]]]), dim=-1)
    value = MatryoshkaLoss(InfoNCE(temperature=TAU), dims=[3, 2], weights=[1.0, 0.5])(q3, p3, n3).item()
    # The 2-dim truncation of these rows, renormalised, is exactly the hand example above.
    assert torch.allclose(F.normalize(q3[:, :2], dim=-1), q)
    assert torch.allclose(F.normalize(p3[:, :2], dim=-1), p)
    assert torch.allclose(F.normalize(n3[..., :2], dim=-1), n)
    qn, pn, nn_ = q3.double().numpy(), p3.double().numpy(), n3.double().numpy()
    full = [
        hand_loss(
            float(qn[i] @ pn[i]),
            [float(qn[i] @ pn[1 - i])] + [float(qn[i] @ nn_[j, 0]) for j in range(2)],
            TAU,
        )
        for i in range(2)
    ]
    cut = [hand_loss(0.6, [0.8, 0.0, 1.0], TAU), hand_loss(0.6, [0.8, 1.0, 0.0], TAU)]
    assert value == pytest.approx(np.mean(full) + 0.5 * np.mean(cut), abs=1e-5)


def test_matryoshka_default_dims_are_clipped_to_width() -> None:
    assert resolve_dims(896) == [(896, 1.0), (512, 0.3), (256, 0.2), (128, 0.1), (64, 0.1)]  # [paper: code]
    assert resolve_dims(384) == [(384, 1.0), (256, 0.2), (128, 0.1), (64, 0.1)]
    assert resolve_dims(1536)[:2] == [(1536, 1.0), (512, 0.3)]
    assert resolve_dims(32) == [(32, 1.0)]
    q, p, n = random_batch(d=32)
    assert torch.equal(MatryoshkaLoss(InfoNCE())(q, p, n), InfoNCE()(q, p, n))  # width 32: one term, w=1


def test_matryoshka_explicit_dim_above_width_is_an_error() -> None:
    with pytest.raises(ValueError, match="384"):
        resolve_dims(384, [512, 256])
    with pytest.raises(ValueError, match="384"):
        build_loss({"matryoshka_dims": [512, 128]}, embedding_dim=384)
    loss = build_loss({"matryoshka_dims": [32, 8]})  # no width known yet: checked on the first call
    q, p, n = random_batch(d=16)
    with pytest.raises(ValueError, match="width 16"):
        loss(q, p, n)
    with pytest.raises(ValueError, match="differ in length"):
        MatryoshkaLoss(InfoNCE(), dims=[8, 4], weights=[1.0])


# -- build_loss --------------------------------------------------------------------------------------------


def test_build_loss_composes_the_stages() -> None:
    fine = build_loss({})
    assert isinstance(fine, MatryoshkaLoss) and isinstance(fine.inner, FocalInfoNCE)
    assert fine.inner.gamma == 0.5 and fine.inner.inner.mixer is not None
    assert fine.columns == ("query", "pos", "neg")
    pre = build_loss({"stage": "pretrain"})
    assert isinstance(pre, MatryoshkaLoss) and isinstance(pre.inner, InfoNCE)
    assert pre.inner.hard_negatives == "none" and pre.inner.mixer is None
    assert pre.columns == ("query", "pos")
    cached = build_loss({"gradcache_chunk_size": 4})
    assert isinstance(cached, GradCache) and cached.chunk_size == 4
    for loss in (fine, pre, cached):
        json.dumps(loss.config())  # the run log takes it as is
    assert set(LOSSES) >= {"infonce", "focal_infonce", "matryoshka", "gradcache"}


def test_build_loss_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match=r"unknown loss option.*'temprature'.*allowed:.*temperature"):
        build_loss({"temprature": 0.02})
    with pytest.raises(ValueError, match="allowed: finetune, pretrain"):
        build_loss({"stage": "warmup"})
    with pytest.raises(ValueError, match="mix_k"):
        build_loss({"mix_k": 1.5})
    with pytest.raises(ValueError, match="focal_gamma"):
        build_loss({"focal_gamma": -1.0})
    with pytest.raises(ValueError, match="matryoshka is False"):
        build_loss({"matryoshka": False, "matryoshka_dims": [8]})


# -- GradCache ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert():
    """A 2-layer, 32-wide random BERT with dropout, behind our Embedder (MiniLM's tokenizer)."""
    from transformers import BertModel

    from kalm.training.model import Embedder
    from tests.conftest import tiny_bert_parts

    tok, cfg = tiny_bert_parts(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    return Embedder(BertModel(cfg), tok)


def _features(emb, texts: list[str]) -> dict[str, torch.Tensor]:
    return emb.tokenize(texts)


QUERIES = ["what is bm25", "capital of france", "how do magnets work", "python sort a list", "tallest tree"]
POSITIVES = [
    "bm25 ranks documents",
    "paris is the capital",
    "magnetic fields align",
    "use sorted()",
    "redwoods",
]
NEGATIVES = [f"negative passage number {i} about something else entirely" for i in range(10)]  # M = 2


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}


def test_gradcache_equals_full_batch_without_dropout(tiny_bert) -> None:
    emb = tiny_bert.eval()
    loss = build_loss({"mix_k": 0, "temperature": 0.05})
    q, p, n = (_features(emb, t) for t in (QUERIES, POSITIVES, NEGATIVES))

    emb.zero_grad()
    full = loss(emb(**q), emb(**p), emb(**n).view(len(QUERIES), 2, -1))
    full.backward()
    expected = _grads(emb)

    emb.zero_grad()
    cached = GradCache(loss, chunk_size=2).step(emb, q, p, n)
    got = _grads(emb)
    assert cached.item() == pytest.approx(full.item(), abs=1e-5)
    assert expected.keys() == got.keys() and len(got) > 10
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6, msg=k)


def test_gradcache_replays_dropout_rng(tiny_bert) -> None:
    emb = tiny_bert.train()
    loss = build_loss({"temperature": 0.05, "mix_k": 2, "mix_top_n": 2})  # focal + mixing + Matryoshka
    start = copy.deepcopy(loss.state_dict())
    q, p, n = (_features(emb, t) for t in (QUERIES, POSITIVES, NEGATIVES))
    chunk = 2

    # Reference: the same chunks forwarded WITH grad in the same order, so dropout masks are the same.
    torch.manual_seed(1)
    emb.zero_grad()
    parts = {}
    for name, feats in (("q", q), ("p", p), ("n", n)):
        rows = feats["input_ids"].size(0)
        parts[name] = torch.cat(
            [emb(**{k: v[s : s + chunk] for k, v in feats.items()}) for s in range(0, rows, chunk)]
        )
    ref = loss(parts["q"], parts["p"], parts["n"].view(len(QUERIES), 2, -1))
    ref.backward()
    expected = _grads(emb)

    loss.load_state_dict(start)  # the mixer draws the same synthetic negatives again
    torch.manual_seed(1)
    emb.zero_grad()
    cached = GradCache(loss, chunk_size=chunk).step(emb, q, p, n)
    got = _grads(emb)
    assert cached.item() == pytest.approx(ref.item(), abs=1e-5)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6, msg=k)

    # Sanity: dropout is live (another seed gives other gradients), so the equality above is not trivial.
    torch.manual_seed(2)
    emb.zero_grad()
    loss.load_state_dict(start)
    GradCache(loss, chunk_size=chunk).step(emb, q, p, n)
    differs = any(not torch.allclose(v.grad, expected[k], atol=1e-6) for k, v in emb.named_parameters())
    assert differs


def test_gradcache_with_distillation_equals_full_batch(tiny_bert) -> None:
    """Distillation on (teacher scores, focal, Matryoshka): chunked gradients equal the full batch's."""
    from kalm.training.losses.candidates import Candidates

    emb = tiny_bert.eval()
    loss = build_loss({"mix_k": 0, "temperature": 0.05, "distill_alpha": 1.0})
    g = torch.Generator().manual_seed(3)
    cands = Candidates(
        pos_key=torch.arange(5),
        pos_label=torch.full((5,), -1),
        neg_key=torch.arange(10).view(5, 2) + 100,
        neg_label=torch.full((5, 2), -1),
        teacher=torch.rand(5, 3, generator=g),
    )
    q, p, n = (_features(emb, t) for t in (QUERIES, POSITIVES, NEGATIVES))

    emb.zero_grad()
    full = loss(emb(**q), emb(**p), emb(**n).view(len(QUERIES), 2, -1), cands)
    full.backward()
    expected = _grads(emb)
    plain = build_loss({"mix_k": 0, "temperature": 0.05})(
        emb(**q), emb(**p), emb(**n).view(len(QUERIES), 2, -1), cands
    )
    assert full.item() > plain.item() + 1e-4  # the KL term is really in the loss

    emb.zero_grad()
    cached = GradCache(loss, chunk_size=2).step(emb, q, p, n, candidates=cands)
    got = _grads(emb)
    assert cached.item() == pytest.approx(full.item(), abs=1e-5)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6, msg=k)
