"""Validated configs: every config is a pydantic model that rejects unknown keys, loaded from YAML.

A typo is an error naming the allowed keys, never a silent default (STYLE.md #7)::

    load_model(IngestConfig, {"shard_rowz": 5}, "configs/ingest.yaml")
    # KalmError: configs/ingest.yaml: unknown key 'shard_rowz' (allowed: shard_rows, min_query_chars, ...)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from kalm.errors import KalmError


class StrictModel(BaseModel):
    """Base of every config: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def config_hash(self) -> str:
        """Stable 12-hex-digit hash of the full, defaults-included config."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


M = TypeVar("M", bound=BaseModel)


def _allowed(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at a nested location of ``model`` (best effort)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        ann = getattr(field, "annotation", None)
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(getattr(current, "model_fields", {}).keys()) if current is not None else []


def format_validation_error(err: ValidationError, model: type[BaseModel], where: str) -> str:
    """One line per problem, joined with '; ' so the CLI prints a single line."""
    parts = []
    for e in err.errors():
        loc = tuple(e.get("loc", ()))
        dotted = ".".join(str(p) for p in loc) or "<root>"
        if e.get("type") == "extra_forbidden":
            allowed = _allowed(model, loc)
            parts.append(f"unknown key '{dotted}' (allowed: {', '.join(allowed)})")
        elif e.get("type") == "missing":
            parts.append(f"missing key '{dotted}'")
        else:
            parts.append(f"'{dotted}': {e.get('msg')} (got {e.get('input')!r})")
    return f"{where}: " + "; ".join(parts)


def load_model(model: type[M], data: Any, where: str) -> M:
    """Validate ``data`` (a dict from YAML) into ``model`` or raise a one-line KalmError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KalmError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise KalmError(format_validation_error(err, model, where)) from None


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise KalmError(f"config file not found: {p}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise KalmError(f"{p}:{at} invalid YAML: {getattr(err, 'problem', err)}") from None


def load_yaml_model(model: type[M], path: str | Path) -> M:
    return load_model(model, read_yaml(path), str(path))
