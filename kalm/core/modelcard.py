"""The model card (``README.md``) of every model folder we write, as the Hugging Face Hub shows it: metadata
(library, pipeline tag, base model, tags), usage with the folder's own prompts, training data by recipe
with row counts, losses and hyperparameters, scores per task (added by the pipeline's eval stage) and
lineage, with paths relative to the data root. ``README.md`` is not part of the model fingerprint
(:mod:`kalm.core.fingerprint`), so writing or updating a card never changes what caches key on.

>>> print(loss_line({"name": "focal_infonce", "gamma": 0.5, "inner": {"name": "infonce", "temperature": 1}}))
focal InfoNCE (gamma 0.5) over InfoNCE (temperature 1)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kalm.core.config import REPO_ROOT

CARD = "README.md"
SCORES_HEADING = "## Scores"

_LOSS_NAMES = {"matryoshka": "Matryoshka", "distill": "distillation", "focal_infonce": "focal InfoNCE"}
_LOSS_KEYS = ("dims", "weights", "alpha", "teacher_temperature", "student_temperature", "gamma",
              "temperature", "hard_negatives", "mixing")  # fmt: skip


def write_card(folder: Path, text: str) -> None:
    """Write ``folder/README.md`` (temp name + rename: never half a card); an unchanged card is left alone,
    so a cached pipeline run writes nothing into a finished model."""
    card = folder / CARD
    if card.is_file() and card.read_text(encoding="utf-8") == text:
        return
    tmp = folder / f".{CARD}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(folder / CARD)


def loss_line(loss: dict[str, Any]) -> str:
    """The loss chain of a run record (``kalm_run.json`` ``loss``), outermost first, in one line."""
    parts = []
    node: dict[str, Any] | None = loss
    while node:
        name = _LOSS_NAMES.get(
            str(node.get("name")), "InfoNCE" if node.get("name") == "infonce" else node.get("name")
        )
        args = []
        for key in _LOSS_KEYS:
            value = node.get(key)
            if value is None:
                continue
            if key == "mixing":
                value = f"k {value.get('k')}, top {value.get('top_n')}" if isinstance(value, dict) else value
            args.append(f"{key} {value}")
        parts.append(f"{name} ({', '.join(args)})" if args else str(name))
        node = node.get("inner") if isinstance(node.get("inner"), dict) else None
    return " over ".join(parts)


def relative(path: str | None, root: Path | None) -> str | None:
    """``path`` relative to the data root when it lies under it, else to this project (``configs/...``),
    else its last two parts: a model folder never carries a machine's absolute paths."""
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    for base in (root, REPO_ROOT):
        if base is not None:
            try:
                return p.resolve().relative_to(base.resolve()).as_posix()
            except ValueError:
                pass
    return "/".join(p.parts[-2:])


