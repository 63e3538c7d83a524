"""Model and losses of the KaLM-Embedding-V2 recipe: an embedder over any transformers backbone, its
pooling and instruction formatting, and the InfoNCE family of losses (see docs/model_and_losses.md).

>>> from training import Embedder, build_loss
>>> emb = Embedder.from_pretrained(path)
>>> loss = build_loss({"stage": "finetune"}, embedding_dim=emb.embedding_dim)

Names are imported lazily: ``import kalm.training.losses`` stays torch-only (a spawned DDP worker or a loss
unit test does not pay the ~5 s transformers import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kalm.training.instructions import DEFAULT_QUERY_TEMPLATE, format_document, format_query, st_prompts
    from kalm.training.losses import LOSSES, build_loss
    from kalm.training.model import Embedder
    from kalm.training.pooling import POOLINGS

_EXPORTS = {
    "DEFAULT_QUERY_TEMPLATE": "kalm.training.instructions",
    "format_document": "kalm.training.instructions",
    "format_query": "kalm.training.instructions",
    "st_prompts": "kalm.training.instructions",
    "LOSSES": "kalm.training.losses",
    "build_loss": "kalm.training.losses",
    "Embedder": "kalm.training.model",
    "POOLINGS": "kalm.training.pooling",
}

__all__ = [
    "DEFAULT_QUERY_TEMPLATE",
    "LOSSES",
    "POOLINGS",
    "Embedder",
    "build_loss",
    "format_document",
    "format_query",
    "st_prompts",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
