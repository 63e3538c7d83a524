"""The data stage's config (configs/ingest.yaml), validated on load."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError

from kalm.core.config import CONFIG_DIR, StrictModel, config_path, format_validation_error, load_yaml_model
from kalm.core.errors import KalmError
from kalm.data.executors import ExecutorSpec

DEFAULT_CONFIG = CONFIG_DIR / "ingest.yaml"


class NearDedupSpec(StrictModel):
    """MinHash LSH near-dedup: rows whose query+positive have estimated Jaccard >= threshold merge."""

    enabled: bool = True
    threshold: float = Field(0.8, gt=0.0, le=1.0)
    ngram: int = Field(5, ge=1, le=32)
    num_perm: int = Field(128, ge=16, le=1024)
    seed: int = 1


class EvalSetSpec(StrictModel):
    """A file of evaluation texts that training rows must not near-match."""

    name: str
    path: str  # relative to the config file, or absolute
    format: str = Field("jsonl", pattern="^(jsonl|parquet)$")
    text_fields: list[str] = Field(default_factory=lambda: ["query", "text"])


class DecontamSpec(StrictModel):
    """Training rows must not (near-)match evaluation texts. Sources: the ``eval_sets`` files, the recipes'
    held-out rows, and every task of the evaluation config (``eval_config``; the retraining DAG uses its
    pipeline's eval config instead): its local tasks, and its mteb tasks whose data is in the local cache."""

    enabled: bool = True
    threshold: float = Field(0.8, gt=0.0, le=1.0)
    eval_sets: list[EvalSetSpec] = Field(default_factory=list)
    include_holdouts: bool = True  # recipes' held-out eval rows (see Recipe.holdout) count as eval texts
    eval_config: str | None = "eval.yaml"  # relative to this file, else in configs/; null: none


class IngestConfig(StrictModel):
    """Everything the ingest and stage-mixture steps need besides the recipes themselves."""

    shard_rows: int = Field(50_000, ge=1)
    batch_rows: int = Field(20_000, ge=1)
    near_dedup: NearDedupSpec = Field(default_factory=NearDedupSpec)
    decontamination: DecontamSpec = Field(default_factory=DecontamSpec)
    workers: int = Field(2, ge=1)  # single engine: recipes ingested at once (threads)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    # partitioned engine (executor kind local or ray), see kalm/data/distributed.py
    partition_bytes: int = Field(64 << 20, ge=1024)  # source bytes per partition (JSONL ranges, row groups)
    # rows per exact or band reduce unit (the units' count follows the stage's rows, up to 256 per band)
    reduce_unit_rows: int = Field(1_000_000, ge=1)
    keep_intermediates: bool = False  # keep the reduce's files after the mixtures are published


def load_ingest_config(path: str | Path | None = None) -> IngestConfig:
    """Load and validate (default: configs/ingest.yaml, or the built-in defaults when that file is absent).

    Relative evaluation-set paths are resolved against the config file's folder here, once, so the parsed
    config means the same thing wherever it is passed."""
    if path is None and not DEFAULT_CONFIG.exists():
        return IngestConfig()
    p = config_path(path or DEFAULT_CONFIG)
    cfg = load_yaml_model(IngestConfig, p)
    base = p.parent
    sets = [
        es.model_copy(update={"path": str(Path(es.path) if Path(es.path).is_absolute() else base / es.path)})
        for es in cfg.decontamination.eval_sets
    ]
    ev = cfg.decontamination.eval_config
    if ev is not None and not Path(ev).is_absolute():
        ev = str(base / ev) if (base / ev).exists() else str(config_path(ev))
    return cfg.model_copy(
        update={
            "decontamination": cfg.decontamination.model_copy(update={"eval_sets": sets, "eval_config": ev})
        }
    )


def with_executor(
    cfg: IngestConfig, kind: str | None = None, workers: int | None = None, address: str | None = None
) -> IngestConfig:
    """``cfg`` with the CLI's executor choice applied (``None`` keeps the config's value); validated."""
    spec = cfg.executor.model_dump()
    spec.update(
        {k: v for k, v in {"kind": kind, "workers": workers, "address": address}.items() if v is not None}
    )
    try:
        return cfg.model_copy(update={"executor": ExecutorSpec.model_validate(spec)})
    except ValidationError as err:
        raise KalmError(format_validation_error(err, ExecutorSpec, "--executor/--workers")) from None
