"""The evaluation config (``configs/eval.yaml``) and local task declarations, validated on load.

Unknown keys are errors naming the allowed keys (``kalm.core.config.StrictModel``). Relative paths (local task
data, the instructions file) are resolved against the YAML file's folder.

>>> cfg = load_eval_config("configs/eval.yaml")
>>> cfg.dims, cfg.batch_size
([256, 128], 32)
>>> LocalTaskSpec(name="FaqRetrieval", type="retrieval", path="faq.parquet", pathh="x")
Traceback (most recent call last):
pydantic_core._pydantic_core.ValidationError: ... Extra inputs are not permitted
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from kalm.core.config import CONFIG_DIR, StrictModel, config_path, load_model, read_yaml
from kalm.core.errors import KalmError
from kalm.training.instructions import DEFAULT_INSTRUCTIONS

DEFAULT_EVAL_CONFIG = CONFIG_DIR / "eval.yaml"

LocalTaskType = Literal[
    "retrieval", "reranking", "sts", "classification", "clustering", "pair_classification"
]
# Our task-type names (kalm.core.schema.TASK_TYPES) -> mteb's TaskMetadata.type.
MTEB_TYPE = {
    "retrieval": "Retrieval",
    "reranking": "Reranking",
    "sts": "STS",
    "classification": "Classification",
    "clustering": "Clustering",
    "pair_classification": "PairClassification",
}


class LocalTaskSpec(StrictModel):
    """One evaluation task over local files, run by mteb like any of its own tasks.

    Data columns per ``type`` (Parquet or JSONL; ``path`` is a file, a folder of ``*.parquet``/``*.jsonl``,
    a glob, or ``s3://...``):

    - ``retrieval``/``reranking``: ``query``, ``pos`` (list of str), optional ``neg`` (list of str): the
      pipeline's row schema (``kalm.core.schema.ROW_SCHEMA``), so held-out rows work as they are. Corpus =
      every positive and negative; relevant = the row's positives; reranking candidates = the row's pos + neg.
    - ``sts``: ``sentence1``, ``sentence2``, ``score`` (any numeric range).
    - ``classification``: ``text``, ``label``, ``split`` (``train`` or ``test``).
    - ``clustering``: ``text``, ``label``.
    - ``pair_classification``: ``sentence1``, ``sentence2``, ``label`` (0 or 1).

    ``instruction``: ``None`` uses the pinned instructions file; ``""`` means explicitly no instruction.
    """

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.\-]*$")
    type: LocalTaskType
    path: str
    instruction: str | None = None
    description: str = ""
    lang: str = Field("eng-Latn", pattern=r"^[a-z]{3}-[A-Z][a-z]{3}$")

    @property
    def mteb_type(self) -> str:
        return MTEB_TYPE[self.type]


class LocalTasksFile(StrictModel):
    """A YAML file holding only local tasks (``kalm eval --local-config FILE``)."""

    local_tasks: list[LocalTaskSpec] = []


class EvalConfig(StrictModel):
    """``configs/eval.yaml``: what ``kalm eval`` and the evaluation stage run.

    - ``tasks``: mteb task or benchmark names (``"MTEB(eng, v1)"``, ``"STSBenchmark"``); offline, their data
      must be in the Hugging Face cache.
    - ``local_tasks``: tasks over local files (:class:`LocalTaskSpec`); they always run.
    - ``holdout_tasks``: also evaluate a retrieval task per recipe with held-out rows in the data root.
    - ``stdlib_task``: also evaluate the stdlib-docstring classification task, built once under
      ``<data root>/eval_data/stdlib_docstrings/`` (``local_tasks.build_stdlib_docstring_task``).
    - ``general_suite``: also evaluate the held-out general suite (retrieval, pair classification,
      clustering, classification from local text no recipe trains on: ``heldout.build_general_suite``).
    - ``dims``: Matryoshka truncations scored in addition to the model's full dimension.
    - ``dev_tasks``: names (among the above) whose mean main score is the greedy soup's dev score; empty
      means every local task (then soup selection and report share data: optimistic, logged).
    - ``output``: results go to ``<data root>/<output>/<model fingerprint>/``.
    """

    tasks: list[str] = []
    local_tasks: list[LocalTaskSpec] = []
    holdout_tasks: bool = False
    stdlib_task: bool = False
    general_suite: bool = False
    dims: list[int] = []
    batch_size: int = Field(32, ge=1)
    instructions: str = str(DEFAULT_INSTRUCTIONS)
    output: str = "eval"
    dev_tasks: list[str] = []
    max_seq_length: int | None = Field(None, ge=8)

    @field_validator("dims")
    @classmethod
    def _positive_dims(cls, v: list[int]) -> list[int]:
        if any(d < 1 for d in v):
            raise ValueError(f"dims must be positive integers, got {v}")
        return v


def _resolve(path: str, base: Path) -> str:
    """``path`` relative to ``base`` unless absolute or a URI."""
    if "://" in path or Path(path).is_absolute():
        return path
    return str((base / path).resolve())


def resolve_specs(specs: list[LocalTaskSpec], base: Path) -> list[LocalTaskSpec]:
    """Local task paths made absolute against ``base`` (the folder of the YAML that declared them)."""
    return [s.model_copy(update={"path": _resolve(s.path, base)}) for s in specs]


def check_unique_names(specs: list[LocalTaskSpec]) -> None:
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise KalmError(f"local task name {s.name!r} is declared twice")
        seen.add(s.name)


def load_eval_config(path: str | Path | None = None) -> EvalConfig:
    """Load and validate an eval config (default ``configs/eval.yaml``); paths become absolute."""
    p = config_path(path) if path else DEFAULT_EVAL_CONFIG
    raw: Any = read_yaml(p)
    cfg = load_model(EvalConfig, raw, str(p))
    base = p.resolve().parent
    specs = resolve_specs(cfg.local_tasks, base)
    check_unique_names(specs)
    return cfg.model_copy(update={"local_tasks": specs, "instructions": _resolve(cfg.instructions, base)})


def load_local_tasks(path: str | Path) -> list[LocalTaskSpec]:
    """Local tasks from a YAML file ``{local_tasks: [...]}``; paths relative to that file."""
    p = Path(path)
    specs = load_model(LocalTasksFile, read_yaml(p), str(p)).local_tasks
    specs = resolve_specs(specs, p.resolve().parent)
    check_unique_names(specs)
    return specs
