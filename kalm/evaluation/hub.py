"""``kalm push``: a finished model folder (a training run's ``final/`` or a soup) to the Hugging Face Hub.

The folder must be a sentence-transformers model with its model card (``README.md``, written by training
and soup); it goes up as it is, less what is local bookkeeping (hidden files, temporary siblings).
The token comes from ``HF_TOKEN`` or the Hub's own login (``hf auth login``) and is never printed;
offline mode or an unreachable Hub is one line. ``api`` is a seam for tests: anything with
``create_repo`` and ``upload_folder`` as ``huggingface_hub.HfApi`` has them.

>>> push_model("runs/soup/demo", "me/kalm-minilm-demo", private=True)  # doctest: +SKIP
'https://huggingface.co/me/kalm-minilm-demo/commit/...'
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from kalm.core.config import HF_OFFLINE_VARS, hf_offline
from kalm.core.errors import KalmError
from kalm.core.modelcard import CARD
from kalm.core.secrets import scrub
from kalm.evaluation.checkpoints import check_model_folder

log = logging.getLogger(__name__)
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
IGNORE = [".*", "**/.*", "*.tmp", "*.tmp-*"]  # hidden files and temporary siblings stay here


def check_push(folder: str | Path, repo_id: str) -> Path:
    """The folder, checked: a model folder with a model card; ``repo_id`` as ``owner/name``."""
    p = check_model_folder(folder)
    if not REPO_ID.match(repo_id):
        raise KalmError(f"repo id {repo_id!r} must be owner/name (letters, digits, '.', '_', '-')")
    if not (p / CARD).is_file():
        raise KalmError(f"{p} has no model card ({CARD}); training and `kalm soup` write one")
    return p


def push_model(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
) -> str:
    """Create ``repo_id`` (a model repo, private unless told) if needed and upload the folder; returns
    the commit URL."""
    p = check_push(folder, repo_id)
    if api is None:
        if hf_offline():
            raise KalmError(f"cannot push: Hugging Face offline mode is on ({'/'.join(HF_OFFLINE_VARS)})")
        from huggingface_hub import HfApi

        api = HfApi()
    message = commit_message or f"kalm-pipeline: upload {p.name}"
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, *_http_errors())
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(p),
            repo_type="model",
            revision=revision,
            commit_message=message,
            ignore_patterns=IGNORE,
        )
    except errors as err:  # the Hub's HTTP errors, no route, bad token
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KalmError(f"push to {repo_id} failed: {scrub(first)}") from None
    url = str(getattr(info, "commit_url", info))
    log.info("pushed %s to %s (%s)", p, repo_id, url)
    return url


def _http_errors() -> tuple[type[BaseException], ...]:
    """The base errors of the HTTP clients huggingface_hub may use (httpx, its fork httpx2, requests)."""
    import importlib

    out: list[type[BaseException]] = []
    for name, attr in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            out.append(getattr(importlib.import_module(name), attr))
        except (ImportError, AttributeError):
            continue
    return tuple(out)
