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

import string
from collections.abc import Container, Mapping

from kalm.core.schema import SYMMETRIC_TASK_TYPES

# The authors' template; the separator is a real newline with a space on each side.
DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction} \n Query: {query}"


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
