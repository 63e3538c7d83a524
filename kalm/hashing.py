"""Fingerprints for caching and lineage: content hashes of files, objects and configs."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def hash_obj(obj: Any, n: int = 16) -> str:
    """Hash of a JSON-serialisable object, e.g. ``hash_obj({"a": 1})`` -> 16 hex digits."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def hash_bytes(data: bytes, n: int = 16) -> str:
    return hashlib.sha256(data).hexdigest()[:n]


def hash_model_dir(path: str, n: int = 16) -> str:
    """Content hash of a model folder's weights and configs (safetensors, json, tokenizer files).

    Streams the files, so a multi-GB checkpoint costs seconds, not memory."""
    from pathlib import Path

    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".txt")
    ):
        if f.name == "kalm_run.json":
            continue  # run metadata (timestamps) is not the model
        h.update(str(f.relative_to(root)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:n]
