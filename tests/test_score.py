"""The score stage on real mined rows: teacher scores, the false-negative filter, cache, kill -9 resume, bad
teachers, and the scores reaching the training batch.

Rows are mined for real (tests/test_mining.py's helpers: a mixture folder, then ``run_mine_recipe`` with
all-MiniLM-L6-v2); the teacher is the same packaged model, or a tiny random cross-encoder saved here.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from kalm.core.errors import KalmError
from kalm.core.layout import mined_dir, scored_dir, scored_work_dir
from kalm.core.storage import DataRoot, read_rows
from kalm.mining.config import MarginSpec, MineConfig, ScoreConfig, TeacherSpec
from kalm.mining.encode import Encoder, load_encoder
from kalm.mining.mine import run_mine_recipe
from kalm.mining.score import filter_negatives, load_teacher, run_score_recipe
from tests.conftest import kill_between_chunks
from tests.test_mining import all_pairs, make_rows, write_mixture

REPO = Path(__file__).resolve().parents[1]
MINE = MineConfig(window=(2, 30), top_k=40, num_negatives=5, chunk_queries=50)


@pytest.fixture(scope="module")
def enc() -> Encoder:
    return load_encoder("minilm", None)


@pytest.fixture(scope="module")
def mined_root(tmp_path_factory: pytest.TempPathFactory, enc: Encoder) -> Path:
    """A data root with ``mined/finetune/howto`` (60 rows, 5 negatives each where the pool allows)."""
    base = tmp_path_factory.mktemp("scored") / "data"
    root = DataRoot.from_uri(str(base))
    write_mixture(root, make_rows(all_pairs(10, 6)))
    run_mine_recipe(root, "finetune", "howto", "minilm", MINE, encoder=enc)
    return base


@pytest.fixture
def root(mined_root: Path, tmp_path: Path) -> DataRoot:
    copy = tmp_path / "data"
    shutil.copytree(mined_root, copy)
    return DataRoot.from_uri(str(copy))


def test_filter_drops_exactly_the_negatives_inside_the_margin() -> None:
    cfg = ScoreConfig(margin=MarginSpec(absolute=0.1, relative=0.05))
    # pos = min(0.8, 0.9) = 0.8; ceiling = min(0.8 - 0.1, 0.8 - 0.04) = 0.7 (a score equal to it is kept)
    keep, why = filter_negatives([0.8, 0.9], [0.5, 0.7, 0.70001, 0.76, 0.95, math.nan], cfg)
    assert keep == [0, 1] and why == {"within_margin": 3, "no_score": 1, "row_dropped": 0}
    keep, why = filter_negatives([0.8], [0.5, 0.7, 0.77, 0.8], ScoreConfig(margin=MarginSpec(relative=0.05)))
    assert keep == [0, 1] and why["within_margin"] == 2  # ceiling 0.76
    keep, _ = filter_negatives([-0.2], [-0.25, -0.2, -0.205], ScoreConfig(margin=MarginSpec(relative=0.05)))
    assert keep == [0]  # a negative positive score: ceiling -0.2 - 0.01 = -0.21
    keep, why = filter_negatives([math.nan], [0.1], cfg)
    assert keep == [] and why == {"within_margin": 0, "no_score": 0, "row_dropped": 0}


def test_scores_are_the_teachers_cosines_and_the_filter_holds(root: DataRoot) -> None:
    enc = load_encoder("minilm", None, precision="fp32")  # bf16 would differ by batch composition
    cfg = ScoreConfig(teacher=TeacherSpec(precision="fp32"), margin=MarginSpec(relative=0.3), chunk_rows=16)
    res = run_score_recipe(root, "finetune", "howto", cfg)
    m = res.manifest
    rows = read_rows(root, scored_dir("finetune", "howto")).to_pylist()
    mined = {r["id"]: r for r in read_rows(root, mined_dir("finetune", "howto")).to_pylist()}
    assert rows and len(rows) == m["rows_out"] and not res.cached
    s = m["stats"]
    assert s["negatives_in"] == s["negatives_kept"] + sum(s["negative_drops"].values())
    assert s["rows_in"] == s["rows_kept"] + sum(s["drops"].values()) == len(mined)
    assert s["negative_drops"]["within_margin"] > 0  # the filter did something on this data
    assert m["teacher"]["kind"] == "embedding" and m["teacher"]["fingerprint"]
    assert m["cost"]["units"] == "texts encoded" and m["chunks"]["total"] == 4
    assert m["cost"]["pairs"] == s["negatives_in"] + sum(len(r["pos"]) for r in mined.values())
    for r in rows[:8]:
        src = mined[r["id"]]
        assert len(r["pos_scores"]) == len(r["pos"]) and len(r["neg_scores"]) == len(r["neg"])
        assert set(r["neg"]) <= set(src["neg"])
        q = enc.encode([enc.format_query(r["query"], r["instruction"])])[0]
        docs = enc.encode(r["pos"] + r["neg"])
        np.testing.assert_allclose(r["pos_scores"] + r["neg_scores"], docs @ q, atol=1e-5)
        ceiling = min(r["pos_scores"]) * (1 - 0.3)
        assert all(x <= ceiling + 1e-7 for x in r["neg_scores"])
        dropped = [n for n in src["neg"] if n not in r["neg"]]
        if dropped:  # what was dropped really scored above the ceiling
            d = enc.encode(dropped) @ q
            assert (d > ceiling - 1e-6).all()
    from kalm.mining import score

    score._TEACHERS.clear()
    again = run_score_recipe(root, "finetune", "howto", cfg)
    assert not score._TEACHERS  # a cache hit never loads the teacher
    assert again.cached and again.manifest["fingerprint"] == m["fingerprint"]
    wider = cfg.model_copy(update={"margin": MarginSpec(relative=0.5)})
    other = run_score_recipe(root, "finetune", "howto", wider)
    assert not other.cached and other.rows <= res.rows


def test_kill9_mid_scoring_then_rerun_is_byte_identical(
    root: DataRoot, mined_root: Path, tmp_path: Path
) -> None:
    cfg = ScoreConfig(chunk_rows=8)
    shutil.copytree(mined_root, tmp_path / "clean")
    clean_root = DataRoot.from_uri(str(tmp_path / "clean"))
    work = Path(root.path(scored_work_dir("finetune", "howto")))
    call = """
    from kalm.mining.config import ScoreConfig
    cfg = ScoreConfig.model_validate_json(sys.argv[2])
    stage.run_score_recipe(DataRoot.from_uri(sys.argv[1]), "finetune", "howto", cfg)
    """
    done = kill_between_chunks("kalm.mining.score", call, [root.uri, cfg.model_dump_json()], work, tmp_path)
    assert 2 <= done < 8 and not Path(root.path(scored_dir("finetune", "howto"))).exists()
    resumed = run_score_recipe(root, "finetune", "howto", cfg).manifest
    clean = run_score_recipe(clean_root, "finetune", "howto", cfg).manifest
    assert resumed["chunks"]["resumed"] == done and resumed["stats"] == clean["stats"]
    assert resumed["fingerprint"] == clean["fingerprint"]
    for f in clean["files"]:
        a = Path(root.path(scored_dir("finetune", "howto"), f["name"])).read_bytes()
        b = Path(clean_root.path(scored_dir("finetune", "howto"), f["name"])).read_bytes()
        assert a == b, f["name"]
    assert not work.exists()


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT reranker (one logit), saved as sentence-transformers' CrossEncoder saves one."""
    import torch
    from transformers import BertForSequenceClassification

    from tests.conftest import tiny_bert_parts

    out = tmp_path_factory.mktemp("reranker") / "tiny-reranker"
    tok, cfg = tiny_bert_parts(num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_cross_encoder_teacher_scores_pairs(root: DataRoot, tiny_cross_encoder: Path) -> None:
    cfg = ScoreConfig(
        teacher=TeacherSpec(kind="cross_encoder", model=str(tiny_cross_encoder)),
        margin=MarginSpec(absolute=0.0),
        min_negatives=0,
    )
    m = run_score_recipe(root, "finetune", "howto", cfg).manifest
    rows = read_rows(root, scored_dir("finetune", "howto")).to_pylist()
    assert m["teacher"]["kind"] == "cross_encoder" and m["cost"]["units"] == "pairs scored"
    assert m["stats"]["rows_kept"] == m["stats"]["rows_in"]  # min_negatives 0: no row is dropped
    for r in rows:
        assert all(math.isfinite(x) for x in r["pos_scores"] + r["neg_scores"])
        assert all(x <= min(r["pos_scores"]) for x in r["neg_scores"])


def test_wrong_or_missing_teachers_are_one_line_errors(tiny_cross_encoder: Path, root: DataRoot) -> None:
    with pytest.raises(KalmError, match="is a cross-encoder .*teacher.kind: cross_encoder"):
        load_teacher(TeacherSpec(kind="embedding", model=str(tiny_cross_encoder)))
    with pytest.raises(KalmError, match="is not a cross-encoder .*teacher.kind: embedding"):
        load_teacher(TeacherSpec(kind="cross_encoder", model="minilm"))
    with pytest.raises(KalmError, match="model not found"):
        load_teacher(TeacherSpec(model=str(root.path("nowhere"))))
    with pytest.raises(KalmError, match="mine finetune/other first"):
        run_score_recipe(root, "finetune", "other", ScoreConfig())


def test_teacher_scores_reach_the_training_batch(root: DataRoot) -> None:
    """The sampler's candidates carry the teacher score of exactly the positive and negatives it chose."""
    import torch

    from kalm.training.sampler import HomogeneousSampler, ShardSource

    run_score_recipe(root, "finetune", "howto", ScoreConfig(chunk_rows=16))
    rel = scored_dir("finetune", "howto")
    m = root.read_json(f"{rel}/_manifest.json")
    src = ShardSource("howto", [root.path(rel, f["name"]) for f in m["files"]], m["rows_out"], 1.0)
    rows = {r["query"]: r for r in read_rows(root, rel).to_pylist()}
    batch = HomogeneousSampler([src], per_device=6, world=1, rank=0, group_size=4, seed=0).next_batch()
    teacher = batch.candidates.teacher
    assert teacher is not None and teacher.shape == (6, 4)
    for i, (q, docs) in enumerate(zip(batch.queries, batch.docs, strict=True)):
        r = rows[q]
        assert teacher[i, 0].item() == pytest.approx(r["pos_scores"][r["pos"].index(docs[0])])
        for j, d in enumerate(docs[1:], 1):
            if d:
                assert teacher[i, j].item() == pytest.approx(r["neg_scores"][r["neg"].index(d)])
            else:  # padding: no score
                assert torch.isnan(teacher[i, j])


def test_nan_scores_are_counted_skips(root: DataRoot, tiny_cross_encoder: Path, tmp_path: Path) -> None:
    """A teacher whose output is NaN (broken weights): every row is a counted skip, not a crash, and the
    published folder says so."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    broken = tmp_path / "nan-reranker"
    model = BertForSequenceClassification.from_pretrained(tiny_cross_encoder)
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_cross_encoder).save_pretrained(broken)
    cfg = ScoreConfig(teacher=TeacherSpec(kind="cross_encoder", model=str(broken)))
    m = run_score_recipe(root, "finetune", "howto", cfg).manifest
    s = m["stats"]
    assert m["rows_out"] == 0 and s["drops"] == {"no_positive_score": s["rows_in"]} and s["rows_in"] > 0
    assert s["negative_drops"]["row_dropped"] == s["negatives_in"]


def test_cli_scores_and_reports_and_mistakes_are_one_line(root: DataRoot, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kalm.cli import app

    cli = CliRunner()
    res = cli.invoke(app, ["score", "--stage", "finetune", "--data-root", root.uri])
    assert res.exit_code == 0, res.output
    assert "| howto |" in res.output and "Teacher: embedding `minilm`" in res.output
    empty = tmp_path / "empty"
    for args, msg in (
        (["--data-root", str(empty)], "nothing to score"),
        (["--data-root", root.uri, "--recipe", "ghost"], "no mined rows for ['ghost']"),
        (["--data-root", root.uri, "--kind", "reranker"], "teacher.kind"),
    ):
        res = cli.invoke(app, ["score", "--stage", "finetune", *args])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, res.output
