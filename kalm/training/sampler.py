"""Streaming, task-homogeneous batches from Parquet shards, deterministic and resumable.

Every rank builds the same *global* batch sequence from the seed and keeps only its slice, so no
coordination is needed and the order does not depend on the world size's timing. Memory is bounded: each
source keeps one shard in memory at a time (shards hold at most ``shard_rows`` rows, see configs/ingest.yaml).

Per step ``s``:
1. the source (recipe) of the batch is drawn from the mixture weights with ``rng(seed, s)``;
2. ``round(G * homogeneous)`` rows come from that source, the rest from sources drawn by weight
   (semi-homogeneous batches), ``G = per_device * world``;
3. each row gets ``group_size - 1`` distinct negatives sampled from its ``neg`` list; a row with fewer gets
   padding slots (empty texts the loss masks out), never a repeat and never another row's positive (a
   borrowed positive is an exact copy of that row's positive: a false negative the loss cannot beat).

Every rank sees the whole global batch, so each batch also says who every candidate is (text keys, class
labels, padding, in-batch scope: :class:`~kalm.training.losses.candidates.Candidates`) for the whole batch,
and the loss can mask our own false negatives without any communication.

The sampler's whole state is a small dict (per-source cursor + step), saved in every checkpoint.

Example::

    src = [ShardSource("faq", ["/d/part-00000.parquet"], rows=120, weight=1.0)]
    sampler = HomogeneousSampler(src, per_device=4, world=2, rank=0, group_size=3, seed=0)
    batch = sampler.next_batch()   # Batch(queries=[4], docs=[4 x 3], ...)
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from kalm.core.errors import KalmError
from kalm.training.losses.candidates import NO_LABEL, PAD, SCOPES, Candidates, text_key

log = logging.getLogger(__name__)
COLUMNS = [
    "id",
    "query",
    "pos",
    "neg",
    "instruction",
    "symmetric",
    "category",
    "recipe",
    "label",
    "neg_labels",
]
PAD_TEXT = ""  # what a padding slot encodes (masked out of every denominator)


@dataclass(frozen=True)
class ShardSource:
    """One recipe's shards (paths a pyarrow filesystem can open) with its mixture weight."""

    name: str
    files: list[str]
    rows: int
    weight: float
    filesystem: Any = None
    scope: str = (
        "batch"  # in-batch scope of its queries: batch | own | none (see kalm.training.losses.candidates)
    )
    sha256: list[str] | None = None  # per file, from the manifest (a prefix is enough): verified on load


@dataclass
class Batch:
    """A rank's slice of one global batch. ``docs[i]`` = [positive, negative_1, ..., negative_M]."""

    queries: list[str]
    docs: list[list[str]]
    instructions: list[str]
    symmetric: list[bool]
    sources: list[str]
    step: int
    candidates: Any = None  # kalm.training.losses.candidates.Candidates of the global batch
    offset: int = 0  # this rank's first row in the global batch

    @property
    def size(self) -> int:
        return len(self.queries)


@dataclass
class _Cursor:
    """Position in one source: epoch, index into the epoch's shard order, row offset in that shard."""

    epoch: int = 0
    shard: int = 0
    offset: int = 0
    table: list[dict[str, Any]] | None = field(default=None, repr=False)
    order: np.ndarray | None = field(default=None, repr=False)


