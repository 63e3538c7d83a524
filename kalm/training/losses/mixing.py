"""Online hard-negative mixing: synthetic negatives made in embedding space from a query's own hard negatives.

METHOD.md [reported]: ``h = normalize(λ·h_a + (1-λ)·h_b)``, λ ~ Beta(2, 2). Everything else is [open] and an
option here: how many per query (``k``), which negatives are mixed (``"pair"``: two distinct ones drawn
uniformly from the ``top_n`` hardest by current score), a list-wise variant (``"dirichlet"``: random convex
weights over all M; ``"softmax"``: weights softmax(score / softmax_temperature) over all M, deterministic,
so k must be 1), and whether gradients flow through the synthetics (``detach=True`` by default, as in MoCHi).

The synthetic negatives join only their own query's denominator (``InfoNCE`` takes them as
``extra_negatives``). Only real, distinct negatives are mixed (padding and repeats never are), and one
draw per training step is shared by every Matryoshka dim and the logged metrics
(:meth:`HardNegativeMixer.shared_draw`). Randomness comes from a CPU ``torch.Generator`` owned by the mixer;
its state is part of the module's ``state_dict`` (extra state), so a resumed run draws the same numbers.
Seed it differently per rank (e.g. ``seed + rank``) if ranks should not share draws.

>>> mixer = HardNegativeMixer(k=2, alpha=2.0, top_n=4, seed=0)
>>> extra = mixer(q, n)        # q (N, D), n (N, M, D) -> (N, 2, D), unit norm
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MixMode = Literal["pair", "dirichlet", "softmax"]
MIX_MODES: tuple[str, ...] = get_args(MixMode)
DEFAULT_ALPHA = 2.0  # METHOD.md [reported]: λ ~ Beta(2, 2)


def sample_gamma(alpha: float, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Gamma(alpha, 1) draws in float64 from ``generator`` only (Marsaglia & Tsang 2000).

    torch.distributions samplers take no generator, so they cannot be replayed on resume; this can.
    """
    if alpha <= 0:
        raise ValueError(f"gamma/beta/dirichlet concentration must be > 0, got {alpha}")
    boosted = alpha < 1.0  # Gamma(a) = Gamma(a + 1) * U^(1/a) for a < 1
    a = alpha + 1.0 if boosted else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    count = math.prod(shape)
    out = torch.empty(count, dtype=torch.float64)
    todo = torch.arange(count)
    while todo.numel():
        x = torch.randn(todo.numel(), generator=generator, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=generator, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        accept = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp(min=1e-300)))
        out[todo[accept]] = (d * v)[accept]
        todo = todo[~accept]
    if boosted:
        out = out * torch.rand(count, generator=generator, dtype=torch.float64) ** (1.0 / alpha)
    return out.reshape(shape)


