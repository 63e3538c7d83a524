"""The retraining pipeline's config (configs/pipeline_*.yaml): which stage configs the DAG runs, in order.

Every stage points at its own validated config file; this file only adds what ties them together (the
base model for the first mining pass, how many fine-tuning runs feed the soup, the schedule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from kalm.core.config import StrictModel, config_path, load_yaml_model
from kalm.core.storage import DataRoot

if TYPE_CHECKING:
    from kalm.data.config import IngestConfig
    from kalm.data.recipes import RecipeSet
    from kalm.evaluation.config import EvalConfig
    from kalm.mining.config import MineConfig, ScoreConfig
    from kalm.training.config import TrainConfig

StageName = Literal["ingest", "mine", "pretrain", "refresh", "score", "finetune", "soup", "eval"]
ALL_STAGES = ("ingest", "mine", "pretrain", "refresh", "score", "finetune", "soup", "eval")


class ScheduleCfg(StrictModel):
    cron: str = "0 3 * * 0"  # Sundays 03:00, in `timezone` (the deployment's schedule keeps it)
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, v: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r} (an IANA name such as UTC or Europe/Berlin)") from None
        return v

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"cron {v!r} needs 5 fields (minute hour day month weekday)")
        return v


class DataCfg(StrictModel):
    config: str = "ingest.yaml"
    tags: list[str] = Field(default_factory=list)  # only recipes with one of these tags (empty: all)
    recipes: list[str] | None = None  # only these recipes (default: all, filtered by tags)


class MiningCfg(StrictModel):
    config: str = "mine.yaml"
    base_model: str = "minilm"  # mines the first negatives, before any checkpoint of ours exists
    stages: list[str] = Field(default_factory=lambda: ["finetune"])


class ScoringCfg(StrictModel):
    """The score stage (teacher scores of the mined rows, teacher-based false-negative filter): when
    ``enabled``, fine-tuning trains on ``scored/<stage>/<recipe>`` (and can distill: loss.distill_alpha)."""

    config: str = "score.yaml"
    enabled: bool = False


class TrainStageCfg(StrictModel):
    config: str
    nproc: int | None = None  # processes per node (default: GPUs, else 1)
    # dotted keys applied on top of the stage config, e.g. {"schedule.max_steps": 5}
    overrides: dict[str, Any] = Field(default_factory=dict)


class PretrainCfg(TrainStageCfg):
    # Whether the DAG pre-trains. "auto": only a plain transformers backbone (an LM about to become an
    # embedder, KaLM's case); a model that already is a sentence embedder (a sentence-transformers folder,
    # the demo's all-MiniLM-L6-v2) is fine-tuned directly: a short single-domain pre-training cost it
    # 2.1 points of held-out classification for about 2 in-domain (docs/model_and_losses.md).
    enabled: bool | Literal["auto"] = "auto"


class FinetuneCfg(TrainStageCfg):
    seeds: list[int] = Field(default_factory=lambda: [0])  # one run per seed feeds the soup


class SoupCfg(StrictModel):
    method: Literal["uniform", "weighted", "greedy"] = "uniform"
    weights: list[float] | None = None
    # [open] Weight of the model pre-training started from in the final soup: (1 - w)·soup + w·base
    # (LM-Cocktail, WiSE-FT). For a base that is already a general embedder (the demo's MiniLM) it keeps
    # out-of-domain quality; 0 for a raw LLM base (its causal config would not merge anyway).
    base_weight: float = Field(0.0, ge=0.0, lt=1.0)


class EvalCfg(StrictModel):
    config: str = "eval.yaml"
    compare_base: bool = True  # score the base model next to each stage and the soup


class PipelineConfig(StrictModel):
    name: str
    schedule: ScheduleCfg = Field(default_factory=ScheduleCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    mining: MiningCfg = Field(default_factory=MiningCfg)
    scoring: ScoringCfg = Field(default_factory=ScoringCfg)
    pretrain: PretrainCfg
    finetune: FinetuneCfg
    soup: SoupCfg = Field(default_factory=SoupCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    return load_yaml_model(PipelineConfig, config_path(path))


def _child(name: str, parent: Path) -> Path:
    """A stage config named by the pipeline file: absolute, next to the pipeline file, or in configs/."""
    p = Path(name).expanduser()
    if not p.is_absolute() and (parent.parent / p).exists():
        return (parent.parent / p).resolve()
    return config_path(p)


@dataclass(frozen=True)
class Pipeline:
    """A pipeline config and every stage config it names, parsed and validated once (a typo anywhere fails
    before any stage runs), plus the data root and the recipes, discovered once.

    ``pretrain`` and ``finetune`` already carry the pipeline's ``overrides``; what the DAG decides at run
    time (run names, seeds, the previous stage's model) is applied with :func:`kalm.core.config.with_updates`.
    """

    config: PipelineConfig
    source: Path
    root: DataRoot
    recipes: RecipeSet
    ingest: IngestConfig
    mine: MineConfig
    score: ScoreConfig
    pretrain: TrainConfig
    finetune: TrainConfig
    eval: EvalConfig
    config_files: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name


def load_pipeline(
    config: str | Path, data_root: str | None = None, recipes_dirs: Sequence[str] = ()
) -> Pipeline:
    """Parse the pipeline file and all its stage configs, open the data root and discover the recipes."""
    from kalm.data.config import load_ingest_config
    from kalm.data.recipes import discover
    from kalm.evaluation.config import load_eval_config
    from kalm.mining.config import load_mine_config, load_score_config
    from kalm.training.config import load_train_config

    src = config_path(config)
    pc = load_pipeline_config(src)
    files = {
        "ingest": _child(pc.data.config, src),
        "mine": _child(pc.mining.config, src),
        "score": _child(pc.scoring.config, src),
        "pretrain": _child(pc.pretrain.config, src),
        "finetune": _child(pc.finetune.config, src),
        "eval": _child(pc.eval.config, src),
    }
    return Pipeline(
        config=pc,
        source=src,
        root=DataRoot.from_uri(data_root),
        recipes=discover(recipes_dirs),
        ingest=load_ingest_config(files["ingest"]),
        mine=load_mine_config(files["mine"]),
        score=load_score_config(files["score"]),
        pretrain=load_train_config(files["pretrain"], pc.pretrain.overrides),
        finetune=load_train_config(files["finetune"], pc.finetune.overrides),
        eval=load_eval_config(files["eval"]),
        config_files={k: str(v) for k, v in files.items()},
    )
