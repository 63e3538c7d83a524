"""Encode texts for mining with any sentence-transformers-format model, as fast as the hardware allows.

The model is :class:`kalm.training.model.Embedder` (mean/cls/last-token pooling, L2 norm; decoders made
bidirectional). Speed comes from doing less, not from tricks that change the maths:

- texts are sorted by token count (not characters), so a batch has almost no padding; each text is
  tokenized once, and :func:`kalm.mining.cache.embed_texts` tokenizes the next shard in a thread while the
  current one encodes (no serial tokenizer pass before the GPUs start);
- inference runs under ``torch.inference_mode``; where the hardware has native bf16 (CUDA, or a CPU with
  AVX512-BF16/AMX) the transformer's weights are cast to bf16 once (autocast would re-cast every weight on
  every batch: a third of the CPU time); pooling and normalisation stay float32. Measured on MiniLM: cosine
  to the float32 embedding >= 0.9999;
- several GPUs: one model replica per device, each fed whole batches by its own thread.

>>> enc = load_encoder("minilm", root=None)                      # doctest: +SKIP
>>> vecs = enc.encode([enc.format_query("what is bm25?", "Retrieve passages"), "BM25 ranks documents."])
>>> vecs.shape, vecs.dtype                                       # doctest: +SKIP
((2, 384), dtype('float32'))
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kalm.core.errors import KalmError
from kalm.core.fingerprint import model_fingerprint
from kalm.training.instructions import format_query
from kalm.training.model import Embedder
from kalm.training.pooling import POOLINGS, normalize

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 4096  # texts per tokenizer call when measuring lengths
# On a CPU a batch holds at most this many (padded) tokens besides ``batch_size`` texts: a transformer's
# activations that stay in the cores' caches run faster (all-MiniLM-L6-v2, fp32, 2 cores: 173 texts/s at
# 2,048 tokens a batch, 157 at 64 texts of ~50 tokens, 131 at 16,384 tokens). GPUs take whole batches.
CPU_BATCH_TOKENS = 2048


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run in hardware: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_devices(spec: str) -> list[torch.device]:
    """``auto``: every CUDA device, else the CPU; or ``cpu``, ``cuda``, ``cuda:0,cuda:1``."""
    if spec == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device(f"cuda:{i}") for i in range(n)] or [torch.device("cpu")]
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise KalmError("devices: 'cuda' requested but no CUDA device is available")
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    try:
        devices = [torch.device(d.strip()) for d in spec.split(",") if d.strip()]
    except RuntimeError as err:
        raise KalmError(f"devices: invalid device list {spec!r} ({err})") from None
    if not devices:
        raise KalmError(f"devices: empty device list {spec!r}")
    return devices


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16`, else ``fp32``; explicit values pass through."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise KalmError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


@dataclass
class Encoder:
    """A loaded model (one replica per device) plus what identifies its embeddings.

    ``fingerprint`` is the model folder's (:func:`kalm.core.fingerprint.model_fingerprint`: weights,
    configs, tokenizer, template); ``key`` adds what else changes the vectors, the precision and the max
    length: embeddings are cached under it.
    """

    replicas: list[Embedder]
    spec: str
    path: str
    fingerprint: str
    precision: str
    batch_tokens: int | None = None  # padded tokens a batch may hold (None: ``batch_size`` texts alone)

    @property
    def embedder(self) -> Embedder:
        return self.replicas[0]

    @property
    def dim(self) -> int:
        return self.embedder.embedding_dim

    @property
    def key(self) -> str:
        return f"{self.fingerprint}-{self.precision}-L{self.embedder.max_length}"

    def lineage(self) -> dict[str, Any]:
        e = self.embedder
        return {
            "model": self.spec,
            "path": self.path,
            "fingerprint": self.fingerprint,
            "precision": self.precision,
            "pooling": e.pooling,
            "max_length": e.max_length,
            "dim": self.dim,
            "devices": [str(r.device) for r in self.replicas],
        }

    def format_query(self, text: str, instruction: str | None) -> str:
        """The query side with the model's own template (documents of asymmetric tasks stay bare)."""
        return format_query(text, instruction, self.embedder.query_template)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text after truncation (special tokens included), in ``TOKENIZE_BATCH`` calls. The
        fast (Rust) tokenizer releases the GIL, so this runs beside encoding in another thread."""
        tok = self.embedder.tokenizer
        out: list[list[int]] = []
        limit = self.embedder.max_length
        for s in range(0, len(texts), TOKENIZE_BATCH):
            out += tok(list(texts[s : s + TOKENIZE_BATCH]), truncation=True, max_length=limit)["input_ids"]
        return out

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        ids: list[list[int]] | None = None,
        progress: Callable[[int], Any] | None = None,
    ) -> np.ndarray:
        """Texts (already formatted) -> (N, D) float32 unit vectors, rows in input order.

        ``ids`` (from :meth:`tokenize`, e.g. done ahead in another thread) saves the tokenizer pass; each
        text is tokenized once either way. ``progress(n)`` is called after each batch with its size.
        Longest batches first (by token count, not characters: almost no padding): an out-of-memory error
        shows up at once. A batch holds at most ``batch_size`` texts and, where ``batch_tokens`` is set (a
        CPU), at most that many padded tokens (at least one text).
        """
        n = len(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        if ids is None:
            ids = self.tokenize(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        order = np.lexsort((np.arange(n), -lengths))  # by token count desc, ties in input order
        batches = token_batches(order, lengths, batch_size, self.batch_tokens)

        def run(replica: Embedder, idx: np.ndarray) -> None:
            out[idx] = embed_ids(replica, [ids[i] for i in idx])
            if progress is not None:
                progress(len(idx))

        def run_all(replica: Embedder, mine: list[np.ndarray]) -> None:
            for idx in mine:
                run(replica, idx)

        k = len(self.replicas)
        if k == 1:
            run_all(self.embedder, batches)
        else:  # one thread per device; CUDA kernels release the GIL, so replicas run concurrently
            with ThreadPoolExecutor(k) as pool:
                jobs = [pool.submit(run_all, rep, batches[i::k]) for i, rep in enumerate(self.replicas)]
                for j in jobs:
                    j.result()
        return out


def token_batches(
    order: np.ndarray, lengths: np.ndarray, batch_size: int, batch_tokens: int | None
) -> list[np.ndarray]:
    """``order`` (longest first) cut into batches of at most ``batch_size`` texts and, if given, at most
    ``batch_tokens`` padded tokens (a batch pads to its first, longest text).

    >>> [b.tolist() for b in token_batches(np.array([0, 1, 2, 3]), np.array([30, 20, 10, 10]), 8, 40)]
    [[0], [1, 2], [3]]
    """
    if batch_tokens is None:
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    out, s = [], 0
    while s < len(order):
        k = max(1, min(batch_size, batch_tokens // max(1, int(lengths[order[s]]))))
        out.append(order[s : s + k])
        s += k
    return out


def embed_batch(emb: Embedder, texts: list[str]) -> np.ndarray:
    """One padded batch of texts through the transformer: :func:`embed_ids` after the tokenizer."""
    ids = emb.tokenizer(texts, truncation=True, max_length=emb.max_length)["input_ids"]
    return embed_ids(emb, ids)


def embed_ids(emb: Embedder, ids: list[list[int]]) -> np.ndarray:
    """One batch of token ids, padded as the tokenizer pads, through the transformer (in its own dtype),
    pooled and normalised in float32."""
    batch = emb.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    device = emb.device
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["attention_mask"].to(device, non_blocking=True)
    with torch.inference_mode():
        hidden = emb.token_states(input_ids, mask)
        vecs = normalize(POOLINGS[emb.pooling](hidden, mask))  # float32 (pooling casts)
    return vecs.float().cpu().numpy()


def load_encoder(
    model: str,
    root: Any = None,
    max_seq_length: int | None = None,
    precision: str = "auto",
    devices: str = "auto",
) -> Encoder:
    """Resolve ``model`` (folder, alias, hub id, ``stage:pretrain``) and load it once per device.

    A missing or unreadable model is a one-line :class:`KalmError`.
    """
    from kalm.training.config import resolve_model_path

    path = resolve_model_path(model, root)
    devs = resolve_devices(devices)
    try:
        # a folder without its own template is un-instructed: queries stay bare, as evaluation scores it
        first = Embedder.from_pretrained(path, max_length=max_seq_length, device=devs[0], untemplated="plain")
    except (OSError, ValueError, KeyError) as err:
        line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise KalmError(f"cannot load model {model!r} from {path}: {line}") from None
    first.eval()
    fp = model_fingerprint(path)
    prec = resolve_precision(precision, devs[0])
    first.to(dtype=torch.bfloat16 if prec == "bf16" else torch.float32)
    replicas = [first] + [copy.deepcopy(first).to(d).eval() for d in devs[1:]]
    log.info("miner %s (%s): fingerprint %s, %s on %s", model, path, fp, prec, ", ".join(map(str, devs)))
    tokens = CPU_BATCH_TOKENS if devs[0].type == "cpu" else None
    return Encoder(
        replicas=replicas, spec=model, path=path, fingerprint=fp, precision=prec, batch_tokens=tokens
    )


def miner_fingerprint(model: str, root: Any = None) -> str:
    """The fingerprint mining records for ``model``, as ``stale_negatives`` wants (no model is loaded)."""
    from kalm.training.config import resolve_model_path

    return model_fingerprint(resolve_model_path(model, root))


def show_progress() -> bool:
    """Progress bars only for a person watching: stderr is a terminal."""
    return sys.stderr.isatty()
