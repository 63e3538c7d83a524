"""Validated configs: every config is a pydantic model that rejects unknown keys, loaded from YAML.

A typo is an error naming the allowed keys, never a silent default (STYLE.md #7)::

    load_model(IngestConfig, {"shard_rowz": 5}, "configs/ingest.yaml")
    # KalmError: configs/ingest.yaml: unknown key 'shard_rowz' (allowed: shard_rows, min_query_chars, ...)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from kalm.core.errors import KalmError
from kalm.core.secrets import scrub

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


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
    return scrub(f"{where}: " + "; ".join(parts))  # an echoed value may be a URL with credentials


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


def config_path(name: str | Path) -> Path:
    """A config file by path (absolute, or relative to the caller's directory), else by name in configs/.

    >>> config_path("mine.yaml") == CONFIG_DIR / "mine.yaml"   # no ./mine.yaml here
    True
    """
    p = Path(name).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    if (CONFIG_DIR / p).exists():
        return CONFIG_DIR / p
    raise KalmError(f"config file not found: {name} (looked in {Path.cwd()} and {CONFIG_DIR})")


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items -> ``{dotted key: value}`` with YAML types.

    ``null``/``~`` are None, ``[a, b]`` a list, ``1e-5`` a float, ``"1"`` (quoted) a string::

        parse_set(["data.recipes=null", "schedule.max_steps=5"])  # {"data.recipes": None, ...: 5}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KalmError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", err)
            raise KalmError(f"--set {key}: invalid YAML value {value!r} ({problem})") from None
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of ``data`` with dotted keys set (``{"schedule.max_steps": 5}``); a key whose parent is not a
    mapping is a one-line KalmError (``--set stage.x=1`` where ``stage`` is a string)."""
    import copy

    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        cur = out
        *parents, leaf = dotted.split(".")
        for i, k in enumerate(parents):
            nxt = cur.setdefault(k, {})
            if not isinstance(nxt, dict):
                at = ".".join(parents[: i + 1])
                raise KalmError(f"{where}: cannot set {dotted!r}: {at!r} is {nxt!r}, not a mapping")
            cur = nxt
        cur[leaf] = value
    return out


def load_yaml_with_overrides(model: type[M], path: str | Path, overrides: dict[str, Any] | None) -> M:
    """Read a YAML config, apply dotted overrides, validate once."""
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise KalmError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return load_model(model, apply_overrides(data, overrides or {}, str(path)), str(path))


def dump_yaml(model: BaseModel) -> str:
    """A validated config as YAML (None as null, every default written out): what a worker reads."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def with_updates(cfg: M, updates: dict[str, Any], where: str = "config") -> M:
    """A validated copy of a parsed config with dotted keys changed (what a DAG decides at run time: the
    run name, the previous stage's model, the recipes), e.g. ``with_updates(cfg, {"model.path": p})``."""
    data = apply_overrides(cfg.model_dump(mode="json"), updates, where)
    return load_model(type(cfg), data, where)


HF_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hf_offline() -> bool:
    """True when Hugging Face downloads are disabled (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``): the
    CLI leaves them to the user (hub sources are online by default); ``make demo``, ``kalm demo`` and the
    tests set them."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in HF_OFFLINE_VARS)