class HomogeneousSampler:
    """Deterministic global-batch sampler over weighted sources; see the module docstring."""

    def __init__(
        self,
        sources: list[ShardSource],
        per_device: int,
        world: int,
        rank: int,
        group_size: int,
        seed: int,
        homogeneous: float = 1.0,
    ) -> None:
        if not sources:
            raise ValueError("no data sources")
        if not 0.0 <= homogeneous <= 1.0:
            raise ValueError("homogeneous must be within [0, 1]")
        self.sources = sources
        self.per_device, self.world, self.rank = per_device, world, rank
        self.group_size, self.seed, self.homogeneous = group_size, seed, homogeneous
        w = np.array([s.weight for s in sources], dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("mixture weights must be >= 0 with a positive sum")
        self.probs = w / w.sum()
        self.step = 0
        self.cursors = [_Cursor() for _ in sources]
        self.rows_without_negatives = 0

    @property
    def global_batch(self) -> int:
        return self.per_device * self.world

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "cursors": [[c.epoch, c.shard, c.offset] for c in self.cursors],
            "seed": self.seed,
            "sources": [s.name for s in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sources"] != [s.name for s in self.sources] or state["seed"] != self.seed:
            raise ValueError("checkpoint was written for other data sources or another seed")
        self.step = int(state["step"])
        self.cursors = [_Cursor(epoch=e, shard=s, offset=o) for e, s, o in state["cursors"]]

    # -- reading -----------------------------------------------------------------------------------
    def _shard_order(self, src: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, src, epoch, 1])
        return rng.permutation(len(self.sources[src].files))

    def _load(self, src: int) -> None:
        c, s = self.cursors[src], self.sources[src]
        k = int(self._shard_order(src, c.epoch)[c.shard])
        path = s.files[k]
        if s.sha256 is None or not s.sha256[k]:
            table = pq.read_table(path, columns=COLUMNS, filesystem=s.filesystem)
        else:
            fs = s.filesystem or pafs.LocalFileSystem()
            with fs.open_input_stream(path) as f:
                data = f.read()
            if not hashlib.sha256(data).hexdigest().startswith(s.sha256[k]):
                raise KalmError(f"training shard {path} changed after it was written: rerun the data stage")
            table = pq.read_table(pa.BufferReader(data), columns=COLUMNS)
        c.table = table.to_pylist()
        c.order = np.random.default_rng([self.seed, src, c.epoch, c.shard, 2]).permutation(len(c.table))

    def _take(self, src: int, n: int) -> list[dict[str, Any]]:
        """Next ``n`` rows of a source, wrapping into a new (reshuffled) epoch at the end."""
        out: list[dict[str, Any]] = []
        c = self.cursors[src]
        guard = 0
        while len(out) < n:
            if c.table is None:
                self._load(src)
            assert c.table is not None and c.order is not None
            if c.offset >= len(c.table):
                c.shard, c.offset, c.table = c.shard + 1, 0, None
                if c.shard >= len(self.sources[src].files):
                    c.epoch, c.shard = c.epoch + 1, 0
                guard += 1
                if guard > 2 * len(self.sources[src].files) + 2 and not out:
                    raise ValueError(f"source {self.sources[src].name!r} has no rows")
                continue
            take = min(n - len(out), len(c.table) - c.offset)
            out += [c.table[i] for i in c.order[c.offset : c.offset + take]]
            c.offset += take
        return out

    # -- batches -----------------------------------------------------------------------------------
    def plan(self, step: int) -> list[tuple[int, int]]:
        """(source index, rows) pairs that make up global batch ``step``; pure function of the seed."""
        rng = np.random.default_rng([self.seed, step, 3])
        main = int(rng.choice(len(self.sources), p=self.probs))
        n_main = round(self.global_batch * self.homogeneous)
        counts = np.zeros(len(self.sources), dtype=np.int64)
        counts[main] = n_main
        if self.global_batch - n_main:
            counts += rng.multinomial(self.global_batch - n_main, self.probs)
        return [(i, int(k)) for i, k in enumerate(counts) if k]

    def next_batch(self) -> Batch:
        rows: list[tuple[dict[str, Any], int]] = []
        for src, n in self.plan(self.step):
            rows += [(r, src) for r in self._take(src, n)]
        # Every row's positive and negatives are chosen on every rank (seeded per row), so each rank knows
        # the whole batch's candidates; the rank then keeps a contiguous slice.
        m = self.group_size - 1
        groups = [self._group(r, m) for r, _ in rows]
        start, stop = self.rank * self.per_device, (self.rank + 1) * self.per_device
        mine = [r for r, _ in rows[start:stop]]
        self.rows_without_negatives += sum(
            1 for g in groups[start:stop] if m and not any(k != PAD for k in g[2])
        )
        batch = Batch(
            queries=[r["query"] for r in mine],
            docs=[[pos, *negs] for pos, negs, _, _ in groups[start:stop]],
            instructions=[r["instruction"] for r in mine],
            symmetric=[bool(r["symmetric"]) for r in mine],
            sources=[r["recipe"] for r in mine],
            step=self.step,
            candidates=self._candidates(rows, groups, m),
            offset=start,
        )
        self.step += 1
        return batch

    def _group(self, r: dict[str, Any], m: int) -> tuple[str, list[str], list[int], list[str]]:
        """(positive, m negative texts, their keys (PAD for padding), their labels) of one row.

        The negatives are a seeded sample of the row's distinct negatives (by normalised text); slots it
        cannot fill are padding, not repeats."""
        pick = np.random.default_rng([self.seed, self.step, int(r["id"][:8], 16), 4])
        pos = r["pos"][int(pick.integers(len(r["pos"])))]
        negs = list(r["neg"] or [])
        labs = list(r.get("neg_labels") or [])
        labs = labs if len(labs) == len(negs) else [""] * len(negs)
        texts: list[str] = []
        keys: list[int] = []
        labels: list[str] = []
        if m and negs:
            rng = np.random.default_rng([self.seed, self.step, int(r["id"][:8], 16), 5])
            for i in rng.permutation(len(negs)):
                key = text_key(negs[int(i)])
                if key in keys:
                    continue
                texts.append(negs[int(i)])
                keys.append(key)
                labels.append(labs[int(i)])
                if len(texts) == m:
                    break
        pad = m - len(texts)
        return pos, texts + [PAD_TEXT] * pad, keys + [PAD] * pad, labels + [""] * pad

    def _candidates(self, rows: list[tuple[dict[str, Any], int]], groups: list[Any], m: int) -> Candidates:
        """Who every candidate of the global batch is: positive and negative text keys, class ids, scopes."""
        names = sorted(
            ({r.get("label") or "" for r, _ in rows} | {lab for g in groups for lab in g[3]}) - {""}
        )
        ids = {name: i for i, name in enumerate(names)}

        def lab(name: str | None) -> int:
            return ids.get(name or "", NO_LABEL)

        return Candidates(
            pos_key=torch.tensor([text_key(g[0]) for g in groups], dtype=torch.int64),
            pos_label=torch.tensor([lab(r.get("label")) for r, _ in rows], dtype=torch.int64),
            neg_key=torch.tensor([g[2] for g in groups], dtype=torch.int64).reshape(len(rows), m)
            if m
            else None,
            neg_label=torch.tensor([[lab(x) for x in g[3]] for g in groups], dtype=torch.int64).reshape(
                len(rows), m
            )
            if m
            else None,
            scope=torch.tensor([SCOPES[self.sources[src].scope] for _, src in rows], dtype=torch.int64),
        )
