"""``KalmEncoder``: an mteb encoder over any sentence-transformers folder, with pinned instructions and
Matryoshka truncation.

mteb 2 calls ``encode(inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kw)`` with a
DataLoader of ``{"text": [...]}`` batches and expects an array of shape (N, D). Here:

- queries (``prompt_type`` query, and tasks that pass none: classification, clustering, STS) get the task's
  pinned instruction, if it has one, in the template ``Instruct: {instruction} \\n Query: {query}`` (or the
  model folder's own ``prompts.query_template``); documents (``prompt_type`` document) stay bare.
- ``dim``: embeddings are truncated to their first ``dim`` values, then L2-normalised (Matryoshka).
- Full-size embeddings are memoised per formatted text (bounded), so scoring several dims of one task
  encodes each text once.

>>> enc = KalmEncoder(minilm_path, instructions=load_instructions(), dim=128)
>>> mteb.evaluate(enc, tasks, cache=None)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType

from kalm.core.errors import KalmError
from kalm.core.fingerprint import model_fingerprint
from kalm.evaluation.checkpoints import check_model_folder
from kalm.evaluation.instructions import InstructionSet, eval_template
from kalm.training.instructions import format_query

log = logging.getLogger(__name__)

DEFAULT_CACHE_TEXTS = 200_000  # ~300 MB of float32 at 384 dims; beyond it texts are re-encoded per dim


def truncate_normalize(emb: np.ndarray, dim: int | None) -> np.ndarray:
    """(N, D) -> (N, dim) float32: the first ``dim`` values, L2-normalised (zero rows stay zero).

    >>> truncate_normalize(np.array([[3.0, 4.0, 12.0]]), 2).round(2).tolist()
    [[0.6, 0.8]]
    """
    out = np.asarray(emb, dtype=np.float32)
    if dim is not None:
        out = out[:, :dim]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


class KalmEncoder(AbsEncoder):
    """Implements mteb's ``EncoderProtocol`` (encode, similarity, similarity_pairwise, mteb_model_meta).

    ``instructions`` decides the query instruction per task; ``dim`` is the Matryoshka truncation (None =
    full); ``device`` a torch device string (``"cpu"``, ``"cuda:1"``).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        instructions: InstructionSet,
        dim: int | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        max_seq_length: int | None = None,
        fingerprint: str | None = None,
        cache_max_texts: int = DEFAULT_CACHE_TEXTS,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.path = check_model_folder(model_path)
        self.fingerprint = fingerprint or model_fingerprint(self.path)
        self.instructions = instructions
        self.template = eval_template(self.path, instructions)  # None: plain texts, no instruction
        self.batch_size = batch_size
        self.cache_max_texts = cache_max_texts
        self._cache: dict[str, np.ndarray] = {}
        self.used_instructions: dict[str, dict[str, Any]] = {}
        try:
            self.model = SentenceTransformer(str(self.path), device=device, local_files_only=True)
        except (OSError, ValueError) as err:
            raise KalmError(f"cannot load {self.path} as a sentence-transformers model: {err}") from None
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.full_dim = int(self.model.get_embedding_dimension() or 0)
        self.n_parameters = sum(p.numel() for p in self.model.parameters())
        self.dim: int | None = None
        self.set_dim(dim)

    def set_dim(self, dim: int | None) -> None:
        """Score at ``dim`` (Matryoshka truncation) from now on; ``None`` = the full dimension."""
        if dim is not None and not 0 < dim <= self.full_dim:
            raise KalmError(f"dim {dim} is not in 1..{self.full_dim} (the dimension of {self.path})")
        self.dim = None if dim == self.full_dim else dim
        self.mteb_model_meta = ModelMeta(
            loader=None,
            name=f"kalm/{self.path.name or 'model'}",
            revision=self.fingerprint,
            release_date=None,
            languages=None,
            n_parameters=self.n_parameters,
            memory_usage_mb=None,
            max_tokens=float(self.model.max_seq_length or 0) or None,
            embed_dim=dim or self.full_dim,
            license=None,
            open_weights=None,
            public_training_code=None,
            public_training_data=None,
            framework=["Sentence Transformers", "PyTorch"],
            similarity_fn_name="cosine",
            use_instructions=True,
            training_datasets=None,
        )

    def clear_cache(self) -> None:
        self._cache.clear()

    def instruction_for(self, task_name: str, task_type: str, prompt_type: PromptType | None) -> str | None:
        """The instruction for one side of a task: ``None`` for documents and for un-instructed tasks."""
        instruction, source = self.instructions.lookup(task_name, task_type)
        if self.template is None:
            instruction, source = None, "plain: the model has no query template"
        self.used_instructions.setdefault(task_name, {"instruction": instruction, "source": source})
        if prompt_type == PromptType.document:
            return None
        return instruction

    def _embed(self, texts: list[str]) -> np.ndarray:
        """(N,) texts -> (N, full_dim) float32, memoised."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if todo:
            vecs = self.model.encode(
                todo,
                prompt="",  # we format instructions ourselves; "" also disables default_prompt_name
                batch_size=self.batch_size,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            if len(self._cache) + len(todo) > self.cache_max_texts:
                self._cache.clear()
                if len(todo) > self.cache_max_texts:
                    return self._assemble(texts, dict(zip(todo, vecs, strict=True)))
            self._cache.update(zip(todo, np.asarray(vecs, dtype=np.float32), strict=True))
        return self._assemble(texts, self._cache)

    def _assemble(self, texts: list[str], table: dict[str, np.ndarray]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.full_dim), dtype=np.float32)
        return np.stack([table[t] for t in texts]).astype(np.float32, copy=False)

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Batches of ``{"text": [...]}`` -> (N, dim or full_dim) float32, L2-normalised."""
        texts = [t for batch in inputs for t in batch["text"]]
        instruction = self.instruction_for(task_metadata.name, str(task_metadata.type), prompt_type)
        formatted = (
            texts if self.template is None else [format_query(t, instruction, self.template) for t in texts]
        )
        return truncate_normalize(self._embed(formatted), self.dim)
