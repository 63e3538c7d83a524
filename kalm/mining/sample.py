"""Choosing hard negatives from ranked candidates: filters that say why, and seeded per-row sampling.

For each query (METHOD.md, KaLM's mining): drop the row when its best positive ranks at or below ``top_k``
(0-based rank >= top_k: ranking consistency); otherwise sample ``M`` negatives uniformly from ranks
``[lo, hi)``, never a positive (of this row or of another row with the same query), never a text equal to a
positive after normalisation (NFC, whitespace collapsed, case-folded), never the query itself, never a text
of the query's own class (labelled classification/clustering rows: ``same_label``), optionally only
candidates scoring a margin below the positive, and never two texts equal after normalisation.

Sampling is deterministic per row: candidate ``j`` of row ``r`` gets the random key
``splitmix64(hash(seed, row id) + j)`` and the ``M`` eligible candidates with the smallest keys win, so a
row's negatives depend on nothing but its own ranking, the seed and its id (not on chunking or row order).

>>> w = effective_window((50, 100), 50, pool_size=40, small_pool="scale")
>>> (w.lo, w.hi, w.top_k, w.scaled)
(20, 40, 20, True)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kalm.data.normalize import normalize_text
from kalm.mining.config import MineConfig

RANK_EDGES = (0, 1, 2, 3, 5, 10, 20, 50, 100)
DROP_REASONS = (
    "empty_query",
    "no_positive",
    "pool_smaller_than_window",
    "positive_below_top_k",
    "too_few_candidates",
)
EXCLUDED = ("positive", "equal_to_positive", "query", "same_label", "margin", "duplicate")


def norm_key(text: str) -> str:
    """The comparison form of a text: ``norm_key(" The  Cat ") == norm_key("the cat")``."""
    return normalize_text(text).casefold()


def rank_bucket(rank: int, depth: int) -> str:
    """Histogram label of a 0-based rank, e.g. ``rank_bucket(7, 100) == "5-9"``; ``depth`` = not retrieved."""
    if rank >= depth:
        return "not_retrieved"
    for lo, hi in zip(RANK_EDGES, RANK_EDGES[1:], strict=False):
        if rank < hi:
            return str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"
    return f"{RANK_EDGES[-1]}+"


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A fast, well-mixed uint64 -> uint64 hash (Steele et al.); wraps modulo 2**64 by design."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_seeds(seed: int, row_ids: Sequence[str]) -> np.ndarray:
    """One uint64 per row from (seed, row id): the row's own random stream."""
    out = np.empty(len(row_ids), dtype=np.uint64)
    for i, rid in enumerate(row_ids):
        digest = hashlib.blake2b(f"{seed}:{rid}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


@dataclass(frozen=True)
class Window:
    """The ranks actually used for one recipe: ``[lo, hi)``, ``top_k``, search ``depth``."""

    lo: int
    hi: int
    top_k: int
    depth: int
    pool_size: int
    scaled: bool

    def lineage(self) -> dict[str, Any]:
        return {
            "window": [self.lo, self.hi],
            "top_k": self.top_k,
            "depth": self.depth,
            "pool_size": self.pool_size,
            "scaled": self.scaled,
        }


def effective_window(window: tuple[int, int], top_k: int, pool_size: int, small_pool: str) -> Window | None:
    """The configured window, or, when the pool has fewer than ``hi`` texts, a scaled one (or None = drop).

    Scaling keeps the window's *relative* position: ranks [50, 100) of a pool of 40 become [20, 40) and
    top-k 50 becomes 20, i.e. negatives from the lower half, positives required in the upper half.
    """
    lo, hi = window
    if pool_size >= hi:
        return Window(lo, hi, top_k, min(pool_size, max(hi, top_k)), pool_size, False)
    if small_pool == "drop":
        return None
    frac = pool_size / hi
    return Window(
        lo=int(lo * frac),
        hi=pool_size,
        top_k=max(1, math.ceil(top_k * frac)),
        depth=pool_size,
        pool_size=pool_size,
        scaled=True,
    )


def new_stats() -> dict[str, Any]:
    return {
        "rows_in": 0,
        "rows_kept": 0,
        "drops": {},
        "short_rows": 0,
        "negatives_total": 0,
        "negatives_per_row": {},
        "positive_rank_hist": {},
        "excluded": {},
        "source_negatives_kept": 0,
        "source_negatives_rejected": 0,
    }


def _order(label: str) -> tuple[int, str]:
    """Histogram labels in numeric order: "0" < "3-4" < "10-19" < "100+" < "not_retrieved"."""
    head = label.split("-")[0].rstrip("+")
    return (int(head), label) if head.isdigit() else (1 << 30, label)


def merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Sum two stats dicts (ints add, nested count dicts add key by key, labels kept in numeric order)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            d = dict(out.get(k) or {})
            for kk, vv in v.items():
                d[kk] = d.get(kk, 0) + vv
            out[k] = dict(sorted(d.items(), key=lambda item: _order(item[0])))
        else:
            out[k] = out.get(k, 0) + v
    return out


def _bump(d: dict[str, int], key: str, n: int = 1) -> None:
    if n:
        d[key] = d.get(key, 0) + n


def _pad(lists: Sequence[Sequence[int]], fill: int) -> np.ndarray:
    width = max((len(x) for x in lists), default=0) or 1
    out = np.full((len(lists), width), fill, dtype=np.int64)
    for i, x in enumerate(lists):
        out[i, : len(x)] = x
    return out


@dataclass
class ChunkCandidates:
    """Search results and per-row facts for ``n`` rows that have a query and a positive.

    ids, scores (n, depth): ranked pool ids (-1 padded) and their scores. ``own_pos``: the row's positives
    (pool ids; their best rank is the ranking-consistency test). ``group_pos``: pool ids of every positive
    of any row with the same normalised query; ``group_pos_keys``: their normalised-text key ids.
    ``query_key``: the key id of the normalised query. ``pos_score``: the lowest score among the row's
    positives (margins are measured from it). ``source_negs`` / ``source_neg_keys``: the row's own negatives.
    ``query_label``: the row's class id (-1: no label); ``source_neg_labels``: its own negatives' class ids.
    """

    ids: np.ndarray
    scores: np.ndarray
    own_pos: list[list[int]]
    group_pos: list[list[int]]
    group_pos_keys: list[list[int]]
    query_key: np.ndarray
    pos_score: np.ndarray
    seeds: np.ndarray
    source_negs: list[list[str]]
    source_neg_keys: list[list[int]]
    query_label: np.ndarray | None = None
    source_neg_labels: list[list[int]] | None = None


def sample_negatives(
    cand: ChunkCandidates,
    pool_keys: np.ndarray,
    window: Window,
    cfg: MineConfig,
    pool_labels: np.ndarray | None = None,
) -> tuple[list[list[int] | None], dict[str, Any]]:
    """Negatives per row as pool ids, or ``-(j + 1)`` for the row's own source negative ``j`` (None =
    dropped), and the chunk's stats (drops, exclusions, rank histogram). ``pool_labels`` (P,): each pool
    text's class id (-1 unknown); with the rows' ``query_label`` no negative of the query's class is taken."""
    stats = new_stats()
    ids, scores = cand.ids, cand.scores
    n, k = ids.shape
    stats["rows_in"] = n
    out: list[list[int] | None] = [None] * n
    if n == 0:
        return out, stats
    valid = ids >= 0
    keyid = np.where(valid, pool_keys[np.maximum(ids, 0)], -1)
    rank = np.arange(k)

    own = _pad(cand.own_pos, -2)
    own_hit = (ids[:, :, None] == own[:, None, :]).any(-1) & valid
    best_rank = np.where(own_hit.any(1), own_hit.argmax(1), window.depth)

    group = _pad(cand.group_pos, -2)
    is_pos = (ids[:, :, None] == group[:, None, :]).any(-1) & valid
    gkeys = _pad(cand.group_pos_keys, -2)
    eq_pos = (keyid[:, :, None] == gkeys[:, None, :]).any(-1) & valid & ~is_pos
    eq_query = (keyid == cand.query_key[:, None]) & valid & ~is_pos & ~eq_pos
    same_label = np.zeros_like(valid)
    if pool_labels is not None and cand.query_label is not None:
        lab = np.where(valid, pool_labels[np.maximum(ids, 0)], -1)
        qlab = cand.query_label[:, None]
        same_label = (lab == qlab) & (qlab >= 0) & valid & ~is_pos & ~eq_pos & ~eq_query
    excluded = is_pos | eq_pos | eq_query | same_label

    margin_ok = np.ones_like(valid)
    if cfg.margin.absolute is not None:
        margin_ok &= scores <= (cand.pos_score - cfg.margin.absolute)[:, None]
    if cfg.margin.relative is not None:
        margin_ok &= scores <= (cand.pos_score - np.abs(cand.pos_score) * cfg.margin.relative)[:, None]

    in_win = valid & (rank >= window.lo)[None, :] & (rank < window.hi)[None, :]
    consistent = best_rank < window.top_k
    live = in_win & consistent[:, None]  # exclusions are counted for rows that get negatives only
    ex = stats["excluded"]
    _bump(ex, "positive", int((live & is_pos).sum()))
    _bump(ex, "equal_to_positive", int((live & eq_pos).sum()))
    _bump(ex, "query", int((live & eq_query).sum()))
    _bump(ex, "same_label", int((live & same_label).sum()))
    _bump(ex, "margin", int((live & ~excluded & ~margin_ok).sum()))
    eligible = live & ~excluded & margin_ok
    rkeys = splitmix64(cand.seeds[:, None] + rank[None, :].astype(np.uint64))

    m = cfg.num_negatives
    for r in range(n):
        _bump(stats["positive_rank_hist"], rank_bucket(int(best_rank[r]), window.depth))
        if not consistent[r]:
            _bump(stats["drops"], "positive_below_top_k")
            continue
        banned = set(cand.group_pos_keys[r]) | {int(cand.query_key[r])}
        qlab_r = int(cand.query_label[r]) if cand.query_label is not None else -1
        chosen: set[int] = set()
        negs: list[int] = []
        if cfg.keep_source_negatives:
            labs = cand.source_neg_labels[r] if cand.source_neg_labels is not None else []
            for j, key in enumerate(cand.source_neg_keys[r]):
                if len(negs) == m:
                    break
                same = qlab_r >= 0 and j < len(labs) and labs[j] == qlab_r
                if key in banned or key in chosen or same:
                    stats["source_negatives_rejected"] += 1
                    continue
                chosen.add(key)
                negs.append(-(j + 1))
            stats["source_negatives_kept"] += len(negs)
        need = m - len(negs)
        if need > 0:
            cols = np.nonzero(eligible[r])[0]
            cols = cols[np.argsort(rkeys[r, cols], kind="stable")]
            picked: list[int] = []
            for c in cols:
                key = int(keyid[r, c])
                if key in chosen:
                    _bump(ex, "duplicate")
                    continue
                chosen.add(key)
                picked.append(int(c))
                if len(picked) == need:
                    break
            negs += [int(ids[r, c]) for c in sorted(picked)]  # hardest first
        if len(negs) < cfg.min_negatives:
            _bump(stats["drops"], "too_few_candidates")
            continue
        if len(negs) < m:
            stats["short_rows"] += 1
        _bump(stats["negatives_per_row"], str(len(negs)))
        stats["negatives_total"] += len(negs)
        stats["rows_kept"] += 1
        out[r] = negs
    return out, stats