def portable_paths(obj: Any, root: Path | None) -> Any:
    """A copy of a JSON-like record (``kalm_run.json``) with every absolute local path :func:`relative`."""
    if isinstance(obj, dict):
        return {k: portable_paths(v, root) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [portable_paths(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith("/") and "\n" not in obj:
        return relative(obj, root)
    return obj


def _front_matter(base_model: str | None, tags: list[str]) -> list[str]:
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity", "tags:"]
    lines += [f"- {t}" for t in ["sentence-transformers", "sentence-similarity", "feature-extraction", *tags]]
    if base_model:
        lines.append(f"base_model: {base_model}")
    return [*lines, "---", ""]


def _usage(prompts: dict[str, str], width: int | None, dims: list[int]) -> list[str]:
    q = 'model.encode(["how do I sort a dict by value?"]' + (', prompt_name="query")' if prompts else ")")
    lines = [
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("path/to/this/folder")',
        f"queries = {q}",
        'docs = model.encode(["sorted(d.items(), key=lambda kv: kv[1]) sorts the pairs by value"])',
        "print(model.similarity(queries, docs))",
        "```",
        "",
    ]
    if prompts:
        lines += [
            "Queries take an instruction: `prompt_name` is a task (`SciFact-query`), a task type "
            "(`Clustering`) or `query`; documents of retrieval tasks stay bare (`document` is empty). "
            "mteb finds the same prompts by task name.",
            "",
        ]
    else:
        lines += ["Texts are encoded bare: this model was trained without instructions.", ""]
    if len(dims) > 1:
        lines += [
            f"Matryoshka dimensions {dims} (full {width}): `SentenceTransformer(..., truncate_dim=d)`.",
            "",
        ]
    return lines


def training_card(
    run: dict[str, Any], root: Path | None, prompts: dict[str, str], soup: list[str] | None = None
) -> str:
    """The card of a training run's ``final/`` folder from its run record (``kalm_run.json``); with
    ``soup`` (its section's lines), the card of a soup whose first checkpoint ``run`` describes."""
    cfg = run.get("config") or {}
    loss = run.get("loss") or {}
    dims = list(loss.get("dims") or [run.get("width")])
    what = (
        f"A model soup (a weight average) of checkpoints from the `{run.get('stage')}` stage"
        if soup
        else f"A text-embedding model from the `{run.get('stage')}` stage"
    )
    lines = _front_matter(run.get("base_model"), ["kalm-pipeline", str(run.get("stage", ""))])
    lines += [
        f"# {'Model soup' if soup else run.get('run_name') or 'model'}",
        "",
        f"{what} of kalm-pipeline (the KaLM-Embedding-V2 recipe), trained from "
        f"`{run.get('base_model') or relative(run.get('model_dir'), root)}`. Dimension {run.get('width')}, "
        f"{cfg.get('model', {}).get('pooling', 'mean')} pooling, unit vectors, cosine similarity.",
        "",
        *_usage(prompts, run.get("width"), [d for d in dims if d]),
        *(soup or []),
        *data_section(run),
        *training_section(run),
        *([] if soup else lineage_section(run, root)),
    ]
    return "\n".join(lines).rstrip() + "\n"


def data_section(run: dict[str, Any]) -> list[str]:
    mix = run.get("mixture") or {}
    lines = [
        "## Training data",
        "",
        "| source | recipes | rows | sampling probability |",
        "|---|---|---:|---:|",
    ]
    for name, s in (mix.get("sources") or {}).items():
        lines.append(f"| {name} | {', '.join(s.get('recipes') or [name])} | {s.get('rows')} | {s.get('p')} |")
    dropped = mix.get("dropped") or {}
    if dropped:
        lines += [
            "",
            "Left out as too small: " + ", ".join(f"{k} ({v} rows)" for k, v in dropped.items()) + ".",
        ]
    return [*lines, ""]


def _round(x: Any) -> Any:
    return round(x, 4) if isinstance(x, float) else x


def training_section(run: dict[str, Any]) -> list[str]:
    cfg = run.get("config") or {}
    optim, data = cfg.get("optim") or {}, cfg.get("data") or {}
    world = run.get("world_size") or 1
    batch = cfg.get("per_device_batch")
    return [
        "## Training",
        "",
        f"- Loss: {loss_line(run.get('loss') or {})}.",
        f"- Optimiser: AdamW, lr {optim.get('lr')}, weight decay {optim.get('weight_decay')}, "
        f"{optim.get('schedule')} schedule with warmup ratio {optim.get('warmup_ratio')}, "
        f"gradient clip {optim.get('grad_clip')}.",
        f"- Batch: {batch} per device x {world} device(s) = {batch * world if batch else '?'} queries, "
        f"{data.get('group_size')} texts per query (positive + negatives), task-homogeneous "
        f"{data.get('homogeneous')}.",
        f"- Steps: {run.get('steps')}; precision {cfg.get('precision')}; "
        f"final loss {_round(run.get('final_loss'))}.",
        "",
    ]


def lineage_section(run: dict[str, Any], root: Path | None) -> list[str]:
    stage, name = run.get("stage"), run.get("run_name")
    return [
        "## Lineage",
        "",
        f"- Run: `runs/{stage}/{name}` (data root relative); initial model "
        f"`{relative(run.get('model_dir'), root)}` (fingerprint `{run.get('initial_model')}`).",
        f"- Model fingerprint `{run.get('model_fingerprint')}`, job `{run.get('job_fingerprint')}`, "
        f"created {run.get('created_at')}; the full record is `kalm_run.json` beside this card.",
        "",
    ]


def soup_card(
    record: dict[str, Any], first_run: dict[str, Any], root: Path | None, prompts: dict[str, str]
) -> str:
    """The card of a soup: the soup's inputs and weights, then its first checkpoint's training facts."""
    lines = [
        "## Model soup",
        "",
        f"Method `{record.get('method')}` over {len(record.get('inputs') or [])} fine-tuned checkpoints:",
        "",
    ]
    weights = record.get("weights") or []
    for i, inp in enumerate(record.get("inputs") or []):
        w = f", weight {weights[i]:.3f}" if i < len(weights) and isinstance(weights[i], (int, float)) else ""
        lines.append(f"- `{relative(inp.get('path'), root)}` (fingerprint `{inp.get('fingerprint')}`{w})")
    base = record.get("base")
    if base:
        lines.append(
            f"- merged with its base `{relative(base.get('path'), root)}` at weight {base.get('weight')}"
        )
    lines += [
        "",
        f"Soup fingerprint `{record.get('fingerprint')}`, created {record.get('created_at')}. Training data "
        f"and settings below are the first checkpoint's (`runs/{first_run.get('stage')}/"
        f"{first_run.get('run_name')}`); the others differ by seed.",
        "",
    ]
    return training_card(first_run, root, prompts, soup=lines)


def with_scores(card: str, rows: list[dict[str, Any]], baseline: list[dict[str, Any]] | None = None) -> str:
    """``card`` with its scores section replaced: one row per task at the full dimension (x100), and the
    baseline's score and the difference when given."""
    full = max((r["dim"] for r in rows), default=None)
    base = {r["task"]: r["main_score"] for r in baseline or [] if r["dim"] == full}
    lines = [SCORES_HEADING, ""]
    head = "| task | type | metric | score |" + (" base | difference |" if base else "")
    lines += [head, "|---|---|---|---:|" + ("---:|---:|" if base else "")]
    for r in sorted((r for r in rows if r["dim"] == full), key=lambda r: (r["task_type"], r["task"])):
        line = f"| {r['task']} | {r['task_type']} | {r['metric']} | {100 * r['main_score']:.2f} |"
        if base:
            b = base.get(r["task"])
            line += f" {100 * b:.2f} | {100 * (r['main_score'] - b):+.2f} |" if b is not None else " | |"
        lines.append(line)
    lines += ["", f"Dimension {full}; scores x100 (mteb main scores), written by the pipeline's eval stage."]
    section = "\n".join(lines)
    # one form whether the section is new or replaced (a blank line before the next heading, one newline
    # at the end), so the same scores give the same card: a cached run rewrites nothing
    pattern = re.compile(rf"{re.escape(SCORES_HEADING)}\n.*?(?=\n## |\Z)", re.S)
    if pattern.search(card):
        out = pattern.sub(lambda _: section + "\n", card, count=1)
    else:
        head_, sep, tail = card.partition("## Lineage")
        out = head_.rstrip("\n") + "\n\n" + section + ("\n\n" + sep + tail if sep else "")
    return out.rstrip() + "\n"
