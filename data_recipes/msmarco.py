"""MS MARCO passage ranking (hub: microsoft/ms_marco, subset v2.1): query -> selected passages.

Layout per row: ``query``, ``query_type``, ``answers`` and
``passages: {is_selected: [int], passage_text: [str], url: [str]}``. Selected passages are
positives; the unselected ones are kept as the source's own negatives.
"""

from __future__ import annotations

from typing import Any

from kalm.data.recipes import Recipe, SourceSpec

RECIPE = Recipe(
    name="msmarco",
    category="web_search",
    stage="finetune",
    task_type="retrieval",
    language="en",
    tags=["public"],
    description="MS MARCO v2.1 queries with their selected passages (Bing search logs)",
    source=SourceSpec(format="hf", path="microsoft/ms_marco", subset="v2.1", split="train"),
    instruction="Given a web search query, retrieve relevant passages that answer the query",
)


def to_row(raw: dict[str, Any]) -> dict[str, Any] | None:
    passages = raw["passages"]
    pairs = list(zip(passages["is_selected"], passages["passage_text"], strict=True))
    pos = [text for sel, text in pairs if sel]
    if not pos:
        return None  # no passage was judged relevant
    return {"query": raw["query"], "pos": pos, "neg": [text for sel, text in pairs if not sel]}