def sample_beta(alpha: float, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Symmetric Beta(alpha, alpha) draws, float64: X / (X + Y) with X, Y ~ Gamma(alpha)."""
    x = sample_gamma(alpha, shape, generator)
    y = sample_gamma(alpha, shape, generator)
    return x / (x + y)


def sample_dirichlet(alpha: float, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Symmetric Dirichlet(alpha) draws over the last dim of ``shape``, float64, rows sum to 1."""
    g = sample_gamma(alpha, shape, generator)
    return g / g.sum(dim=-1, keepdim=True)


def mix_pairs(n: Tensor, idx_a: Tensor, idx_b: Tensor, lam: Tensor) -> Tensor:
    """``normalize(λ·n[a] + (1-λ)·n[b])`` per query.

    n (N, M, D), idx_a and idx_b (N, K) int64 positions in M, lam (N, K) -> (N, K, D).
    """
    d = n.size(-1)
    h_a = torch.gather(n, 1, idx_a.unsqueeze(-1).expand(-1, -1, d))
    h_b = torch.gather(n, 1, idx_b.unsqueeze(-1).expand(-1, -1, d))
    lam = lam.to(n.dtype).unsqueeze(-1)
    return F.normalize(lam * h_a + (1.0 - lam) * h_b, dim=-1)


def mix_weighted(n: Tensor, weights: Tensor) -> Tensor:
    """``normalize(Σ_j w_j·n[j])`` per query. n (N, M, D), weights (N, K, M) -> (N, K, D)."""
    return F.normalize(torch.einsum("nkm,nmd->nkd", weights.to(n.dtype), n), dim=-1)


class HardNegativeMixer(nn.Module):
    """``k`` synthetic negatives per query: ``mixer(q (N, D), n (N, M, D)) -> (N, k, D)``, None when k = 0.

    Args:
        k: synthetic negatives per query; 0 disables mixing (the loss is then exactly the unmixed one).
        alpha: Beta(α, α) for ``"pair"``, Dirichlet(α) for ``"dirichlet"``; default 2 [reported].
        top_n: ``"pair"`` mixes two of the ``top_n`` hardest negatives (by q·n); None = all M.
        mode: ``"pair"`` | ``"dirichlet"`` | ``"softmax"`` (see the module docstring).
        detach: no gradient through the synthetics (default, as MoCHi); False lets it reach n.
        softmax_temperature: temperature of the ``"softmax"`` weights.
        seed / generator: the CPU generator of all draws (``generator`` wins when both are given).

    ``last_draw`` keeps the last draw (indices and λ, or weights, and ``ok``) for logging and tests.
    """

    def __init__(
        self,
        k: int = 2,
        alpha: float = DEFAULT_ALPHA,
        top_n: int | None = 4,
        mode: MixMode = "pair",
        detach: bool = True,
        softmax_temperature: float = 0.05,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if k < 0:
            raise ValueError(f"mixing k must be >= 0, got {k}")
        if mode not in MIX_MODES:
            raise ValueError(f"mixing mode must be one of {MIX_MODES}, got {mode!r}")
        if alpha <= 0:
            raise ValueError(f"mixing alpha must be > 0, got {alpha}")
        if top_n is not None and top_n < 2:
            raise ValueError(f"mixing top_n must be >= 2 (two negatives are mixed), got {top_n}")
        if mode == "softmax" and k > 1:
            raise ValueError("mixing mode 'softmax' is deterministic: k must be 0 or 1")
        if softmax_temperature <= 0:
            raise ValueError(f"softmax_temperature must be > 0, got {softmax_temperature}")
        self.k = int(k)
        self.alpha = float(alpha)
        self.top_n = top_n
        self.mode = cast(MixMode, mode)
        self.detach = detach
        self.softmax_temperature = float(softmax_temperature)
        self.seed = int(seed)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.last_draw: dict[str, Tensor] = {}
        self._share_depth = 0
        self._shared: dict[str, Tensor] | None = None

    def forward(self, q: Tensor, n: Tensor | None, valid: Tensor | None = None) -> Tensor | None:
        """The synthetic negatives (N, k, D), None when k = 0 (see :meth:`mix` for which are usable)."""
        return self.mix(q, n, valid)[0]

    def mix(
        self, q: Tensor, n: Tensor | None, valid: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """(synthetic (N, k, D), ok (N, k) bool), or (None, None) when k = 0.

        ``valid`` (N, M): real hard negatives (False = padding). A synthetic is only made from two distinct
        real negatives (different vectors): a row with fewer than two is not mixed with itself, its slot is
        ``ok = False`` (the loss masks it) and counted in ``skipped``. Inside :meth:`shared_draw` the first
        call's draw (chosen by that call's scores: the full dim under Matryoshka) is reused by every later
        call, so all Matryoshka dims and the logged metrics see the same synthetics and the generator
        advances once per step.
        """
        if self.k == 0:
            return None, None
        if n is None or n.size(1) < 2:
            raise ValueError("hard-negative mixing needs at least 2 hard negatives per query (column 'neg')")
        draw = self._shared if self._share_depth and self._shared is not None else self._draw(q, n, valid)
        if self._share_depth:
            self._shared = draw
        self.last_draw = draw
        source = n.detach() if self.detach else n
        if "weights" in draw:
            out = mix_weighted(source, draw["weights"].to(n.device))
        else:
            out = mix_pairs(
                source, draw["idx_a"].to(n.device), draw["idx_b"].to(n.device), draw["lam"].to(n.device)
            )
        return out, draw["ok"]

    def _draw(self, q: Tensor, n: Tensor, valid: Tensor | None) -> dict[str, Tensor]:
        """Which negatives are mixed, and how; the only place the generator is used (fixed draws per call)."""
        with torch.no_grad():  # which negatives are hard is a selection, not something to differentiate
            scores = torch.einsum("nd,nmd->nm", q.detach(), n.detach())
            num, m = scores.shape
            real = torch.ones(num, m, dtype=torch.bool) if valid is None else valid.detach().cpu().bool()
            scores = scores.cpu().masked_fill(~real, float("-inf"))
            if self.mode == "pair":
                top = min(self.top_n or m, m)
                hardest = scores.topk(top, dim=1).indices  # (N, top), hardest real first
                # Two distinct positions among the real top ones: a random order, padding sorted last.
                keys = torch.rand((num, self.k, top), generator=self.generator)
                keys = keys + 2.0 * (~torch.gather(real, 1, hardest)).unsqueeze(1).float()
                perm = keys.argsort(dim=-1)[..., :2]
                idx = torch.gather(hardest.unsqueeze(1).expand(-1, self.k, -1), 2, perm)
                lam = sample_beta(self.alpha, (num, self.k), self.generator)
                ia, ib = idx[..., 0], idx[..., 1]
                va = torch.gather(n.detach().cpu(), 1, ia.unsqueeze(-1).expand(-1, -1, n.size(-1)))
                vb = torch.gather(n.detach().cpu(), 1, ib.unsqueeze(-1).expand(-1, -1, n.size(-1)))
                distinct = (va.float() * vb.float()).sum(-1) < 1.0 - 1e-6  # a repeated negative is no pair
                ok = torch.gather(real, 1, ia) & torch.gather(real, 1, ib) & distinct
                return {"idx_a": ia, "idx_b": ib, "lam": lam, "ok": ok}
            if self.mode == "dirichlet":
                weights = sample_dirichlet(self.alpha, (num, self.k, m), self.generator) * real.unsqueeze(1)
                weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
            else:
                weights = torch.softmax(scores.double() / self.softmax_temperature, dim=-1).unsqueeze(1)
                weights = torch.nan_to_num(weights)
            ok = (real.sum(-1) >= 2).unsqueeze(1).expand(-1, weights.size(1))
            return {"weights": weights, "ok": ok}

    @contextlib.contextmanager
    def shared_draw(self) -> Iterator[None]:
        """Within: one draw, made by the first call, reused by every call (re-entrant)."""
        self._share_depth += 1
        try:
            yield
        finally:
            self._share_depth -= 1
            if self._share_depth == 0:
                self._shared = None

    @property
    def skipped(self) -> int:
        """Synthetic slots of the last draw that could not be made (fewer than two distinct negatives)."""
        ok = self.last_draw.get("ok")
        return int((~ok).sum()) if ok is not None else 0

    # The generator state travels with the loss's state_dict, so resuming replays the same draws.
    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def config(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "alpha": self.alpha,
            "top_n": self.top_n,
            "mode": self.mode,
            "detach": self.detach,
            "softmax_temperature": self.softmax_temperature,
            "seed": self.seed,
        }
