"""Evaluation instructions, pinned in a versioned file so a score can be reproduced.

KaLM policy (METHOD.md, issue #6): no instruction for STS, pair classification and summarisation; one per
task for classification, clustering and retrieval/reranking queries; retrieval documents stay bare. The
file ``configs/eval_instructions.yaml`` holds a default per mteb task type and one entry per task; a task
entry wins over its type's default, and ``null`` means "no instruction" at either level.

Queries are formatted with the model's own template when its ``config_sentence_transformers.json``
``prompts`` holds one (key ``query_template``, written by ``kalm.training.model.Embedder``). A model without
one was not trained with instructions (a base model such as all-MiniLM-L6-v2): by default it gets none
(``untemplated_models: plain``), so a comparison scores every model the way it is meant to be used;
``untemplated_models: template`` applies the file's template to it instead.

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

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from kalm.core.config import StrictModel, load_yaml_model
from kalm.core.errors import KalmError

# One template grammar for training and evaluation: the same constant, formatter and validator.
from kalm.training.instructions import DEFAULT_QUERY_TEMPLATE, format_query, validate_template

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_QUERY_TEMPLATE",
    "InstructionSet",
    "InstructionsFile",
    "format_query",
    "load_instructions",
    "model_query_template",
    "validate_template",
]


class InstructionsFile(StrictModel):
    """The pinned file: ``version``, ``template``, ``task_types`` defaults and per-``tasks`` entries."""

    version: str
    template: str = DEFAULT_QUERY_TEMPLATE
    untemplated_models: Literal["plain", "template"] = "plain"
    task_types: dict[str, str | None] = {}
    tasks: dict[str, str | None] = {}

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        return validate_template(v)


@dataclass(frozen=True)
class InstructionSet:
    """Instruction lookup for one evaluation run: the pinned file plus local tasks' own overrides."""

    file: InstructionsFile
    source: str = ""
    overrides: dict[str, str | None] = field(default_factory=dict)

    def with_overrides(self, overrides: dict[str, str | None]) -> InstructionSet:
        """A copy where ``overrides`` (task name -> instruction, ``""``/``None`` = none) win."""
        return InstructionSet(self.file, self.source, {**self.overrides, **overrides})

    def lookup(self, task_name: str, task_type: str) -> tuple[str | None, str]:
        """``(instruction or None, where it came from)``; where: override | task | task_type | none."""
        if task_name in self.overrides:
            return (self.overrides[task_name] or None), "override"
        if task_name in self.file.tasks:
            return self.file.tasks[task_name], "task"
        if task_type in self.file.task_types:
            return self.file.task_types[task_type], "task_type"
        return None, "none"

    @property
    def version(self) -> str:
        return self.file.version

    def digest(self) -> str:
        """12 hex digits of the file's content plus overrides: changes whenever an instruction changes."""
        blob = json.dumps([self.file.model_dump(), self.overrides], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def load_instructions(path: str | Path | None = None) -> InstructionSet:
    """Load the pinned instructions file (default ``configs/eval_instructions.yaml``)."""
    from kalm.evaluation.config import DEFAULT_INSTRUCTIONS

    p = Path(path) if path else DEFAULT_INSTRUCTIONS
    return InstructionSet(load_yaml_model(InstructionsFile, p), source=str(p))


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


def st_prompt_table(ins: InstructionSet, template: str) -> dict[str, str]:
    """Prompts (prefixes) for a model folder, so plain sentence-transformers and mteb format texts as our
    evaluation does: for every task and task type of the pinned file, ``name`` and ``name-query`` -> its
    instruction filled into ``template`` (``""`` where the policy gives none), ``name-document`` -> ``""``
    (documents stay bare); plus ``query`` (the Retrieval default) and ``document`` (``""``). mteb looks a
    prompt up by task name, then task type, then the side, so every task finds ours. A template that does not
    end with ``{query}`` is not a prefix: no prompts (ValueError)."""
    from kalm.training.instructions import prompt_prefix

    def prefix(instruction: str | None) -> str:
        return prompt_prefix(instruction, template) if instruction else ""

    table: dict[str, str] = {}
    for name, instruction in {**ins.file.task_types, **ins.file.tasks}.items():
        table[name] = table[f"{name}-query"] = prefix(instruction)
        table[f"{name}-document"] = ""
    table["query"] = prefix(ins.file.task_types.get("Retrieval"))
    table["document"] = ""
    return table


def default_prompt_table(template: str) -> dict[str, str]:
    """:func:`st_prompt_table` of the pinned file for a template; ``{}`` (logged) when it is no prefix."""
    try:
        return st_prompt_table(load_instructions(), template)
    except ValueError as err:
        log.warning("no sentence-transformers prompts saved: %s", err)
        return {}


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
