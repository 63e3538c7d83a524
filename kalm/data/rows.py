"""Raw record -> canonical row: field mapping (or a recipe's ``to_row``), normalisation and filters.

Each function returns either a result or a drop *reason* (a short string) that the caller counts, so
every lost row is accounted for (STYLE.md #6).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from kalm.data.normalize import has_invalid_unicode, normalize_text
from kalm.data.recipes import FilterSpec, LoadedRecipe

log = logging.getLogger(__name__)
_MISSING = object()


def get_path(rec: Any, dotted: str) -> Any:
    """``get_path({"a": {"b": [5, 6]}}, "a.b.1") == 6``; missing parts give a sentinel."""
    cur = rec
    for part in dotted.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part, _MISSING)
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
        if cur is _MISSING:
            return _MISSING
    return cur


def _as_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return None


def _as_text_list(v: Any) -> list[str] | None:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    return None


def map_record(rec: dict[str, Any], lr: LoadedRecipe) -> dict[str, Any] | str:
    """Canonical partial row ``{query, pos, neg, text, label, score, instruction}`` or a drop reason."""
    r = lr.recipe
    if lr.to_row is not None:
        try:
            out = lr.to_row(rec)
        except Exception as err:  # a bad record must not take its neighbours down
            _warn_adapter(r.name, err)
            return "adapter_error"
        if out is None:
            return "adapter_skip"
        if not isinstance(out, dict):
            return "adapter_error"
        rec, fields = out, {k: k for k in out}
    else:
        fields = r.fields
    row: dict[str, Any] = {}
    for target, src in fields.items():
        v = get_path(rec, src)
        if v is _MISSING or v is None:
            if target in ("neg", "instruction", "score"):
                continue
            return "missing_field"
        if target in ("pos", "neg"):
            lst = _as_text_list(v)
            if lst is None:
                return "bad_type"
            row[target] = lst
        elif target == "score":
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                return "bad_type"
            row[target] = float(v)
        elif target == "label":
            if isinstance(v, (dict, list)):
                return "bad_type"
            row[target] = str(v)
        else:
            text = _as_text(v)
            if text is None:
                return "bad_type"
            row[target] = text
    first, second = ("text", "label") if r.label_based else ("query", "pos")
    if first not in row or second not in row:
        return "missing_field"  # e.g. a to_row that left out a field
    return row


_ADAPTER_WARNINGS: Counter[str] = Counter()
MAX_ADAPTER_WARNINGS = 5  # per recipe and process; every failure is counted in the stats either way


def _warn_adapter(recipe: str, err: Exception) -> None:
    _ADAPTER_WARNINGS[recipe] += 1
    n = _ADAPTER_WARNINGS[recipe]
    if n <= MAX_ADAPTER_WARNINGS:
        more = " (further failures are counted, not logged)" if n == MAX_ADAPTER_WARNINGS else ""
        log.warning("%s: to_row failed on a record, skipped: %s: %s%s", recipe, type(err).__name__, err, more)


def clean_row(row: dict[str, Any], f: FilterSpec, stats: Counter[str]) -> dict[str, Any] | str:
    """Normalise and length-filter a (query, pos, neg) row; bad negatives are removed and counted."""
    for t in [row.get("query", "")] + list(row.get("pos", ())) + list(row.get("neg", ())):
        if has_invalid_unicode(t):
            return "invalid_utf8"
    q = normalize_text(row.get("query", ""))
    if not q:
        return "empty_query"
    if len(q) < f.min_query_chars:
        return "query_too_short"
    if len(q) > f.max_query_chars:
        return "query_too_long"
    pos, reason = _clean_docs(row.get("pos", []), f)
    if not pos:
        return reason or "empty_pos"
    pos_keys = {p.casefold() for p in pos}
    neg, _ = _clean_docs(row.get("neg", []), f)
    kept_neg = [n for n in neg if n.casefold() not in pos_keys and n.casefold() != q.casefold()]
    if len(kept_neg) < len(row.get("neg", [])):
        stats["neg_removed"] += len(row.get("neg", [])) - len(kept_neg)
    return {**row, "query": q, "pos": pos, "neg": list(dict.fromkeys(kept_neg))}


def _clean_docs(docs: list[str], f: FilterSpec) -> tuple[list[str], str | None]:
    out, reason = [], None
    for d in docs:
        d = normalize_text(d, keep_newlines=f.keep_newlines)
        if f.truncate_chars and len(d) > f.truncate_chars:
            d = d[: f.truncate_chars]
        if not d:
            reason = reason or "empty_pos"
        elif len(d) < f.min_doc_chars:
            reason = "pos_too_short"
        elif len(d) > f.max_doc_chars:
            reason = "pos_too_long"
        else:
            out.append(d)
    return list(dict.fromkeys(out)), reason


def clean_text(text: str, f: FilterSpec) -> str | tuple[None, str]:
    """Normalise and filter a single classification/clustering text."""
    if has_invalid_unicode(text):
        return (None, "invalid_utf8")
    t = normalize_text(text, keep_newlines=f.keep_newlines)
    if f.truncate_chars:
        t = t[: f.truncate_chars]
    if not t:
        return (None, "empty_text")
    if len(t) < f.min_query_chars:
        return (None, "text_too_short")
    if len(t) > f.max_doc_chars:
        return (None, "text_too_long")
    return t
