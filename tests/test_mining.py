"""Hard-negative mining (issue #5): filters, determinism, lineage, cache, corruption, bad input, resume.

Everything runs the real packaged MiniLM on a few hundred short texts, loaded once per module.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from kalm.core.errors import KalmError
from kalm.core.hashing import hash_obj
from kalm.core.layout import MANIFEST, embedding_cache_dir, mined_dir, mined_work_dir, mixture_dir
from kalm.core.schema import row_id, rows_to_table
from kalm.core.storage import DataRoot, read_manifest, read_rows
from kalm.mining.cache import EmbeddingStore, embed_texts, text_key
from kalm.mining.config import MineConfig, load_mine_config
from kalm.mining.encode import Encoder, load_encoder
from kalm.mining.mine import run_mine_recipe, run_mine_stage
from kalm.mining.report import stale_negatives
from kalm.mining.sample import effective_window, norm_key

REPO = Path(__file__).resolve().parents[1]
INSTR = "Given a how-to question, retrieve the answer"
SUBJECTS = [
    "a sourdough starter",
    "a bicycle chain",
    "tomato seedlings",
    "a leaking faucet",
    "a python virtual environment",
    "a cast iron pan",
    "winter tyres",
    "a laptop battery",
    "a wool sweater",
    "an aquarium filter",
    "a wooden deck",
    "a chess opening",
    "a mortgage application",
    "a sprained ankle",
    "a beehive",
    "a git merge conflict",
    "a violin bow",
    "a compost heap",
    "a car windshield",
    "a tax return",
]
ACTIONS = ["clean", "store", "fix", "choose", "protect", "check"]


def qa(subject: str, action: str) -> tuple[str, str]:
    words = subject.split()[-1]
    return (
        f"How do I {action} {subject}?",
        f"To {action} {subject}, work slowly, look at the {words} closely and follow the maker's guide.",
    )


def make_rows(
    pairs: list[tuple[str, str]], recipe: str = "howto", negs: list[list[str]] | None = None
) -> list[dict]:
    return [
        {
            "id": row_id(q, p or ""),
            "query": q,
            "pos": [p] if p is not None else [],
            "neg": (negs[i] if negs else []),
            "instruction": INSTR,
            "symmetric": False,
            "category": "howto",
            "task_type": "retrieval",
            "recipe": recipe,
            "stage": "finetune",
            "lang": "en",
        }
        for i, (q, p) in enumerate(pairs)
    ]


def all_pairs(n_subjects: int = 20, n_actions: int = 6) -> list[tuple[str, str]]:
    return [qa(s, a) for s in SUBJECTS[:n_subjects] for a in ACTIONS[:n_actions]]


def write_mixture(root: DataRoot, rows: list[dict], recipe: str = "howto", stage: str = "finetune") -> None:
    """A mixture folder as curation/stage.py writes it: Parquet with the explicit schema, manifest last."""
    rel = mixture_dir(stage, recipe)
    root.delete_dir(rel)
    root.write_parquet(f"{rel}/part-00000.parquet", rows_to_table(rows))
    root.write_json(
        f"{rel}/{MANIFEST}",
        {
            "recipe": recipe,
            "stage": stage,
            "rows_in": len(rows),
            "rows_out": len(rows),
            "drops": {},
            "files": [{"name": "part-00000.parquet", "rows": len(rows)}],
            "input_fingerprint": hash_obj(rows),
            "schema_version": 1,
        },
    )


SMALL = {"window": (3, 30), "top_k": 10, "num_negatives": 4, "chunk_queries": 50}


@pytest.fixture(scope="module")
def enc() -> Encoder:
    return load_encoder("minilm", None)


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot.from_uri(str(tmp_path / "data"))


def mine(root: DataRoot, enc: Encoder, cfg: MineConfig, recipe: str = "howto", **kw: Any) -> dict[str, Any]:
    """The mined manifest plus ``cached`` (the result says whether it was a cache hit)."""
    res = run_mine_recipe(root, "finetune", recipe, "minilm", cfg, encoder=enc, **kw)
    return {**res.manifest, "cached": res.cached}


def mined(root: DataRoot, recipe: str = "howto") -> list[dict]:
    return read_rows(root, mined_dir("finetune", recipe)).to_pylist()


# -- filters ---------------------------------------------------------------------------------------------


def test_planted_false_negatives_positives_and_query_never_chosen(root: DataRoot, enc: Encoder) -> None:
    pairs = all_pairs(10, 6)
    q0, p0 = pairs[0]
    planted = "  " + p0.upper().replace(" ", "   ") + " "  # equal to row 0's positive after normalisation
    q_dup_pos = p0.replace("the maker's guide", "the official guide")  # a 2nd positive of the same query
    pairs += [(q0, q_dup_pos), ("Unrelated: " + q0, planted), ("What about it?", q0.lower())]
    write_mixture(root, make_rows(pairs))
    cfg = MineConfig(window=(0, 40), top_k=60, num_negatives=8, chunk_queries=25)  # rank 0 on: hardest
    m = mine(root, enc, cfg)
    out = {(r["query"], r["pos"][0]): r for r in mined(root)}
    positives_of: dict[str, set[str]] = {}
    for q, p in pairs:
        positives_of.setdefault(norm_key(q), set()).add(norm_key(p))
    for r in out.values():
        banned = positives_of[norm_key(r["query"])] | {norm_key(r["query"])}
        assert not banned & {norm_key(n) for n in r["neg"]}, r
        assert len({norm_key(n) for n in r["neg"]}) == len(r["neg"])  # no duplicates either
    r0 = out[(q0, p0)]
    assert planted not in r0["neg"] and q_dup_pos not in r0["neg"] and q0.lower() not in r0["neg"]
    ex = m["stats"]["excluded"]
    assert ex["positive"] > 0 and ex["equal_to_positive"] > 0 and ex["query"] > 0


def test_ranking_consistency_drop_is_counted(root: DataRoot, enc: Encoder) -> None:
    pairs = all_pairs(10, 6)
    bad = ("How do I fix a leaking faucet quickly?", "The annual report lists revenue by quarter and region.")
    write_mixture(root, make_rows([*pairs, bad]))
    m = mine(root, enc, MineConfig(**{**SMALL, "top_k": 3}))
    drops = m["stats"]["drops"]
    assert drops.get("positive_below_top_k", 0) >= 1
    assert bad[0] not in {r["query"] for r in mined(root)}
    hist = m["stats"]["positive_rank_hist"]
    assert sum(hist.values()) == len(pairs) + 1
    assert m["rows_out"] == len(pairs) + 1 - sum(drops.values()) == len(mined(root))


def test_window_m_and_seed_are_deterministic(tmp_path: Path, enc: Encoder) -> None:
    rows = make_rows(all_pairs(20, 6))
    roots = [DataRoot.from_uri(str(tmp_path / name)) for name in ("a", "b", "c")]
    for r in roots:
        write_mixture(r, rows)
    cfg = MineConfig(**SMALL)
    m_a = mine(roots[0], enc, cfg)
    m_b = mine(roots[1], enc, cfg)
    m_c = mine(roots[2], enc, cfg.model_copy(update={"seed": 1}))
    a, b, c = mined(roots[0]), mined(roots[1]), mined(roots[2])
    assert a == b and m_a["fingerprint"] == m_b["fingerprint"]
    assert a != c and m_a["config_hash"] != m_c["config_hash"]
    assert all(len(r["neg"]) == cfg.num_negatives for r in a) and m_a["stats"]["short_rows"] == 0
    # every negative comes from ranks [lo, hi) of the ranking the miner saw (vectors from its cache)
    pool = list(dict.fromkeys(p for r in rows for p in r["pos"]))
    store = EmbeddingStore(roots[0], embedding_cache_dir(enc.key), enc.dim)
    pvecs, found, _ = store.lookup(np.array([text_key(t) for t in pool], dtype="S16"))
    assert found.all()
    lo, hi = cfg.window
    for r in a:
        qv, ok, _ = store.lookup(np.array([text_key(enc.format_query(r["query"], INSTR))], dtype="S16"))
        assert ok.all()
        ranking = [pool[i] for i in np.argsort(-(pvecs @ qv[0]), kind="stable")]
        # +-1 at the edges: FAISS (sgemm) and numpy (sgemv) may order exact-tie neighbours differently
        assert all(lo - 1 <= ranking.index(n) <= hi for n in r["neg"]), r["query"]


def test_keep_source_negatives_and_margins(root: DataRoot, enc: Encoder) -> None:
    pairs = all_pairs(10, 6)
    own = "A source negative about tax returns and bees."
    negs = [[own, pairs[0][1].lower()]] + [[] for _ in pairs[1:]]  # the 2nd equals the positive: rejected
    write_mixture(root, make_rows(pairs, negs=negs))
    m = mine(root, enc, MineConfig(**SMALL, keep_source_negatives=True))
    r0 = next(r for r in mined(root) if r["query"] == pairs[0][0])
    assert r0["neg"][0] == own and pairs[0][1].lower() not in r0["neg"] and len(r0["neg"]) == 4
    assert m["stats"]["source_negatives_kept"] == 1 and m["stats"]["source_negatives_rejected"] == 1
    # an impossible margin leaves no candidate: rows are dropped, and the stats say why
    m = mine(root, enc, MineConfig(**SMALL, margin={"absolute": 2.0}), force=True)
    assert m["rows_out"] == 0 and m["stats"]["drops"]["too_few_candidates"] > 0
    assert m["stats"]["excluded"]["margin"] > 0


def test_small_pool_scales_window_or_drops(root: DataRoot, enc: Encoder) -> None:
    assert effective_window((50, 100), 50, 40, "scale").lineage() == {
        "window": [20, 40],
        "top_k": 20,
        "depth": 40,
        "pool_size": 40,
        "scaled": True,
    }
    assert effective_window((50, 100), 50, 40, "drop") is None
    write_mixture(root, make_rows(all_pairs(2, 6)))  # 12 rows, pool of 12 < 100
    m = mine(root, enc, MineConfig(chunk_queries=5))  # the default window [50, 100), M 7
    assert m["effective"]["scaled"] and m["effective"]["window"] == [6, 12]
    assert m["stats"]["short_rows"] == m["rows_out"] > 0  # 6 ranks minus exclusions < 7: counted
    assert (
        sum(int(k) * v for k, v in m["stats"]["negatives_per_row"].items()) == m["stats"]["negatives_total"]
    )
    m = mine(root, enc, MineConfig(chunk_queries=5, small_pool="drop"), force=True)
    assert m["rows_out"] == 0 and m["drops"] == {"pool_smaller_than_window": 12}


# -- lineage, cache, corruption --------------------------------------------------------------------------


def test_manifest_lineage_and_training_reads_it(root: DataRoot, enc: Encoder) -> None:
    write_mixture(root, make_rows(all_pairs(10, 6)))
    cfg = MineConfig(**SMALL)
    m = run_mine_stage(root, "finetune", "minilm", cfg, encoder=enc)[0].manifest
    disk = read_manifest(root, mined_dir("finetune", "howto"))
    assert disk is not None and disk["fingerprint"] == m["fingerprint"]
    for key in (
        "rows_out",
        "files",
        "recipe",
        "category",
        "miner",
        "index",
        "window",
        "top_k",
        "num_negatives",
    ):
        assert key in disk, key
    for key in (
        "seed",
        "config_hash",
        "inputs",
        "input_fingerprint",
        "stats",
        "timing",
        "encode",
        "effective",
    ):
        assert key in disk, key
    assert disk["miner"]["fingerprint"] == enc.fingerprint and disk["miner"]["path"] == enc.path
    assert disk["index"]["type"] == "flat" and disk["index"]["backend"] == "faiss"
    assert (
        disk["inputs"]["mixture"]["input_fingerprint"]
        == read_manifest(root, mixture_dir("finetune", "howto"))["input_fingerprint"]
    )  # type: ignore[index]
    assert disk["category"] == "howto" and sum(f["rows"] for f in disk["files"]) == disk["rows_out"]
    assert not root.exists(mined_work_dir("finetune", "howto"))  # the work folder went after publishing
    stage_report = root.read_json(f"mined/finetune/{MANIFEST}")
    assert stage_report["recipes"]["howto"]["rows_out"] == m["rows_out"]
    assert stale_negatives(root, "finetune", enc.fingerprint) == []
    assert stale_negatives(root, "finetune", "another-model") == ["howto"]

    from kalm.training.config import TrainConfig
    from kalm.training.train import data_sources

    tcfg = TrainConfig(
        stage="finetune",
        run_name="t",
        model={"path": "minilm"},
        data={"source": "mined", "group_size": 5},
        schedule={"max_steps": 1},
    )
    (src,) = data_sources(tcfg, root)
    assert src.name == "howto" and src.rows == m["rows_out"]


def test_cache_hit_then_partial_reencode_when_recipe_grows(root: DataRoot, enc: Encoder) -> None:
    pairs = all_pairs(10, 6)
    write_mixture(root, make_rows(pairs))
    cfg = MineConfig(**SMALL)
    first = mine(root, enc, cfg)
    assert first["encode"]["encoded"] == 2 * len(pairs) and not first["cached"]
    assert mine(root, enc, cfg)["cached"] is True  # same model, config, inputs: nothing runs
    again = mine(root, enc, cfg, force=True)
    assert again["encode"]["encoded"] == 0 and again["encode"]["cache_hits"] == 2 * len(pairs)
    assert mined(root) and again["fingerprint"] == first["fingerprint"]
    grown = pairs + all_pairs(12, 6)[len(pairs) :]  # 12 new rows: 12 queries + 12 positives are new
    write_mixture(root, make_rows(grown))
    third = mine(root, enc, cfg)
    assert not third["cached"] and third["encode"]["encoded"] == 24
    assert third["rows_in"] == len(grown)
    # an operational key does not invalidate; a sampling key does
    assert mine(root, enc, cfg.model_copy(update={"batch_size": 7}))["cached"] is True
    assert mine(root, enc, cfg.model_copy(update={"num_negatives": 3}))["cached"] is False


def test_corrupt_cache_entries_are_recomputed_and_counted(
    root: DataRoot, enc: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    pairs = all_pairs(5, 6)
    write_mixture(root, make_rows(pairs))
    cfg = MineConfig(**SMALL, cache_shard_texts=20)
    first = mine(root, enc, cfg)
    folder = Path(root.path(embedding_cache_dir(enc.key)))
    shards = sorted(folder.glob("part-*.parquet"))
    assert len(shards) == 3  # 60 texts in shards of 20
    # one entry's bytes flipped inside a valid Parquet file: caught by its CRC
    t = pq.read_table(shards[0])
    vecs = t.column("vec").to_pylist()
    vecs[3] = bytes(b ^ 0xFF for b in vecs[3][:8]) + vecs[3][8:]
    pq.write_table(t.set_column(1, "vec", pa.array(vecs, pa.binary())), shards[0])
    # another shard cut in half: unreadable as a whole
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="kalm.mining.cache"):
        again = mine(root, enc, cfg, force=True)
    assert again["encode"]["corrupt_entries"] == 1 and again["encode"]["corrupt_shards"] == 1
    assert again["encode"]["encoded"] == 1 + 20 and again["encode"]["cache_hits"] == 60 - 21
    assert any("corrupt" in r.message for r in caplog.records)
    assert any("unreadable" in r.message for r in caplog.records)
    assert again["rows_in"] == first["rows_in"]
    third = mine(root, enc, cfg, force=True)  # the store healed itself
    assert third["encode"]["encoded"] == 0 and third["encode"]["corrupt_entries"] == 0


def test_cache_off_and_two_cpu_replicas_agree(root: DataRoot, enc: Encoder) -> None:
    import copy

    texts = [p for _, p in all_pairs(3, 6)]
    twin = Encoder(
        [enc.embedder, copy.deepcopy(enc.embedder)], enc.spec, enc.path, enc.fingerprint, enc.precision
    )
    np.testing.assert_array_equal(twin.encode(texts, batch_size=4), enc.encode(texts, batch_size=4))
    store = EmbeddingStore(root, "scratch", enc.dim)
    vecs, st = embed_texts(enc, texts + texts[:2], store, batch_size=4, shard_texts=5)
    assert st["unique"] == len(texts) and st["encoded"] == len(texts) and len(vecs) == len(texts) + 2
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    write_mixture(root, make_rows(all_pairs(5, 6)))
    m = mine(root, enc, MineConfig(**SMALL, cache=False))
    assert m["rows_out"] > 0 and not root.exists("cache")


def test_ivf_index_and_corpus_pool(root: DataRoot, enc: Encoder) -> None:
    pairs = all_pairs(8, 6)
    write_mixture(root, make_rows(pairs))
    m = mine(root, enc, MineConfig(**SMALL, index={"type": "ivf", "nlist": 64, "nprobe": 2}))
    assert m["index"]["type"] == "ivf" and m["index"]["nlist"] == 1 and m["rows_out"] > 0  # clamped: 48 // 39
    corpus = [qa(s, a)[1] for s in SUBJECTS[8:] for a in ACTIONS]
    lines = "\n".join(json.dumps({"text": t}) for t in corpus)
    root.write_bytes("corpora/howto.jsonl", lines.encode())
    cfg = MineConfig(**SMALL, pool={"source": "corpus", "corpus": "corpora/howto.jsonl"})
    m = mine(root, enc, cfg)
    assert (
        m["pool"]["size"] == len(corpus) + len(pairs) and m["pool"]["corpus"]["path"] == "corpora/howto.jsonl"
    )
    allowed = set(corpus) | {p for _, p in pairs}
    assert all(set(r["neg"]) <= allowed for r in mined(root))
    with pytest.raises(KalmError, match="pool corpus not found"):
        mine(root, enc, MineConfig(pool={"source": "corpus", "corpus": "corpora/missing.jsonl"}))
    # a bad corpus is one line naming the file (and the line), not a traceback
    root.write_bytes("corpora/bad.jsonl", b'{"text": "fine"}\n{"text": oops}\n')
    root.write_bytes("corpora/blank.jsonl", b'{"text": "  "}\n{"other": "x"}\n')
    root.write_bytes("corpora/latin1.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    root.write_bytes("corpora/notes.txt", b"a text\n")
    for name, error in [
        ("bad.jsonl", "line 2 is not JSON"),
        ("blank.jsonl", "no non-empty texts"),
        ("latin1.jsonl", "line 1 is not JSON"),
        ("notes.txt", "use a .parquet or .jsonl file"),
    ]:
        with pytest.raises(KalmError, match=error):
            mine(root, enc, MineConfig(**SMALL, pool={"source": "corpus", "corpus": f"corpora/{name}"}))


def test_pool_texts_are_streamed_to_a_file_not_held(
    root: DataRoot, enc: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corpus pool is read a block and a batch at a time into a memory-mapped Arrow file: the Python heap
    never holds the corpus (tracemalloc, numpy included); texts come back by id, duplicates (also in the
    positives) get one id in first-seen order, and equal-after-normalisation texts share a key."""
    import tracemalloc

    from kalm.mining import pool as pool_mod
    from kalm.mining.config import PoolSpec
    from kalm.mining.texts import Concat, Mapped, TextFile

    monkeypatch.setattr(pool_mod, "READ_BLOCK", 1 << 16)
    monkeypatch.setattr(pool_mod, "TEXT_BATCH", 200)
    body = "x" * 2000
    corpus = [f"doc {i} {body}" for i in range(3000)] + ["doc 7 " + body, "DOC  7 " + body]
    root.write_bytes("big.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in corpus).encode())
    spec = PoolSpec(source="corpus", corpus="big.jsonl")
    rows = {"pos": [["doc 1 " + body], ["a new positive"]], "neg": [[], []]}
    total = sum(len(t) for t in corpus)
    tracemalloc.start()
    try:
        pool = pool_mod.build_pool(rows, pool_mod.corpus_texts(root, spec), None, enc, str(tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total / 4, (peak, total)  # the corpus: 6 MB; peak ~1.2 MB (a batch, a block, parsing)
    assert len(pool) == 3002 and pool.lineage == {"source": "corpus", "size": 3002}
    assert pool.texts([3001, 0, 3000]) == ["a new positive", corpus[0], "DOC  7 " + body]
    assert pool.ids_of(["doc 1 " + body, "doc 7 " + body, "absent"]).tolist() == [1, 7, -1]
    assert pool.keys[3000] == pool.keys[7] != pool.keys[8]
    assert corpus_lineage_ok(pool_mod.corpus_lineage(root, spec), root.read_bytes("big.jsonl"))
    # the lazy views embed_texts reads: a file, a mapped view, a concatenation, in any order
    f = TextFile(str(tmp_path / "t.arrow"))
    f.append(["a", "b"])
    f.append([])
    f.append(["c"])
    f.close()
    both = Concat([Mapped(f, str.upper), ["q1", "q2"]])
    assert len(both) == 5 and both.take(np.array([4, 2, 0, 3, 1])) == ["q2", "C", "A", "q1", "B"]
    vecs, st = embed_texts(enc, both, EmbeddingStore(root, "c", enc.dim), batch_size=2, shard_texts=2)
    ref, _ = embed_texts(enc, ["A", "B", "C", "q1", "q2"], EmbeddingStore(root, "c2", enc.dim), batch_size=2)
    assert st["encoded"] == 5 and np.array_equal(vecs, ref)


def corpus_lineage_ok(lineage: dict[str, Any], data: bytes) -> bool:
    import hashlib

    return lineage["bytes"] == len(data) and lineage["sha256"] == hashlib.sha256(data).hexdigest()[:16]


# -- bad input -------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error_or_a_counted_skip(root: DataRoot, enc: Encoder) -> None:
    rows = make_rows(all_pairs(5, 6))
    rows[0]["pos"] = []
    rows[1]["pos"] = ["   "]
    rows[2]["query"] = "  "
    write_mixture(root, rows)
    m = mine(root, enc, MineConfig(**SMALL))
    assert m["drops"]["no_positive"] == 2 and m["drops"]["empty_query"] == 1
    write_mixture(root, make_rows([("q one?", "  "), ("q two?", None)]))  # type: ignore[list-item]
    with pytest.raises(KalmError, match="empty candidate pool"):
        mine(root, enc, MineConfig(**SMALL))
    with pytest.raises(KalmError, match="model not found"):
        run_mine_recipe(root, "finetune", "howto", "no/such/model-dir", MineConfig())
    with pytest.raises(KalmError, match="missing or incomplete"):
        mine(root, enc, MineConfig(), recipe="nope")
    with pytest.raises(KalmError, match="no finished mixture for nope"):
        run_mine_stage(root, "finetune", "minilm", MineConfig(), recipes=["nope"], encoder=enc)
    with pytest.raises(KalmError, match="unknown key 'windw'"):
        bad = root.path("bad.yaml")
        Path(bad).write_text("windw: [1, 2]\n")
        load_mine_config(bad)
    with pytest.raises(ValueError, match="does not fit"):
        MineConfig(window=(5, 8), num_negatives=7)


def test_cli_user_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "mine.yaml"
    bad.write_text("top_kk: 3\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (
        ["--stage", "finetune", "--config", str(bad)],
        [
            "--stage",
            "finetune",
            "--data-root",
            str(tmp_path / "d"),
            "--config",
            str(REPO / "configs/mine.yaml"),
        ],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "kalm", "mine", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            env=env,
        )
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and " INFO " not in ln]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert (
        "unknown key 'top_kk'"
        in CliRunner()
        .invoke(
            __import__("kalm.cli.mine", fromlist=["app"]).app,
            ["mine", "--stage", "finetune", "--config", str(bad)],
        )
        .output
    )


# -- resume after kill -9 --------------------------------------------------------------------------------


def test_kill9_mid_run_then_rerun_is_identical(
    recipe_dir: Callable[..., Path], tmp_path: Path, enc: Encoder
) -> None:
    from kalm.data.config import IngestConfig
    from kalm.data.ingest import run_ingest_recipe
    from kalm.data.mixtures import run_build_stage
    from kalm.data.recipes import discover
    from tests.conftest import faq_rows, kill_between_chunks

    folder = recipe_dir("faq", faq_rows(120))
    roots = [DataRoot.from_uri(str(tmp_path / name)) for name in ("killed", "clean")]
    for r in roots:  # the real data stage builds the mixtures
        run_ingest_recipe(discover([folder])["faq"], r, IngestConfig())
        run_build_stage("finetune", ["faq"], r, IngestConfig())
    cfg = MineConfig(window=(5, 40), top_k=60, num_negatives=5, chunk_queries=12)
    n_chunks = -(-read_manifest(roots[0], mixture_dir("finetune", "faq"))["rows_out"] // 12)  # type: ignore[index]
    work = Path(roots[0].path(mined_work_dir("finetune", "faq")))
    call = """
    from kalm.mining.config import MineConfig
    cfg = MineConfig.model_validate_json(sys.argv[2])
    stage.run_mine_recipe(DataRoot.from_uri(sys.argv[1]), "finetune", "faq", "minilm", cfg)
    """
    done_before = kill_between_chunks(
        "kalm.mining.mine", call, [roots[0].uri, cfg.model_dump_json()], work, tmp_path
    )
    assert 2 <= done_before < n_chunks and not root_has_output(roots[0])
    resumed = run_mine_recipe(roots[0], "finetune", "faq", "minilm", cfg, encoder=enc).manifest
    clean = run_mine_recipe(roots[1], "finetune", "faq", "minilm", cfg, encoder=enc).manifest
    assert resumed["chunks"] == {
        **clean["chunks"],
        "resumed": done_before,
        "computed": n_chunks - done_before,
    }
    assert resumed["encode"]["encoded"] == 0  # every vector the killed run made was kept
    assert resumed["fingerprint"] == clean["fingerprint"] and resumed["stats"] == clean["stats"]
    for f in clean["files"]:
        a = Path(roots[0].path(mined_dir("finetune", "faq"), f["name"])).read_bytes()
        b = Path(roots[1].path(mined_dir("finetune", "faq"), f["name"])).read_bytes()
        assert a == b, f["name"]
    assert not work.exists()


def root_has_output(root: DataRoot) -> bool:
    return read_manifest(root, mined_dir("finetune", "faq")) is not None


def test_prefect_task_body_runs(root: DataRoot) -> None:
    from kalm.mining.config import load_mine_config
    from kalm.orchestration.tasks import mine_recipe_task

    write_mixture(root, make_rows(all_pairs(4, 6)))
    cfg_file = Path(root.path("mine.yaml"))
    cfg_file.write_text("window: [3, 20]\ntop_k: 10\nnum_negatives: 3\n")
    kw = {
        "root": root,
        "stage": "finetune",
        "recipe": "howto",
        "model": "minilm",
        "cfg": load_mine_config(cfg_file),
    }
    out = mine_recipe_task.fn(**kw)
    assert out.cached is False and out.rows and out.rows > 0
    assert mine_recipe_task.fn(**kw).cached is True


def test_tiled_topk_is_exact_and_shards_merge_exactly() -> None:
    """The torch backend's search (CUDA in production, any device here): the pool in tiles far smaller than
    the score matrix, and per-shard top-k lists (GPUs, nodes) merged, give the brute-force top-k."""
    import torch

    from kalm.mining.search import merge_topk, topk_tiled

    g = torch.Generator().manual_seed(0)
    pool = torch.nn.functional.normalize(torch.randn(5000, 16, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    want = torch.topk(q @ pool.T, 25, dim=1)
    scores, ids = topk_tiled(q, pool, 25, tile_bytes=300 * 100 * 4)  # tiles of 100 pool rows: 50 tiles
    assert torch.equal(ids, want.indices) and torch.allclose(scores, want.values)
    shards = [(s, min(s + 1700, 5000)) for s in range(0, 5000, 1700)]
    parts = []
    for a, b in shards:
        sc, ix = topk_tiled(q, pool[a:b], 25)
        parts.append((sc, ix + a))  # global ids
    merged_scores, merged_ids = merge_topk(parts, 25)
    assert torch.equal(merged_ids, want.indices) and torch.allclose(merged_scores, want.values)
    assert topk_tiled(q[:2], pool[:10], 25)[1].shape == (2, 10)  # k capped at the pool
    # the torch backend's searcher with the pool in per-GPU slices (CPU tensors here): the same top-k
    from kalm.mining.search import Searcher

    sharded = Searcher("torch", [(a, pool[a:b]) for a, b in shards], 5000, query_batch=128)
    got_scores, got_ids = sharded.search(q.numpy(), 25)
    assert (got_ids == want.indices.numpy()).all() and np.allclose(got_scores, want.values.numpy())


@pytest.mark.slow
def test_encoding_scaled_out_on_worker_processes_gives_the_same_vectors_and_negatives(
    tmp_path: Path,
) -> None:
    """`executor: {kind: local, workers: 2}`: the cache shards are encoded by two worker processes (each
    loading the model once, checked by its key) into the shared cache: the same vectors as one process,
    the same mined rows; a worker with another model is refused in one line. In fp32: bf16 results move by
    ~1e-3 with the number of threads, and the workers run fewer threads each than one process."""
    from kalm.data.executors import ExecutorSpec, LocalExecutor
    from kalm.mining.cache import encode_unit

    enc = load_encoder("minilm", None, precision="fp32")
    texts = [p for _, p in all_pairs(6, 6)]
    one = DataRoot.from_uri(str(tmp_path / "one"))
    two = DataRoot.from_uri(str(tmp_path / "two"))
    want, _ = embed_texts(enc, texts, EmbeddingStore(one, "c", enc.dim), batch_size=4, shard_texts=9)
    with LocalExecutor(2) as ex:
        got, st = embed_texts(
            enc, texts, EmbeddingStore(two, "c", enc.dim), batch_size=4, shard_texts=9, executor=ex
        )
    assert st["encoded"] == len(texts) and len(EmbeddingStore(two, "c", enc.dim)._list()) == -(
        -len(texts) // 9
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for r, label in ((one, "single"), (two, "local")):
        write_mixture(r, make_rows(all_pairs(5, 6)))
        cfg = MineConfig(
            precision="fp32",
            **SMALL,
            cache_shard_texts=7,
            executor=ExecutorSpec(kind=label, workers=2 if label == "local" else 1),
        )
        mine(r, enc, cfg)
    assert mined(one) == mined(two)
    with pytest.raises(KalmError, match="the worker loaded .*not the driver's model"):
        encode_unit(
            "u", ["a"], "minilm", str(tmp_path / "x"), "c", "other-key", 256, enc.precision, "cpu", 4, 1
        )
