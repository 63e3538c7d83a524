"""The streaming training sampler on real Parquet shards: batch purity, weights, epochs, determinism across
world sizes, resume, and memory bounded by its buffer whatever the number of sources and shard sizes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kalm.core.errors import KalmError
from kalm.core.schema import row_id, rows_to_table
from kalm.training.sampler import HomogeneousSampler, ShardSource, mixture


def _source(
    tmp_path: Path, name: str, n: int, *, row_group: int = 64, files: int = 1, task: str = "retrieval"
) -> ShardSource:
    """``n`` rows of recipe ``name`` in ``files`` Parquet files with row groups of ``row_group`` rows."""
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "id": row_id(f"{name} q{i}", f"{name} p{i}"),
            "query": f"{name} q{i}",
            "pos": [f"{name} p{i}"],
            "neg": [f"{name} n{i}-{k} " + "x" * 40 for k in range(3)],
            "instruction": "",
            "symmetric": False,
            "category": name,
            "task_type": task,
            "recipe": name,
            "stage": "finetune",
            "lang": "en",
            "neg_labels": [],
            "label": "",
        }
        for i in range(n)
    ]
    paths = []
    per = -(-n // files)
    for f in range(files):
        path = folder / f"part-{f:05d}.parquet"
        pq.write_table(rows_to_table(rows[f * per : (f + 1) * per]), path, row_group_size=row_group)
        paths.append(str(path))
    return ShardSource(name, paths, n, float(n), task_type=task)


def _sampler(sources: list[ShardSource], **kw) -> HomogeneousSampler:
    args = {"per_device": 8, "world": 1, "rank": 0, "group_size": 2, "seed": 7, **kw}
    return HomogeneousSampler(sources, **args)


def test_batches_are_task_homogeneous_and_weighted(tmp_path: Path) -> None:
    sources = [_source(tmp_path, n, r) for n, r in (("a", 600), ("b", 300), ("c", 100))]
    pure = _sampler(sources)
    drawn = Counter()
    for _ in range(300):
        batch = pure.next_batch()
        assert len(set(batch.sources)) == 1  # every batch from one source
        drawn[batch.sources[0]] += 1
    # drawn in proportion to the rows (weights 600 / 300 / 100): within 4 standard deviations
    for name, p in (("a", 0.6), ("b", 0.3), ("c", 0.1)):
        assert abs(drawn[name] / 300 - p) < 4 * (p * (1 - p) / 300) ** 0.5, drawn
    semi = _sampler(sources, per_device=16, homogeneous=0.75)
    for _ in range(50):
        counts = Counter(semi.next_batch().sources)
        assert counts.most_common(1)[0][1] >= 12  # round(16 * 0.75) rows of the batch's source
    assert any(len(Counter(semi.next_batch().sources)) > 1 for _ in range(20))


def test_an_epoch_visits_every_row_once_across_files_row_groups_and_big_groups(tmp_path: Path) -> None:
    """Blocks are row groups; a row group far bigger than a block is read in sub-blocks."""
    small = _source(tmp_path, "small", 1000, row_group=64, files=3)
    big = _source(tmp_path / "b", "big", 1000, row_group=1000)  # one 1,000-row group
    for src in (small, big):
        s = _sampler([src], per_device=10, block_rows=128, window=2)
        seen = Counter(q for _ in range(100) for q in s.next_batch().queries)
        assert len(seen) == 1000 and set(seen.values()) == {1}
        if src is big:
            assert len(s.blocks(0)) == 8  # 1,000 rows in sub-blocks of 128
        nxt = Counter(q for _ in range(100) for q in s.next_batch().queries)
        assert set(nxt) == set(seen)  # the second epoch: the same rows, in another order
    first = [q for _ in range(3) for q in _sampler([small], per_device=10).next_batch().queries]
    assert first != sorted(first)  # shuffled, not file order


def test_the_global_batch_does_not_depend_on_the_world_size_and_resumes_exactly(tmp_path: Path) -> None:
    sources = [_source(tmp_path, n, r) for n, r in (("a", 500), ("b", 200))]
    one = _sampler(sources, per_device=8)
    two = [_sampler(sources, per_device=4, world=2, rank=r) for r in (0, 1)]
    for _ in range(40):
        whole = one.next_batch()
        halves = [s.next_batch() for s in two]
        assert whole.queries == halves[0].queries + halves[1].queries
        assert whole.docs == halves[0].docs + halves[1].docs
    state = one.state_dict()
    want = [one.next_batch().docs for _ in range(30)]
    resumed = _sampler(sources, per_device=8)
    resumed.load_state_dict(state)
    assert [resumed.next_batch().docs for _ in range(30)] == want
    with pytest.raises(KalmError, match="older sampler"):
        resumed.load_state_dict({**state, "format": 1})


def test_memory_is_bounded_by_the_buffer_not_by_sources_or_shards(tmp_path: Path) -> None:
    """120 sources and 4 sources of the same rows: the resident windows stay under the buffer's cap (plus
    the window being read), and a big shard is never held whole."""
    many = [_source(tmp_path / "m", f"s{i:03d}", 100) for i in range(120)]
    few = [_source(tmp_path / "f", f"s{i}", 3000, row_group=64) for i in range(4)]
    cap_mb = 0.25
    peaks = {}
    for label, sources in (("many", many), ("few", few)):
        s = _sampler(sources, buffer_mb=cap_mb, window=2)
        for _ in range(400):
            s.next_batch()
        peaks[label] = s.peak_buffer_bytes
        shard = pq.read_table(sources[0].files[0]).nbytes
        window = max(w.nbytes for _, _, w in s._windows.values())
        assert s.peak_buffer_bytes <= cap_mb * 2**20 + window, label
        assert label == "many" or s.peak_buffer_bytes < shard / 2  # few: a 3,000-row shard never whole
    data = sum(pq.read_table(f).nbytes for src in many for f in src.files)
    assert data > 4 * cap_mb * 2**20 and peaks["many"] < data / 3, (data, peaks)  # never all 120 at once
    # evicted windows are read again when their source comes back: the same rows, not a skip
    s = _sampler(many, buffer_mb=0.01, window=1)
    seen = Counter(q for _ in range(1500) for q in s.next_batch().queries)
    assert s.reads > 120 and max(seen.values()) <= 3  # 12,000 draws over 12,000 rows: ~1 epoch each


def test_mixture_weights_merge_and_drop_small_sources(tmp_path: Path) -> None:
    big = _source(tmp_path, "big", 400)
    t1 = _source(tmp_path, "tiny1", 30)
    t2 = _source(tmp_path, "tiny2", 20)
    lone = _source(tmp_path, "lone", 10, task="sts")
    pinned = _source(tmp_path, "pinned", 5)
    pinned = ShardSource(**{**pinned.__dict__, "weight": 50.0})
    out, report = mixture(
        [big, t1, t2, lone, pinned], alpha=0.5, min_rows=40, drop_rows=25, explicit=frozenset({"pinned"})
    )
    by = {s.name: s for s in out}
    assert set(by) == {"big", "merged:retrieval:batch", "pinned"}
    assert by["big"].weight == pytest.approx(20.0)  # 400 ** 0.5
    merged = by["merged:retrieval:batch"]
    assert merged.rows == 50 and merged.members == ("tiny1", "tiny2") and len(merged.files) == 2
    assert merged.weight == pytest.approx(50**0.5)
    assert by["pinned"].weight == 50.0  # a configured weight is the user's: kept, never merged
    assert report["dropped"] == {"lone": 10}
    assert report["merged"] == {"merged:retrieval:batch": ["tiny1", "tiny2"]}
    s = _sampler(out, per_device=6)
    groups = [{"big"}, {"tiny1", "tiny2"}, {"pinned"}]  # a merged source's batch: its recipes only
    for _ in range(40):
        drawn = set(s.next_batch().sources)
        assert any(drawn <= g for g in groups), drawn
