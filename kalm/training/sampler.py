"""Streaming, task-homogeneous batches from Parquet shards: deterministic, resumable, bounded memory.

Every rank builds the same *global* batch sequence from the seed and keeps only its slice, so no
coordination is needed and the order does not depend on the world size's timing.

Memory is bounded by the buffer, not by the data: a source is read in *blocks* (one Parquet row group; the
data stage writes row groups of ``ROW_GROUP_ROWS`` rows, a bigger one is cut into sub-blocks), each epoch
visits its blocks in a seeded order, ``window`` consecutive blocks are shuffled together, and the sampler
keeps only the windows of the sources it drew last, up to ``buffer_mb`` of Arrow data (least recently used
first out; an evicted window is re-read if its source comes back). 120 sources cost what 4 do.

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

Mixture weights (:func:`mixture`): a source's weight is ``rows ** alpha`` (alpha 1: by size, 0: uniform,
between: temperature sampling) unless the config names one; sources under ``min_rows`` are merged per task
type and in-batch scope (FlagEmbedding's ``small_threshold``) and what is still under ``drop_rows`` is left
out (its ``drop_threshold``), each logged.

The sampler's whole state is a small dict (per-source cursor + step), saved in every checkpoint.

Example::

    src = [ShardSource("faq", ["/d/part-00000.parquet"], rows=120, weight=1.0)]
    sampler = HomogeneousSampler(src, per_device=4, world=2, rank=0, group_size=3, seed=0)
    batch = sampler.next_batch()   # Batch(queries=[4], docs=[4 x 3], ...)
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from kalm.core.errors import KalmError
from kalm.core.schema import SCORE_COLUMNS
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
# one row's (positive, negatives, their keys, their labels, teacher scores of [positive, *negatives])
_Group = tuple[str, list[str], list[int], list[str], list[float]]


def _aligned(scores: list[float] | None, n: int) -> list[float]:
    """A row's teacher scores for its n texts (NaN where missing: an unscored shard, a short list)."""
    out = [float("nan") if x is None else float(x) for x in (scores or [])]
    return out if len(out) == n else [float("nan")] * n


STATE_FORMAT = 2  # 1: whole shards in memory (cursor = epoch, shard, offset); 2: block windows


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
    task_type: str = ""
    members: tuple[str, ...] = ()  # the recipes a merged source holds


def mixture(
    sources: list[ShardSource],
    alpha: float = 1.0,
    min_rows: int = 0,
    drop_rows: int = 0,
    explicit: frozenset[str] = frozenset(),
) -> tuple[list[ShardSource], dict[str, Any]]:
    """Weighted sources after the small-source rule, and a report of what was merged and dropped.

    ``explicit``: names whose configured weight is kept as is (never merged, never re-weighted); every
    other source weighs ``rows ** alpha``. Sources under ``min_rows`` rows are merged into one
    ``merged:<task_type>:<scope>`` source per task type and in-batch scope, so batches stay homogeneous
    in task; a source (merged or not) still under ``drop_rows`` is left out."""
    keep: list[ShardSource] = []
    small: dict[tuple[str, str], list[ShardSource]] = {}
    for s in sources:
        if s.name not in explicit and s.rows < min_rows:
            small.setdefault((s.task_type, s.scope), []).append(s)
        else:
            keep.append(s)
    merged: dict[str, list[str]] = {}
    for (task, scope), group in sorted(small.items()):
        if len(group) == 1:
            keep.append(group[0])
            continue
        name = f"merged:{task or 'any'}:{scope}"
        merged[name] = [s.name for s in group]
        keep.append(
            ShardSource(
                name,
                [f for s in group for f in s.files],
                sum(s.rows for s in group),
                0.0,
                group[0].filesystem,
                scope,
                [h for s in group for h in (s.sha256 or [""] * len(s.files))],
                task,
                tuple(s.name for s in group),
            )
        )
    dropped = {s.name: s.rows for s in keep if s.name not in explicit and s.rows < drop_rows}
    out = [
        s if s.name in explicit else replace(s, weight=float(s.rows) ** alpha)
        for s in keep
        if s.name not in dropped
    ]
    for name, members in merged.items():
        log.info("sampler: merged %d small sources into %s: %s", len(members), name, ", ".join(members))
    for name, rows in dropped.items():
        log.warning("sampler: left out %s (%d rows < data.drop_rows %d)", name, rows, drop_rows)
    return out, {"alpha": alpha, "merged": merged, "dropped": dropped}


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


@dataclass(frozen=True)
class _Block:
    """Rows ``[start, start + rows)`` of row group ``group`` of file ``file`` (sub-block ``part``)."""

    file: int
    group: int
    part: int
    rows: int


