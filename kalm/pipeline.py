"""The retraining pipeline's config (configs/pipeline_*.yaml): which stage configs the DAG runs, in order.

Every stage points at its own validated config file; this file only adds what ties them together (the
base model for the first mining pass, how many fine-tuning runs feed the soup, the schedule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from kalm.config import StrictModel, load_yaml_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ALL_STAGES = ("ingest", "mine", "pretrain", "refresh", "finetune", "soup", "eval")


class ScheduleCfg(StrictModel):
    cron: str = "0 3 * * 0"  # Sundays 03:00
    timezone: str = "UTC"


class DataCfg(StrictModel):
    config: str = "ingest.yaml"
    tags: list[str] = Field(default_factory=list)  # only recipes with one of these tags (empty: all)
    recipes: list[str] | None = None  # only these recipes (default: all, filtered by tags)


class MiningCfg(StrictModel):
    config: str = "mine.yaml"
    base_model: str = "minilm"  # mines the first negatives, before any checkpoint of ours exists
    stages: list[str] = Field(default_factory=lambda: ["finetune"])


class TrainStageCfg(StrictModel):
    config: str
    nproc: int | None = None  # processes per node (default: GPUs, else 1)
    # dotted keys applied on top of the stage config, e.g. {"schedule.max_steps": 5}
    overrides: dict[str, Any] = Field(default_factory=dict)


class FinetuneCfg(TrainStageCfg):
    seeds: list[int] = Field(default_factory=lambda: [0])  # one run per seed feeds the soup


class SoupCfg(StrictModel):
    method: Literal["uniform", "weighted", "greedy"] = "uniform"
    weights: list[float] | None = None


class EvalCfg(StrictModel):
    config: str = "eval.yaml"
    compare_base: bool = True  # score the base model next to each stage and the soup


class PipelineConfig(StrictModel):
    name: str
    schedule: ScheduleCfg = Field(default_factory=ScheduleCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    mining: MiningCfg = Field(default_factory=MiningCfg)
    pretrain: TrainStageCfg
    finetune: FinetuneCfg
    soup: SoupCfg = Field(default_factory=SoupCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)


def config_path(name: str) -> Path:
    """A config file by path, or by name inside configs/."""
    p = Path(name)
    return p if p.exists() or p.is_absolute() else CONFIG_DIR / p


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    return load_yaml_model(PipelineConfig, config_path(str(path)))
