"""The one fingerprint of a model: a content hash of its folder, used by training (job keys), mining
(lineage, stale negatives, the embedding cache) and evaluation (result caching).

It hashes every file's relative path and bytes except :data:`NOT_FINGERPRINTED` and hidden files, so a copy
of a folder has the same fingerprint and any change to weights, configs, tokenizer or prompts gives a new
one. Run records (``kalm_run.json``, ``soup.json``) and the model card carry timestamps and are left out: a
rebuilt, bit-identical model keeps its fingerprint. Results are cached in-process on (path, size, mtime) of
every file, so greedy soups and repeated stage calls do not re-hash a multi-GB checkpoint.

>>> model_fingerprint(minilm_path)  # doctest: +SKIP
'3f2a9c0d1b7e4a55'
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from kalm.core.errors import KalmError

FINGERPRINT_DIGITS = 16
NOT_FINGERPRINTED = frozenset({"README.md", ".gitattributes", "soup.json", "kalm_run.json"})

_cache: dict[tuple[Any, ...], str] = {}


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, streamed in 4 MiB chunks (weights can be many GB)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprinted_files(root: Path) -> list[Path]:
    """The files a fingerprint covers, sorted: everything but run records and hidden files."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.name not in NOT_FINGERPRINTED
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def model_fingerprint(folder: str | Path) -> str:
    """16 hex digits identifying what a model folder computes (any transformers or sentence-transformers
    folder). A one-line KalmError when ``folder`` is not a local folder."""
    root = Path(folder)
    if "://" in str(folder) or not root.is_dir():
        raise KalmError(f"model folder not found: {folder} (fingerprints need a local folder)")
    root = root.resolve()
    files = fingerprinted_files(root)
    stat_key = (
        str(root),
        *((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files),
    )
    if stat_key in _cache:
        return _cache[stat_key]
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode("utf-8") + b"\0" + file_sha256(p).encode() + b"\n")
    digest = h.hexdigest()[:FINGERPRINT_DIGITS]
    _cache[stat_key] = digest
    return digest
