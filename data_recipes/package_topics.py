"""Fine-tuning classification: a package's one-line summary, labelled by its first "Topic ::" classifier.

Becomes (query, positive, negatives) by example-based multi-class labelling (METHOD.md): the positive is
another summary with the same topic, negatives are summaries of other topics.
"""

from __future__ import annotations

from typing import Any

from kalm.data.recipes import FilterSpec, Recipe, SourceSpec

RECIPE = Recipe(
    name="package_topics",
    category="package_topics",
    stage="finetune",
    task_type="classification",
    language="en",
    tags=["demo"],
    description="Package summary classified by its PyPI topic classifier",
    source=SourceSpec(format="pkg_metadata", path="*"),
    instruction="Classify the topic of a software package from its one-line summary",
    filters=FilterSpec(min_query_chars=10),
    negatives_per_row=7,
)


def to_row(raw: dict[str, Any]) -> dict[str, Any] | None:
    topics = raw.get("topics") or []
    if not topics or not raw.get("summary"):
        return None
    return {"text": raw["summary"], "label": topics[0]}
