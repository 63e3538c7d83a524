"""The model card (kalm/core/modelcard.py): Hub metadata, data by recipe, losses, lineage with relative
paths, and a scores section the eval stage replaces in place (the e2e DAG test checks real runs' cards)."""

from __future__ import annotations

from pathlib import Path

from kalm.core.modelcard import soup_card, training_card, with_scores

RUN = {
    "stage": "finetune",
    "run_name": "demo-finetune-seed0",
    "base_model": "sentence-transformers/all-MiniLM-L6-v2",
    "width": 384,
    "steps": 30,
    "world_size": 2,
    "final_loss": 0.79275,
    "config": {"per_device_batch": 8, "optim": {"lr": 2e-05}, "data": {"group_size": 4}},
    "loss": {"name": "matryoshka", "dims": [384, 128], "inner": {"name": "infonce", "temperature": 0.05}},
    "mixture": {"sources": {"api_docs": {"rows": 1665, "p": 0.97, "recipes": ["api_docs"]}}, "dropped": {}},
}


def rows(label: str, score: float) -> list[dict]:
    return [
        {
            "label": label,
            "task": t,
            "task_type": "Retrieval",
            "metric": "ndcg_at_10",
            "dim": d,
            "main_score": score,
        }
        for t in ("A", "B")
        for d in (384, 128)
    ]


def test_training_and_soup_cards(tmp_path: Path) -> None:
    root = tmp_path / "data"
    run = {**RUN, "model_dir": str(root / "runs/pretrain/p/final")}
    card = training_card(run, root, {"query": "Instruct: x \n Query: "})
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and 'prompt_name="query"' in card
    assert (
        "| api_docs | api_docs | 1665 | 0.97 |" in card
        and "Matryoshka (dims [384, 128]) over InfoNCE" in card
    )
    assert "8 per device x 2 device(s) = 16 queries" in card and "`runs/pretrain/p/final`" in card
    assert str(tmp_path) not in card
    record = {"method": "uniform", "weights": [0.5, 0.5], "fingerprint": "f", "inputs": [
        {"path": str(root / f"runs/finetune/s{i}/final"), "fingerprint": str(i)} for i in range(2)
    ]}  # fmt: skip
    soup = soup_card(record, run, root, {})
    assert "# Model soup" in soup and "`runs/finetune/s1/final` (fingerprint `1`, weight 0.500)" in soup
    assert "## Lineage" not in soup and "Texts are encoded bare" in soup


def test_scores_section_is_replaced_not_appended() -> None:
    card = training_card(RUN, None, {})
    once = with_scores(card, rows("soup", 0.8), rows("base", 0.7))
    assert "| A | Retrieval | ndcg_at_10 | 80.00 | 70.00 | +10.00 |" in once
    assert once.index("## Scores") < once.index("## Lineage")
    twice = with_scores(once, rows("soup", 0.9), rows("base", 0.7))
    assert (
        twice.count("## Scores") == 1 and "| B | Retrieval | ndcg_at_10 | 90.00 | 70.00 | +20.00 |" in twice
    )
    assert "80.00" not in twice and twice.endswith("\n") and "## Lineage" in twice
