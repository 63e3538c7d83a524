"""GradCache: the full-batch loss and gradients with activation memory bounded by one chunk.

Gao et al. 2021, as in sentence-transformers' ``CachedMultipleNegativesRankingLoss``:

1. embed every input in chunks without grad, remembering the RNG state before each chunk;
2. compute the loss on the cached embeddings (leaf tensors with requires_grad) and backprop to them;
3. re-embed each chunk with grad under its remembered RNG state (same dropout masks) and backprop
   ``<embedding, cached gradient>``, which accumulates exactly the full-batch parameter gradients.

Any embedding loss works (InfoNCE, focal, Matryoshka, with cross-device gathering), since step 2 is a plain
call. The model runs twice per chunk (about +1 forward per step).

>>> cache = GradCache(build_loss({}), chunk_size=16)
>>> loss = cache.step(embedder, query=emb.tokenize(qs), pos=emb.tokenize(ps), neg=emb.tokenize(ns))
>>> optimizer.step()           # gradients are already in the parameters; loss is detached
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import get_device_states, set_device_states

from kalm.training.losses.base import EmbeddingLoss
from kalm.training.losses.candidates import Candidates

EmbedFn = Callable[..., Tensor]  # (input_ids=(B, T), attention_mask=(B, T)) -> (B, D)


class RandContext:
    """Captures the CPU and accelerator RNG states; ``with ctx:`` replays them, then restores the outer."""

    def __init__(self, *tensors: Tensor) -> None:
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)
        self._fork: contextlib.AbstractContextManager[Any] | None = None

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        set_device_states(self.devices, self.device_states)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._fork is not None
        self._fork.__exit__(exc_type, exc, tb)
        self._fork = None


def _chunks(features: dict[str, Tensor], size: int) -> Iterator[dict[str, Tensor]]:
    rows = next(iter(features.values())).size(0)
    for start in range(0, rows, size):
        yield {k: v[start : start + size] for k, v in features.items()}


class GradCache(EmbeddingLoss):
    """Wraps an embedding loss ``loss(q (N, D), p (N, D), n (N, M, D) | None) -> scalar``.

    Args:
        loss: the loss to compute (its columns are the inputs of :meth:`step`).
        chunk_size: rows per forward pass; memory is that of one chunk's activations.
    """

    def __init__(self, loss: EmbeddingLoss, chunk_size: int = 32) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.loss = loss
        self.chunk_size = int(chunk_size)
        # the cached embeddings of the last step (for metrics)
        self.last: tuple[Tensor, Tensor, Tensor | None] | None = None

    def _embed_no_grad(self, model: EmbedFn, features: dict[str, Tensor]) -> tuple[Tensor, list[RandContext]]:
        states: list[RandContext] = []
        parts: list[Tensor] = []
        with torch.no_grad():
            for chunk in _chunks(features, self.chunk_size):
                states.append(RandContext(*chunk.values()))
                parts.append(model(**chunk))
        return torch.cat(parts).detach().requires_grad_(), states

    def step(
        self,
        model: EmbedFn,
        query: dict[str, Tensor],
        pos: dict[str, Tensor],
        neg: dict[str, Tensor] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        backward: Callable[[Tensor], Any] | None = None,
        candidates: Candidates | None = None,
    ) -> Tensor:
        """Forward + backward of one batch; returns the loss (detached). Gradients land in the parameters.

        Args:
            model: ``model(input_ids=..., attention_mask=...) -> (B, D)`` unit vectors (an ``Embedder``).
            query, pos: tokenized features, (N, T) tensors each.
            neg: tokenized hard negatives, (N·M, T), query-major (query i's negatives are rows i·M..i·M+M-1).
            no_sync: e.g. ``ddp_model.no_sync``; wraps every chunk backward but the last, so DDP all-reduces
                gradients once per step.
            backward: runs each chunk's backward (default ``t.backward()``); a DeepSpeed job passes one that
                calls ``engine.backward`` then ``engine.step`` (one gradient-accumulation micro-step per
                chunk, see :func:`backward_passes`).
            candidates: who each candidate is (the loss masks what is not a negative).
        """
        groups = {"query": query, "pos": pos}
        if neg is not None:
            groups["neg"] = neg
        cached: dict[str, Tensor] = {}
        states: dict[str, list[RandContext]] = {}
        for name, features in groups.items():
            cached[name], states[name] = self._embed_no_grad(model, features)

        q, p = cached["query"], cached["pos"]
        n = None
        if "neg" in cached:
            if cached["neg"].size(0) % q.size(0):
                rows = cached["neg"].size(0)
                raise ValueError(f"neg rows ({rows}) are not a multiple of the queries ({q.size(0)})")
            n = cached["neg"].view(q.size(0), -1, q.size(-1))
        loss = self.loss(q, p, n, candidates)
        loss.backward()

        jobs = [
            (chunk, state, grad)
            for name, features in groups.items()
            for chunk, state, grad in zip(
                _chunks(features, self.chunk_size),
                states[name],
                torch.split(_grad_of(cached[name]), self.chunk_size),
                strict=True,
            )
        ]
        for i, (chunk, state, grad) in enumerate(jobs):
            sync = no_sync() if no_sync is not None and i < len(jobs) - 1 else contextlib.nullcontext()
            with sync, state:
                emb = model(**chunk)
                # d/dθ Σ <emb, g> = (∂emb/∂θ)^T g: the chain rule with the cached dL/d(emb).
                surrogate = (emb * grad).sum()
                if backward is None:
                    surrogate.backward()
                else:
                    backward(surrogate)
        self.last = (q.detach(), p.detach(), None if n is None else n.detach())
        return loss.detach()

    def backward_passes(self, rows: int, negatives_per_row: int) -> int:
        """How many chunk backward passes :meth:`step` runs for ``rows`` queries with M negatives each."""
        per = -(-rows // self.chunk_size)
        negs = -(-(rows * negatives_per_row) // self.chunk_size)
        return 2 * per + negs

    @property
    def columns(self) -> tuple[str, ...]:
        return self.loss.columns

    def forward(
        self, q: Tensor, p: Tensor, n: Tensor | None = None, candidates: Candidates | None = None
    ) -> Tensor:
        """The wrapped loss on ready embeddings (no caching): lets a GradCache stand in for its loss."""
        return self.loss(q, p, n, candidates)

    def config(self) -> dict[str, Any]:
        return {"name": "gradcache", "chunk_size": self.chunk_size, "inner": self.loss.config()}


def _grad_of(x: Tensor) -> Tensor:
    # A loss that ignores some embeddings (e.g. negatives with hard_negatives="none") leaves grad None.
    return x.grad if x.grad is not None else torch.zeros_like(x)
