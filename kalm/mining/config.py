"""The mining stage config (configs/mine.yaml), validated on load: unknown keys are one-line errors.

>>> cfg = MineConfig()                       # the documented defaults: window [50, 100), M = 7, top-k 50
>>> cfg.window, cfg.num_negatives, cfg.top_k
((50, 100), 7, 50)
>>> load_mine_config("configs/mine.yaml").config_hash()   # doctest: +SKIP
'3c9e1d2a4b5f'

``config_hash`` covers only the keys that change which negatives come out; operational keys (batch size,
chunking, cache, devices, progress) can change without invalidating mined shards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from kalm.core.config import CONFIG_DIR, StrictModel, config_path, load_yaml_model
from kalm.data.executors import ExecutorSpec

DEFAULT_CONFIG = CONFIG_DIR / "mine.yaml"

# Keys that do not change the chosen negatives (up to float round-off): left out of ``config_hash``.
OPERATIONAL_KEYS = frozenset(
    {"batch_size", "chunk_queries", "cache", "cache_shard_texts", "devices", "search", "executor"}
)


class PoolSpec(StrictModel):
    """Candidates: the recipe's own documents, or a corpus file plus the recipe's positives."""

    source: Literal["recipe", "corpus"] = "recipe"
    corpus: str | None = None  # Parquet or JSONL; absolute, or relative to the data root
    text_field: str = "text"

    @model_validator(mode="after")
    def _corpus(self) -> PoolSpec:
        if self.source == "corpus" and not self.corpus:
            raise ValueError("pool.source 'corpus' needs pool.corpus (a Parquet or JSONL file)")
        return self


class MarginSpec(StrictModel):
    """Keep a candidate only when its score is at most ``pos - absolute`` and ``pos - |pos| * relative``."""

    absolute: float | None = Field(None, ge=0)
    relative: float | None = Field(None, ge=0, le=1)


class IndexSpec(StrictModel):
    """Exact inner product (flat) or an inverted file (ivf) for pools too big for exact search."""

    type: Literal["flat", "ivf"] = "flat"
    nlist: int = Field(1024, ge=1)  # IVF lists; clamped to pool_size // 39 (FAISS needs ~39 points per list)
    nprobe: int = Field(32, ge=1)
    backend: Literal["auto", "faiss", "faiss-gpu", "torch"] = "auto"


class SearchSpec(StrictModel):
    """How the pool is searched; none of it changes the result (exact merges), only memory and time."""

    query_batch: int = Field(4096, ge=1)  # queries per search call (bounds the score matrix)
    block_mb: float = Field(1024, gt=0)  # pool vectors indexed at a time (MiB of float32): host memory bound
    pass_queries: int = Field(1_000_000, ge=1)  # queries whose running top-k is held at once (~12 B x depth)
    scratch_dir: str | None = None  # local folder for the vector files (memmaps); default: the system temp


class MineConfig(StrictModel):
    """Everything one mining run needs besides the model and the data root."""

    model: str = "minilm"  # a folder, an alias (minilm), a hub id when online, or stage:pretrain
    window: tuple[int, int] = (50, 100)  # sample from ranks [lo, hi), 0-based
    num_negatives: int = Field(7, ge=1)  # M
    top_k: int = Field(50, ge=1)  # ranking consistency: drop the row when its best positive ranks >= top_k
    min_negatives: int = Field(
        1, ge=0
    )  # fewer eligible candidates than this: row dropped (too_few_candidates)
    small_pool: Literal["scale", "drop"] = (
        "scale"  # pool smaller than window[1]: scale window and top_k, or drop
    )
    seed: int = 0
    keep_source_negatives: bool = False  # the source's own negatives first, mined ones fill up to M
    margin: MarginSpec = Field(default_factory=MarginSpec)
    pool: PoolSpec = Field(default_factory=PoolSpec)
    index: IndexSpec = Field(default_factory=IndexSpec)
    max_seq_length: int | None = Field(None, ge=8)  # default: the model's own
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16
    # operational (not in config_hash)
    batch_size: int = Field(64, ge=1)
    chunk_queries: int = Field(20_000, ge=1)  # queries per resumable chunk
    cache: bool = True  # embedding cache under <data root>/cache/embeddings/
    cache_shard_texts: int = Field(8192, ge=1)  # texts per cache shard (also the encode resume unit)
    devices: str = "auto"  # auto (all GPUs, else cpu), cpu, cuda, or a comma list like cuda:0,cuda:1
    # Encoding scaled out: cache shards encoded as units on the data stage's engine (local processes, or
    # Ray across nodes; executor.gpus per unit on a GPU cluster), written to the shared embedding cache.
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)

    @model_validator(mode="after")
    def _ranges(self) -> MineConfig:
        lo, hi = self.window
        if not 0 <= lo < hi:
            raise ValueError(f"window must satisfy 0 <= lo < hi, got {list(self.window)}")
        if self.num_negatives > hi - lo:
            raise ValueError(f"num_negatives {self.num_negatives} does not fit in window {list(self.window)}")
        if self.min_negatives > self.num_negatives:
            raise ValueError(f"min_negatives {self.min_negatives} > num_negatives {self.num_negatives}")
        return self

    def config_hash(self) -> str:
        """12 hex digits over the keys that decide the output (``OPERATIONAL_KEYS`` left out)."""
        data = {k: v for k, v in self.model_dump(mode="json").items() if k not in OPERATIONAL_KEYS}
        data.pop("model", None)  # the model is recorded by fingerprint, not by name
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def load_mine_config(path: str | Path | None = None) -> MineConfig:
    """configs/mine.yaml by default; a missing default file gives the built-in defaults."""
    if path is None and not DEFAULT_CONFIG.exists():
        return MineConfig()
    return load_yaml_model(MineConfig, config_path(path or DEFAULT_CONFIG))


# -- the score stage (configs/score.yaml) ------------------------------------------------------------------
DEFAULT_SCORE_CONFIG = CONFIG_DIR / "score.yaml"
SCORE_OPERATIONAL_KEYS = frozenset({"batch_size", "chunk_rows", "cache", "devices"})


class TeacherSpec(StrictModel):
    """The teacher: an embedding model (cosine of query and document, each formatted with the teacher's
    own instruction template) or a cross-encoder (sentence-transformers ``CrossEncoder``: one logit per
    pair). ``model``: a folder, an alias (minilm), a hub id when online, or a run (stage:finetune)."""

    kind: Literal["embedding", "cross_encoder"] = "embedding"
    model: str = "minilm"
    max_seq_length: int | None = Field(None, ge=8)  # default: the model's own
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class ScoreConfig(StrictModel):
    """Everything one scoring run needs besides the data root.

    ``margin``: teacher-based false-negative filter: a negative is kept only when its score is at most
    ``pos - absolute`` and ``pos - |pos| * relative`` (``pos``: the row's lowest-scored positive). The
    default ``relative: 0.05`` is NV-Retriever's TopK-PercPos at 95% [reported]. A row left with fewer
    than ``min_negatives`` negatives is dropped (``too_few_negatives``).
    """

    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    margin: MarginSpec = Field(default_factory=lambda: MarginSpec(relative=0.05))
    min_negatives: int = Field(1, ge=0)
    # operational (not in config_hash)
    batch_size: int = Field(64, ge=1)
    chunk_rows: int = Field(5000, ge=1)  # rows per resumable chunk
    cache: bool = True  # embedding teachers: the shared embedding cache (a miner's vectors are reused)
    devices: str = "auto"

    def config_hash(self) -> str:
        """12 hex digits over the keys that decide the output (the teacher by fingerprint, not name)."""
        data = {k: v for k, v in self.model_dump(mode="json").items() if k not in SCORE_OPERATIONAL_KEYS}
        data["teacher"].pop("model", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def load_score_config(path: str | Path | None = None) -> ScoreConfig:
    """configs/score.yaml by default; a missing default file gives the built-in defaults."""
    if path is None and not DEFAULT_SCORE_CONFIG.exists():
        return ScoreConfig()
    return load_yaml_model(ScoreConfig, config_path(path or DEFAULT_SCORE_CONFIG))
