"""Evaluation instructions, pinned in a versioned file so a score can be reproduced.

KaLM policy (METHOD.md, issue #6): no instruction for STS, pair classification and summarisation; one per
task for classification, clustering and retrieval/reranking queries; retrieval documents stay bare. The
file ``configs/eval_instructions.yaml`` holds a default per mteb task type and one entry per task; a task
entry wins over its type's default, and ``null`` means "no instruction" at either level.

Queries are formatted with the model's own template when its ``config_sentence_transformers.json``
holds one (key ``kalm_query_template``, written by ``kalm.training.model.Embedder``; the pinned file and
its lookup live in ``kalm.training.instructions``, since a saved model carries them as its prompts). A
model without one was not trained with instructions (a base model such as all-MiniLM-L6-v2): by default
it gets none (``untemplated_models: plain``), so a comparison scores every model the way it is meant to be
used; ``untemplated_models: template`` applies the file's template to it instead.

>>> ins = load_instructions()
>>> ins.lookup("SciFact", "Retrieval")
('Given a scientific claim, retrieve documents that support or refute the claim', 'task')
>>> ins.lookup("STSBenchmark", "STS")
(None, 'task')
>>> ins.lookup("SomeNewSTS", "STS")
(None, 'task_type')
>>> format_query("what is bm25?", "Given a query, retrieve passages")
'Instruct: Given a query, retrieve passages \\n Query: what is bm25?'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kalm.core.errors import KalmError

# One template grammar for training and evaluation: the same constant, formatter and validator.
from kalm.training.instructions import (
    DEFAULT_QUERY_TEMPLATE,
    InstructionSet,
    InstructionsFile,
    default_prompt_table,
    format_query,
    load_instructions,
    st_prompt_table,
    validate_template,
)

__all__ = [
    "DEFAULT_QUERY_TEMPLATE",
    "InstructionSet",
    "InstructionsFile",
    "default_prompt_table",
    "format_query",
    "load_instructions",
    "model_query_template",
    "st_prompt_table",
    "validate_template",
]


def eval_template(model_folder: str | Path, ins: InstructionSet) -> str | None:
    """The template an evaluation formats this model's queries with; None = plain texts, no instruction
    (a model without its own template, under ``untemplated_models: plain``)."""
    own = model_query_template(model_folder)
    if own is not None or ins.file.untemplated_models == "plain":
        return own
    return ins.file.template


def model_query_template(model_folder: str | Path) -> str | None:
    """The raw query template a model folder carries (``prompts.query_template``), if any and valid."""
    cfg_path = Path(model_folder) / "config_sentence_transformers.json"
    if not cfg_path.is_file():
        return None
    # the key Embedder.save writes; imported here, not at the top: kalm.training.model pulls in
    # transformers (~3 s), which a fully cached evaluation never needs otherwise
    from kalm.training.model import read_query_template

    try:
        st_config: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KalmError(f"{cfg_path}: invalid JSON ({err})") from None
    template = read_query_template(st_config)
    if not template:
        return None
    try:
        return validate_template(str(template))
    except ValueError as err:
        raise KalmError(f"{cfg_path}: prompts.query_template: {err}") from None


def draft_instructions(task_names: list[str]) -> dict[str, str | None]:
    """A starting point for new ``tasks`` entries: mteb's own query prompts, with the KaLM policy applied.

    Used by hand when adding tasks to the pinned file (never at evaluation time: mteb upgrades may change
    its prompts, and the pinned file must not follow them silently).
    """
    import mteb

    out: dict[str, str | None] = {}
    for name in task_names:
        md = mteb.get_task(name).metadata
        prompt = md.prompt.get("query") if isinstance(md.prompt, dict) else md.prompt
        prompt = prompt if isinstance(prompt, str) else None
        out[name] = None if md.type in ("STS", "PairClassification", "Summarization") else prompt
    return out