@dataclass
class _Cursor:
    """Position in one source: epoch, window of the epoch's block order, row offset in that window."""

    epoch: int = 0
    window: int = 0
    offset: int = 0


@dataclass
class _Window:
    table: pa.Table  # the window's rows, in their shuffled order
    nbytes: int


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
        window: int = 4,
        buffer_mb: float = 64.0,
        block_rows: int = 1024,
    ) -> None:
        if not sources:
            raise ValueError("no data sources")
        if not 0.0 <= homogeneous <= 1.0:
            raise ValueError("homogeneous must be within [0, 1]")
        if window < 1 or block_rows < 1 or buffer_mb <= 0:
            raise ValueError("window and block_rows must be >= 1 and buffer_mb > 0")
        self.sources = sources
        self.per_device, self.world, self.rank = per_device, world, rank
        self.group_size, self.seed, self.homogeneous = group_size, seed, homogeneous
        self.window, self.buffer_bytes, self.block_rows = window, int(buffer_mb * 2**20), block_rows
        w = np.array([s.weight for s in sources], dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("mixture weights must be >= 0 with a positive sum")
        self.probs = w / w.sum()
        self.step = 0
        self.cursors = [_Cursor() for _ in sources]
        self.rows_without_negatives = 0
        self._blocks: dict[int, list[_Block]] = {}  # per source, built on first use (file footers)
        self._meta: dict[tuple[int, int], pq.FileMetaData] = {}
        self._verified: set[tuple[int, int]] = set()
        self._windows: OrderedDict[int, tuple[int, int, _Window]] = OrderedDict()  # LRU by source
        self.reads = 0  # windows read (re-reads of evicted ones included)
        self.peak_buffer_bytes = 0

    @property
    def global_batch(self) -> int:
        return self.per_device * self.world

    @property
    def buffer_bytes_used(self) -> int:
        return sum(w.nbytes for _, _, w in self._windows.values())

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "cursors": [[c.epoch, c.window, c.offset] for c in self.cursors],
            "seed": self.seed,
            "sources": [s.name for s in self.sources],
            "window": self.window,
            "block_rows": self.block_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise KalmError(
                "checkpoint was written by an older sampler (whole-shard order): finish or restart that "
                "run with the version that wrote it, or train again from step 0 (--overwrite)"
            )
        if state["sources"] != [s.name for s in self.sources] or state["seed"] != self.seed:
            raise ValueError("checkpoint was written for other data sources or another seed")
        if (state["window"], state["block_rows"]) != (self.window, self.block_rows):
            raise ValueError("checkpoint was written with another data.shuffle_window or block size")
        self.step = int(state["step"])
        self.cursors = [_Cursor(epoch=e, window=w, offset=o) for e, w, o in state["cursors"]]
        self._windows.clear()

    # -- reading -----------------------------------------------------------------------------------
    def _fs(self, src: int) -> Any:
        return self.sources[src].filesystem or pafs.LocalFileSystem()

    def _verify(self, src: int, k: int) -> None:
        """Check a file against the manifest's sha256 once, streaming (memory: one read buffer)."""
        s = self.sources[src]
        if (src, k) in self._verified or s.sha256 is None or not s.sha256[k]:
            return
        h = hashlib.sha256()
        with self._fs(src).open_input_stream(s.files[k]) as f:
            while block := f.read(1 << 20):
                h.update(block)
        if not h.hexdigest().startswith(s.sha256[k]):
            raise KalmError(f"training shard {s.files[k]} changed after it was written: rerun the data stage")
        self._verified.add((src, k))

    def _file(self, src: int, k: int) -> pq.ParquetFile:
        self._verify(src, k)
        f = self._fs(src).open_input_file(self.sources[src].files[k])
        pf = pq.ParquetFile(f, metadata=self._meta.get((src, k)))
        self._meta[(src, k)] = pf.metadata
        return pf

    def blocks(self, src: int) -> list[_Block]:
        if src not in self._blocks:
            out: list[_Block] = []
            for k in range(len(self.sources[src].files)):
                md = self._file(src, k).metadata
                for g in range(md.num_row_groups):
                    n = md.row_group(g).num_rows
                    # a row group far bigger than a block (shards of an older data stage): sub-blocks
                    parts = 1 if n <= 2 * self.block_rows else -(-n // self.block_rows)
                    for p in range(parts):
                        rows = n if parts == 1 else min(self.block_rows, n - p * self.block_rows)
                        if rows:
                            out.append(_Block(k, g, p if parts > 1 else -1, rows))
            if not out:
                raise ValueError(f"source {self.sources[src].name!r} has no rows")
            self._blocks[src] = out
        return self._blocks[src]

    def _windows_per_epoch(self, src: int) -> int:
        return -(-len(self.blocks(src)) // self.window)

    def _read_block(self, src: int, b: _Block) -> pa.Table:
        pf = self._file(src, b.file)
        cols = COLUMNS + [c for c in SCORE_COLUMNS if c in pf.schema_arrow.names]  # scored shards
        if b.part < 0:
            return pf.read_row_group(b.group, columns=cols)
        for i, batch in enumerate(pf.iter_batches(self.block_rows, row_groups=[b.group], columns=cols)):
            if i == b.part:
                return pa.Table.from_batches([batch])
        raise KalmError(f"training shard {self.sources[src].files[b.file]} is shorter than its footer says")

    def _load(self, src: int, c: _Cursor) -> _Window:
        """The rows of window ``c.window`` of epoch ``c.epoch``, shuffled; the LRU buffer evicts others."""
        key = self._windows.get(src)
        if key is not None and key[:2] == (c.epoch, c.window):
            self._windows.move_to_end(src)
            return key[2]
        blocks = self.blocks(src)
        order = np.random.default_rng([self.seed, src, c.epoch, 1]).permutation(len(blocks))
        chosen = order[c.window * self.window : (c.window + 1) * self.window]
        table = pa.concat_tables([self._read_block(src, blocks[int(i)]) for i in chosen])
        perm = np.random.default_rng([self.seed, src, c.epoch, c.window, 2]).permutation(table.num_rows)
        table = table.take(pa.array(perm)).combine_chunks()
        win = _Window(table, table.nbytes)
        self._windows.pop(src, None)
        self._windows[src] = (c.epoch, c.window, win)
        self.reads += 1
        while self.buffer_bytes_used > self.buffer_bytes and len(self._windows) > 1:
            self._windows.popitem(last=False)
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self.buffer_bytes_used)
        return win

    def _take(self, src: int, n: int) -> list[dict[str, Any]]:
        """Next ``n`` rows of a source, wrapping into a new (reshuffled) epoch at the end."""
        out: list[dict[str, Any]] = []
        c = self.cursors[src]
        while len(out) < n:
            win = self._load(src, c)
            if c.offset >= win.table.num_rows:
                c.window, c.offset = c.window + 1, 0
                if c.window >= self._windows_per_epoch(src):
                    c.epoch, c.window = c.epoch + 1, 0
                continue
            take = min(n - len(out), win.table.num_rows - c.offset)
            out += win.table.slice(c.offset, take).to_pylist()
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
            docs=[[g[0], *g[1]] for g in groups[start:stop]],
            instructions=[r["instruction"] for r in mine],
            symmetric=[bool(r["symmetric"]) for r in mine],
            sources=[r["recipe"] for r in mine],
            step=self.step,
            candidates=self._candidates(rows, groups, m),
            offset=start,
        )
        self.step += 1
        return batch

    def _group(self, r: dict[str, Any], m: int) -> _Group:
        """(positive, m negative texts, their keys (PAD for padding), their labels, teacher scores of the
        positive and the m negatives (NaN: none)) of one row.

        The negatives are a seeded sample of the row's distinct negatives (by normalised text); slots it
        cannot fill are padding, not repeats."""
        pick = np.random.default_rng([self.seed, self.step, int(r["id"][:8], 16), 4])
        at = int(pick.integers(len(r["pos"])))
        pos = r["pos"][at]
        negs = list(r["neg"] or [])
        labs = list(r.get("neg_labels") or [])
        labs = labs if len(labs) == len(negs) else [""] * len(negs)
        p_sc, n_sc = _aligned(r.get("pos_scores"), len(r["pos"])), _aligned(r.get("neg_scores"), len(negs))
        texts: list[str] = []
        keys: list[int] = []
        labels: list[str] = []
        scores = [p_sc[at]]
        if m and negs:
            rng = np.random.default_rng([self.seed, self.step, int(r["id"][:8], 16), 5])
            for i in rng.permutation(len(negs)):
                key = text_key(negs[int(i)])
                if key in keys:
                    continue
                texts.append(negs[int(i)])
                keys.append(key)
                labels.append(labs[int(i)])
                scores.append(n_sc[int(i)])
                if len(texts) == m:
                    break
        pad = m - len(texts)
        nan = float("nan")
        return pos, texts + [PAD_TEXT] * pad, keys + [PAD] * pad, labels + [""] * pad, scores + [nan] * pad

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
            teacher=torch.tensor([g[4] for g in groups], dtype=torch.float32)
            if any(r.get("pos_scores") is not None for r, _ in rows)
            else None,
        )
