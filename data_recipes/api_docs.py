"""Fine-tuning retrieval: qualified function signature -> its docstring, from the local stdlib.

The Python form is needed because the query is built from two fields (module + signature) and
private helpers are skipped.
"""

from __future__ import annotations

from typing import Any

from kalm.data.recipes import FilterSpec, Recipe, SourceSpec

RECIPE = Recipe(
    name="api_docs",
    category="api_docs",
    stage="finetune",
    task_type="retrieval",
    language="en",
    tags=["demo"],
    description="Qualified signature -> docstring of public stdlib functions",
    source=SourceSpec(format="python_ast", path="{stdlib}/*.py"),
    instruction="Given a Python function signature, retrieve the documentation of that function",
    filters=FilterSpec(min_query_chars=5, min_doc_chars=30, truncate_chars=1200),
    holdout=0.1,
    max_rows=3000,
)


def to_row(raw: dict[str, Any]) -> dict[str, Any] | None:
    """Skip private names and classes; the positive is the full docstring."""
    if raw["kind"] != "function" or raw["name"].startswith("_"):
        return None
    return {"query": f"{raw['module']}.{raw['signature']}", "pos": raw["docstring"]}
