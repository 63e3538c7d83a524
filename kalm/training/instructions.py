"""Instruction templates: queries get ``Instruct: {instruction} \\n Query: {query}``, documents stay bare.

METHOD.md [reported]: asymmetric tasks (retrieval, reranking, classification) put the instruction on the
query side only; symmetric tasks (STS, pair classification, clustering, bitext) put it on both sides. The
template is configurable; it must contain ``{instruction}`` and ``{query}`` once each.

>>> format_query("what is bm25?", "Given a web search query, retrieve relevant passages")
'Instruct: Given a web search query, retrieve relevant passages \\n Query: what is bm25?'
>>> format_document("BM25 is a ranking function.", "Retrieve passages", symmetric=False)
'BM25 is a ranking function.'
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from kalm.core.config import CONFIG_DIR, StrictModel, load_yaml_model
from kalm.core.schema import SYMMETRIC_TASK_TYPES

log = logging.getLogger(__name__)

# The authors' template; the separator is a real newline with a space on each side.
DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction} \n Query: {query}"
# The pinned evaluation instructions (issue #6): evaluation scores with them, and a saved model folder
# carries them as its sentence-transformers prompts, so both live with the template, here.
DEFAULT_INSTRUCTIONS = CONFIG_DIR / "eval_instructions.yaml"


def validate_template(template: str) -> str:
    """Return ``template``; raise ValueError unless its fields are exactly ``instruction`` and ``query``."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if sorted(fields) != ["instruction", "query"]:
        raise ValueError(
            f"query template must contain '{{instruction}}' and '{{query}}' exactly once and no other "
            f"fields, got {template!r} (fields: {fields})"
        )
    return template


def format_query(text: str, instruction: str | None, template: str | None = DEFAULT_QUERY_TEMPLATE) -> str:
    """The query side: ``template`` filled in; a missing or blank instruction, or no template (an
    un-instructed model), leaves the text bare."""
    if template is None or not instruction or not instruction.strip():
        return text
    return validate_template(template).format(instruction=instruction.strip(), query=text)


def format_document(
    text: str, instruction: str | None, symmetric: bool, template: str | None = DEFAULT_QUERY_TEMPLATE
) -> str:
    """The document side: bare for asymmetric tasks, formatted like a query for symmetric ones."""
    return format_query(text, instruction, template) if symmetric else text


def is_symmetric(task_type: str) -> bool:
    """True for task types whose instruction goes on both sides (``schema.SYMMETRIC_TASK_TYPES``)."""
    return task_type in SYMMETRIC_TASK_TYPES


def prompt_prefix(instruction: str, template: str = DEFAULT_QUERY_TEMPLATE) -> str:
    """The template as a sentence-transformers prompt (a prefix), e.g. ``'Instruct: x \\n Query: '``.

    Only templates that end with ``{query}`` can be expressed as a prefix; others raise ValueError.
    """
    validate_template(template)
    if not template.endswith("{query}"):
        raise ValueError(f"template {template!r} does not end with '{{query}}': it is not a prefix")
    return template.format(instruction=instruction.strip(), query="")


def st_prompts(
    instructions: Mapping[str, str],
    symmetric: Container[str] = (),
    template: str = DEFAULT_QUERY_TEMPLATE,
) -> dict[str, str]:
    """Prompts for a saved model's ``config_sentence_transformers.json``, keyed the way mteb looks them up.

    ``instructions`` maps an mteb task name to its instruction. Asymmetric tasks get a ``"{name}-query"``
    key (documents bare); symmetric ones a plain ``"{name}"`` key (mteb then uses it for both sides).

    >>> st_prompts({"STSBenchmark": "Retrieve semantically similar text"}, symmetric={"STSBenchmark"})
    {'STSBenchmark': 'Instruct: Retrieve semantically similar text \\n Query: '}
    """
    return {
        (name if name in symmetric else f"{name}-query"): prompt_prefix(instr, template)
        for name, instr in instructions.items()
    }


# -- the pinned instructions file -------------------------------------------------------------------
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
    p = Path(path) if path else DEFAULT_INSTRUCTIONS
    return InstructionSet(load_yaml_model(InstructionsFile, p), source=str(p))


def st_prompt_table(ins: InstructionSet, template: str) -> dict[str, str]:
    """Prompts (prefixes) for a model folder, so plain sentence-transformers and mteb format texts as our
    evaluation does: for every task and task type of the pinned file, ``name`` and ``name-query`` -> its
    instruction filled into ``template`` (``""`` where the policy gives none), ``name-document`` -> ``""``
    (documents stay bare); plus ``query`` (the Retrieval default) and ``document`` (``""``). mteb looks a
    prompt up by task name, then task type, then the side, so every task finds ours. A template that does not
    end with ``{query}`` is not a prefix: no prompts (ValueError)."""

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
