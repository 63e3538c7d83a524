"""A clean training signal (issue #11): no false negatives from our own data.

The loss cases are built by hand (unit vectors, a tiny τ) so the expected per-query losses are known in
closed form; the data cases run the real ingest, mixtures and miner (all-MiniLM-L6-v2) on small recipes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kalm.core.layout import mined_dir, mixture_dir
from kalm.core.storage import DataRoot, read_manifest, read_rows
from kalm.data.config import IngestConfig
from kalm.data.ingest import run_ingest_recipe
from kalm.data.mixtures import run_build_stage
from kalm.data.recipes import discover
from kalm.training.losses import HardNegativeMixer, InfoNCE, MatryoshkaLoss
from kalm.training.losses.base import shared_draws
from kalm.training.losses.candidates import NO_LABEL, PAD, SCOPES, Candidates, candidate_masks, text_key
from kalm.training.sampler import PAD_TEXT, HomogeneousSampler, ShardSource
from tests.conftest import write_jsonl

TAU = 0.01


# -- the candidate mask ------------------------------------------------------------------------------------


def test_mask_removes_exact_copies_of_the_positive() -> None:
    """Row 0 has no negatives; the old sampler gave it the other rows' positives as negatives, so under
    batch scope every other query met an exact copy of its own positive: losses [0, log 2, log 2, log 2].
    The candidate mask (keys of normalised texts) removes the copies: all 0."""
    e = torch.eye(4)
    q = p = e
    n = torch.stack([e[[1, 2, 3]], -e[[1, 1, 1]], -e[[2, 2, 2]], -e[[3, 3, 3]]])  # rows 1-3: far negatives
    loss = InfoNCE(temperature=TAU, cross_device=False)
    before = loss.per_query(q, p, n)
    assert before.tolist() == pytest.approx([0.0, math.log(2), math.log(2), math.log(2)], abs=1e-6)
    texts = ["pos a", "pos b", "pos c", "pos d"]
    neg_texts = [["pos b", "pos c", "pos d"], ["x1", "x2", "x3"], ["y1", "y2", "y3"], ["z1", "z2", "z3"]]
    cands = Candidates(
        pos_key=torch.tensor([text_key(t) for t in texts]),
        pos_label=torch.full((4,), NO_LABEL),
        neg_key=torch.tensor([[text_key(t) for t in row] for row in neg_texts]),
        neg_label=torch.full((4, 3), NO_LABEL),
    )
    after = loss.per_query(q, p, n, cands)
    assert after.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0], abs=1e-6)
    assert text_key("Pos  B") == text_key("pos b")  # the comparison form: case and spaces


def test_mask_same_label_padding_and_in_batch_scopes() -> None:
    # rows 0 and 1 share class 7; row 2 is class 8; row 3 has no class
    cands = Candidates(
        pos_key=torch.tensor([1, 2, 3, 4]),
        pos_label=torch.tensor([7, 7, 8, NO_LABEL]),
        neg_key=torch.tensor([[5, PAD], [6, 1], [9, 10], [11, 12]]),
        neg_label=torch.tensor([[8, NO_LABEL], [8, 7], [7, NO_LABEL], [NO_LABEL, NO_LABEL]]),
        scope=torch.tensor([SCOPES["batch"], SCOPES["batch"], SCOPES["own"], SCOPES["none"]]),
    )
    pos, neg = candidate_masks(cands, offset=0, n=4, hard_negatives="batch")
    assert not pos.diagonal().any()  # a query's own positive is never masked
    assert pos[0].tolist() == [False, True, False, False]  # row 1's positive: same class 7
    assert pos[3].tolist() == [True, True, True, False]  # scope none: only its own group
    neg = neg.view(4, 4, 2)  # query, owning row, slot
    assert neg[0, 0].tolist() == [False, True]  # its own padding slot
    assert neg[0, 1].tolist() == [False, True]  # row 1's 2nd negative is a copy of query 0's positive
    assert neg[0, 2].tolist() == [True, False]  # row 2's 1st negative is class 7: query 0's class
    assert neg[2].tolist() == [[True, True], [True, True], [False, False], [True, True]]  # scope own
    assert not neg[3, 3].any() and neg[3, :3].all()  # scope none: its own negatives only


# -- the sampler -----------------------------------------------------------------------------------------


def _shard(tmp_path: Path, rows: list[dict]) -> ShardSource:
    tmp_path.mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    from kalm.core.schema import row_id, rows_to_table

    full = [
        {
            "id": row_id(r["query"], r["pos"][0]),
            "instruction": "",
            "symmetric": False,
            "category": "c",
            "task_type": "retrieval",
            "recipe": "r",
            "stage": "finetune",
            "lang": "en",
            "neg_labels": [],
            "label": "",
            **r,
        }
        for r in rows
    ]
    path = tmp_path / "part.parquet"
    pq.write_table(rows_to_table(full), path)
    return ShardSource("r", [str(path)], len(full), 1.0)


def test_sampler_pads_instead_of_borrowing_or_repeating(tmp_path: Path) -> None:
    rows = [
        {"query": "q0", "pos": ["p0"], "neg": []},  # no negatives: padding, never the others' positives
        {"query": "q1", "pos": ["p1"], "neg": ["n1", "N1 ", "n1"]},  # one distinct negative, repeated
        {"query": "q2", "pos": ["p2"], "neg": ["a", "b", "c", "d"]},
    ]
    sampler = HomogeneousSampler(
        [_shard(tmp_path, rows)], per_device=3, world=1, rank=0, group_size=4, seed=0
    )
    batch = sampler.next_batch()
    docs = dict(zip(batch.queries, batch.docs, strict=True))
    assert docs["q0"] == ["p0", PAD_TEXT, PAD_TEXT, PAD_TEXT]
    assert docs["q1"][1] in ("n1", "N1 ") and docs["q1"][2:] == [PAD_TEXT, PAD_TEXT]
    assert sorted(docs["q2"][1:]) == sorted(set(docs["q2"][1:])) and len(docs["q2"]) == 4
    c = batch.candidates
    row = {q: i for i, q in enumerate(batch.queries)}
    assert (c.neg_key[row["q0"]] == PAD).all() and int((c.neg_key[row["q1"]] == PAD).sum()) == 2
    assert sampler.rows_without_negatives == 1
    # rows without a class are unlabelled: nothing of theirs is masked as "same class"
    assert (c.pos_label == NO_LABEL).all() and (c.neg_label == NO_LABEL).all()
    pos_mask, neg_mask = candidate_masks(c, 0, 3, "batch")
    assert not pos_mask.any() and int(neg_mask.sum()) == 3 * 5  # only the 5 padding slots, for every query


def test_sampler_labels_classes_and_the_loss_learns_from_unlabelled_rows(tmp_path: Path) -> None:
    """A labelled batch masks same-class candidates; an unlabelled one keeps every in-batch negative, so
    its loss is not zero (a labelling bug once made every row one class and the loss 0)."""
    rows = [
        {
            "query": f"q{i}",
            "pos": [f"p{i}"],
            "neg": [f"n{i}"],
            "label": "ab"[i % 2],
            "neg_labels": ["ba"[i % 2]],
        }
        for i in range(4)
    ]
    sampler = HomogeneousSampler(
        [_shard(tmp_path, rows)], per_device=4, world=1, rank=0, group_size=2, seed=0
    )
    c = sampler.next_batch().candidates
    assert sorted(set(c.pos_label.tolist())) == [0, 1] and (c.neg_label != c.pos_label[:, None]).all()
    pos_mask, _ = candidate_masks(c, 0, 4, "batch")
    assert int(pos_mask.sum()) == 4  # each query loses the one other row of its class
    plain = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": []} for i in range(4)]
    c2 = HomogeneousSampler(
        [_shard(tmp_path / "b", plain)], per_device=4, world=1, rank=0, group_size=1, seed=0
    )
    q = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    loss = InfoNCE(temperature=0.05, cross_device=False).per_query(
        q, q.flip(0), None, c2.next_batch().candidates
    )
    assert (loss > 0.1).all()


# -- mixing ----------------------------------------------------------------------------------------------


def test_mixing_a_single_repeated_negative_is_skipped_not_degenerate() -> None:
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    p = F.normalize(q + 0.3 * torch.randn(3, 8, generator=g), dim=-1)
    one = F.normalize(torch.randn(3, 1, 8, generator=g), dim=-1)
    n = one.expand(3, 4, 8).contiguous()  # one real negative repeated four times
    mixer = HardNegativeMixer(k=2, top_n=4, seed=0)
    mixed = InfoNCE(temperature=0.05, hard_negatives="own", cross_device=False, mixer=mixer).per_query(
        q, p, n
    )
    plain = InfoNCE(temperature=0.05, hard_negatives="own", cross_device=False).per_query(q, p, n)
    assert mixer.skipped == 3 * 2  # no synthetic was made from the copy and itself
    torch.testing.assert_close(mixed, plain)
    # padding slots are never mixed either
    valid = torch.tensor([[True, False, False, False]] * 3)
    _, ok = HardNegativeMixer(k=2, top_n=4, seed=0).mix(q, F.normalize(torch.randn(3, 4, 8), dim=-1), valid)
    assert ok is not None and not ok.any()


def test_one_mixer_draw_per_step_shared_by_every_matryoshka_dim_and_the_metrics() -> None:
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    p = F.normalize(q + 0.3 * torch.randn(4, 16, generator=g), dim=-1)
    n = F.normalize(q.unsqueeze(1) + torch.randn(4, 5, 16, generator=g), dim=-1)
    mixer = HardNegativeMixer(k=2, top_n=4, seed=3)
    loss = MatryoshkaLoss(InfoNCE(temperature=0.05, cross_device=False, mixer=mixer), dims=[16, 8, 4])
    reference = HardNegativeMixer(k=2, top_n=4, seed=3)
    reference.mix(q, n)  # exactly one draw
    with shared_draws(loss):
        loss(q, p, n)
        drawn = {k: v.clone() for k, v in mixer.last_draw.items()}
        loss.inner.per_query(q, p, n)  # what the run log computes after the loss: the same draw
        assert all(torch.equal(drawn[k], mixer.last_draw[k]) for k in drawn)
    assert torch.equal(mixer.generator.get_state(), reference.generator.get_state())
    assert all(torch.equal(drawn[k], reference.last_draw[k]) for k in ("idx_a", "idx_b", "lam"))


# -- labelled recipes: ingest and mining -------------------------------------------------------------------

TOPICS = {
    "astronomy": ["telescope", "galaxy", "orbit", "comet", "nebula", "planet", "star", "eclipse"],
    "cooking": ["recipe", "oven", "flour", "sauce", "simmer", "garlic", "butter", "knead"],
    "finance": ["interest", "stock", "bond", "dividend", "loan", "budget", "invoice", "equity"],
    "sailing": ["harbor", "mast", "keel", "anchor", "sail", "tide", "rudder", "knot"],
}


def labelled_rows(per_label: int = 30) -> list[dict[str, str]]:
    import random

    rng = random.Random(0)
    out = []
    for label, words in TOPICS.items():
        for i in range(per_label):
            out.append({"text": f"{label} note {i}: " + " ".join(rng.choices(words, k=9)), "topic": label})
    return out


CLS_YAML = """\
name: topics
category: topics
stage: finetune
task_type: classification
source: {format: jsonl, path: "raw/topics/*.jsonl"}
fields: {text: text, label: topic}
instruction: "Classify the topic of the note"
negatives_per_row: 5
"""


def test_labelled_recipe_keeps_labels_and_mining_never_picks_a_same_label_negative(
    recipe_dir, tmp_path: Path
) -> None:
    from kalm.mining.config import MineConfig
    from kalm.mining.encode import load_encoder
    from kalm.mining.mine import run_mine_recipe

    folder = recipe_dir("topics", labelled_rows(), yaml_text=CLS_YAML)
    root = DataRoot.from_uri(str(tmp_path / "data"))
    run_ingest_recipe(discover([folder]).get("topics"), root, IngestConfig())
    run_build_stage("finetune", ["topics"], root, IngestConfig(decontamination={"enabled": False}))
    before = read_rows(root, mixture_dir("finetune", "topics")).to_pylist()
    label_of = {r["query"]: r["label"] for r in before}
    assert set(label_of.values()) == set(TOPICS)
    assert all(len(r["neg_labels"]) == len(r["neg"]) and r["label"] not in r["neg_labels"] for r in before)
    cfg = MineConfig(window=(5, 60), top_k=60, num_negatives=5, min_negatives=1, precision="fp32")
    res = run_mine_recipe(root, "finetune", "topics", "minilm", cfg, encoder=load_encoder("minilm", root))
    after = read_rows(root, mined_dir("finetune", "topics")).to_pylist()
    negatives = [(r["label"], n) for r in after for n in r["neg"]]
    assert len(after) > 40 and len(negatives) > 200
    assert sum(1 for lab, n in negatives if label_of.get(n) == lab) == 0  # was 49% before the filter
    assert res.manifest["stats"]["excluded"].get("same_label", 0) > 0  # the filter did act
    assert all(r["neg_labels"] == [label_of[n] for n in r["neg"]] for r in after)  # labels travel on


# -- dedup -----------------------------------------------------------------------------------------------


def test_case_only_and_cross_recipe_near_duplicates_are_dropped(recipe_dir, tmp_path: Path) -> None:
    base = [
        {
            "question": f"How do I configure the {w} module for a large cluster?",
            "answer": f"Set {w}.size and restart every node of the {w} service; then check its log.",
        }
        for w in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
    ]
    shouting = [{"question": r["question"].upper(), "answer": r["answer"].upper()} for r in base[:3]]
    recipe_dir("a_first", base + shouting)  # case-only copies within one recipe
    near = [{"question": r["question"].replace("?", " please?"), "answer": r["answer"]} for r in base[3:6]]
    folder = recipe_dir(
        "b_second",
        near
        + [{"question": "Something else entirely?", "answer": "An unrelated answer about tea and biscuits."}],
    )
    root = DataRoot.from_uri(str(tmp_path / "data"))
    found = discover([folder])
    first = run_ingest_recipe(found.get("a_first"), root, IngestConfig())
    # the uppercase copies are exact duplicates of the comparison form (ids fold case) or near ones
    assert first.rows == 8 and sum(first.manifest["drops"].get(k, 0) for k in ("exact_dup", "near_dup")) == 3
    run_ingest_recipe(found.get("b_second"), root, IngestConfig())
    res = {
        r.name: r
        for r in run_build_stage(
            "finetune", ["a_first", "b_second"], root, IngestConfig(decontamination={"enabled": False})
        )
    }
    assert res["b_second"].manifest["drops"] == {"cross_recipe_near_dup": 3}  # attributed to the loser
    assert res["b_second"].rows == 1 and res["a_first"].rows == 8


def test_decontamination_against_the_eval_configs_tasks(recipe_dir, tmp_path: Path) -> None:
    """A training row whose query is a text of an evaluation task the eval config names is dropped."""
    from kalm.evaluation.config import load_eval_config
    from kalm.pipeline.data import run_data
    from kalm.pipeline.runner import LocalRunner
    from tests.conftest import faq_rows

    rows = faq_rows(12, "ev")
    task = tmp_path / "task.jsonl"
    write_jsonl(task, [{"query": rows[0]["question"], "pos": ["some document"]}])
    ev = tmp_path / "eval.yaml"
    ev.write_text(json.dumps({"local_tasks": [{"name": "MyTask", "type": "retrieval", "path": str(task)}]}))
    folder = recipe_dir("evr", rows)
    found = discover([folder])
    root = DataRoot.from_uri(str(tmp_path / "data"))
    _, mixtures = run_data(
        LocalRunner(),
        [found.get("evr")],
        [found.get("evr")],
        root,
        IngestConfig(),
        eval_cfg=load_eval_config(ev),
    )
    (m,) = mixtures
    assert m.manifest["drops"] == {"contaminated": 1} and m.rows == 11
    assert read_manifest(root, mixture_dir("finetune", "evr"))["rows_out"] == 11
