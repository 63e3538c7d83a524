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
