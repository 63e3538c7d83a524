"""Model and losses of the KaLM-Embedding-V2 recipe: an embedder over any transformers backbone, its
pooling and instruction formatting, and the InfoNCE family of losses (see docs/model_and_losses.md).

>>> from training import Embedder, build_loss
>>> emb = Embedder.from_pretrained(path)
>>> loss = build_loss({"stage": "finetune"}, embedding_dim=emb.embedding_dim)
"""

from training.instructions import DEFAULT_QUERY_TEMPLATE, format_document, format_query, st_prompts
from training.losses import LOSSES, build_loss
from training.model import Embedder
from training.pooling import POOLINGS

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
