"""Cross-device negatives: 2 gloo processes give the single-process loss and gradients of the whole batch.

Each rank holds half the batch and a copy of a tiny linear "encoder". After backward, the encoder's gradient
is averaged across ranks as DDP does; it must equal the gradient of the single-process loss on the
concatenated batch, and the average of the per-rank losses must equal that loss.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from kalm.training.losses import FocalInfoNCE, InfoNCE, build_loss

WORLD = 2
D_IN, D, M = 12, 16, 2

# name -> (loss builder kwargs, rows per rank)
SCENARIOS: dict[str, tuple[dict[str, Any], tuple[int, int]]] = {
    "batch_negatives": ({"kind": "infonce", "hard_negatives": "batch"}, (3, 3)),
    "own_negatives": ({"kind": "infonce", "hard_negatives": "own"}, (3, 3)),
    "in_batch_only": ({"kind": "infonce", "hard_negatives": "none"}, (3, 3)),
    "focal": ({"kind": "focal"}, (3, 3)),
    "finetune_stack": ({"kind": "build", "mix_k": 0, "matryoshka_dims": [16, 8]}, (3, 3)),
    "unequal_rows": ({"kind": "infonce", "hard_negatives": "batch"}, (4, 2)),
    # the KL term reads each rank's teacher rows at its offset in the global batch
    "distill": ({"kind": "build", "mix_k": 0, "matryoshka_dims": [16, 8], "distill_alpha": 0.7}, (3, 3)),
}


def make_loss(spec: dict[str, Any]) -> torch.nn.Module:
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "infonce":
        return InfoNCE(temperature=0.05, **spec)
    if kind == "focal":
        return FocalInfoNCE(InfoNCE(temperature=0.05), gamma=0.5)
    return build_loss({"temperature": 0.05, **spec})


def global_batch(rows: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randn(rows, D_IN, generator=g)
    x_p = x_q + 0.5 * torch.randn(rows, D_IN, generator=g)
    x_n = x_q.unsqueeze(1) + 0.9 * torch.randn(rows, M, D_IN, generator=g)
    weight = torch.randn(D, D_IN, generator=g)
    return x_q, x_p, x_n, weight


def run_loss(spec: dict[str, Any], rows: slice, total: int, reduce_sum: bool) -> dict[str, torch.Tensor]:
    """Encode rows ``rows`` of the global batch with the shared linear encoder, compute the loss, backward."""
    x_q, x_p, x_n, w0 = global_batch(total)
    weight = w0.clone().requires_grad_()
    q = F.normalize(x_q[rows] @ weight.T, dim=-1)
    p = F.normalize(x_p[rows] @ weight.T, dim=-1)
    n = F.normalize(x_n[rows] @ weight.T, dim=-1)
    for t in (q, p, n):
        t.retain_grad()
    loss_fn = make_loss(spec)
    cands = None
    if spec.get("distill_alpha"):  # who every candidate of the global batch is, with teacher scores
        from kalm.training.losses.candidates import Candidates

        g = torch.Generator().manual_seed(7)
        cands = Candidates(
            pos_key=torch.arange(total),
            pos_label=torch.full((total,), -1),
            neg_key=torch.arange(total * M).view(total, M) + 1000,
            neg_label=torch.full((total, M), -1),
            teacher=torch.rand(total, 1 + M, generator=g),
        )
    if reduce_sum:  # unequal rows per rank: compare the sum of per-query losses, which has no 1/N_r
        core = loss_fn if isinstance(loss_fn, InfoNCE) else None
        assert core is not None
        value = core.per_query(q, p, n).sum()
    else:
        value = loss_fn(q, p, n, cands)
    value.backward()

    def grad(t: torch.Tensor) -> torch.Tensor:  # negatives unused in the in-batch-only loss: no grad
        return t.grad.clone() if t.grad is not None else torch.zeros_like(t)

    return {
        "loss": value.detach(),
        "weight_grad": grad(weight),
        "q_grad": grad(q),
        "p_grad": grad(p),
        "n_grad": grad(n),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, (spec, sizes) in SCENARIOS.items():
            start = sum(sizes[:rank])
            out = run_loss(
                spec, slice(start, start + sizes[rank]), sum(sizes), reduce_sum=sizes[0] != sizes[1]
            )
            # What DDP does to parameter gradients: all-reduce, then divide by the world size (sum mode: no).
            grad = out["weight_grad"]
            dist.all_reduce(grad)
            if sizes[0] == sizes[1]:
                grad /= WORLD
            results[name] = out
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, torch.Tensor]]]:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_equal_one_process(ranks: list[dict[str, dict[str, torch.Tensor]]], name: str) -> None:
    spec, sizes = SCENARIOS[name]
    total = sum(sizes)
    equal = sizes[0] == sizes[1]
    ref = run_loss(spec, slice(0, total), total, reduce_sum=not equal)
    per_rank = [r[name] for r in ranks]

    # Loss: mean of per-rank means == global mean (equal rows); sum of sums == global sum (unequal rows).
    combined = sum(r["loss"] for r in per_rank)
    if equal:
        combined = combined / WORLD
    torch.testing.assert_close(combined, ref["loss"], rtol=1e-5, atol=1e-6)

    # Encoder gradient after DDP-style averaging == single-process gradient.
    for r in per_rank:
        torch.testing.assert_close(r["weight_grad"], ref["weight_grad"], rtol=1e-5, atol=1e-6)

    # Embedding gradients: rank r's local grads are (world x) the global grads of its rows, i.e. the
    # gather's backward delivered the other rank's contributions to this rank's positives/negatives.
    scale = WORLD if equal else 1
    for rank, r in enumerate(per_rank):
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        for key in ("q_grad", "p_grad", "n_grad"):
            torch.testing.assert_close(r[key], scale * ref[key][rows], rtol=1e-5, atol=1e-6, msg=key)


def test_single_process_gather_is_identity() -> None:
    from kalm.training.losses import gather_rows, world

    assert world() == (0, 1)
    x = torch.randn(3, 4)
    out, offset = gather_rows(x)
    assert out is x and offset == 0
