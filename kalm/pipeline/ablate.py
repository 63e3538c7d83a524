"""The ablation the project runs on itself: the pipeline's fine-tuning with one component switched off at a
time, every variant scored on the same tasks (the eval config's: in-domain and the held-out general suite).

    kalm ablate --config pipeline_demo.yaml          # after (or as part of) a demo run

Variants (each a soup of the pipeline's fine-tuning seeds, merged with the base as the pipeline says):
``full`` (the pipeline as configured: its own runs, so a cache hit after ``kalm retrain``), ``no focal``
(γ = 0), ``no mixing`` (k = 0), ``no masking`` (copies of the positive, same-class candidates and the
in-batch scope are not masked; padding still is), ``no distillation`` (α = 0 on the same scored rows; only
when the pipeline scores them), ``no soup`` (the full variant's first seed alone, not averaged, not
merged), and ``pretraining`` (the opposite of what the pipeline does: ``no pretraining`` fine-tunes from
the initial model, ``with pretraining`` from a pre-training run of the pipeline's pretrain config; both on the
same mined and scored rows as ``full``, so only the starting point differs). The stages before fine-tuning
are the DAG's (cache hits when it ran).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from kalm.core.config import with_updates
from kalm.core.layout import soup_dir
from kalm.pipeline.config import Pipeline
from kalm.pipeline.dag import (
    _train_config,
    finetune_source,
    finished_model,
    initial_model,
    pretraining,
    run_name,
    run_retrain,
    run_soup,
)
from kalm.pipeline.runner import Runner
from kalm.pipeline.stages import COMPARE, TRAIN

log = logging.getLogger(__name__)

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no focal": {"loss.focal_gamma": 0.0},
    "no mixing": {"loss.mix_k": 0},
    "no masking": {"loss.mask_false_negatives": False},
    "no distillation": {"loss.distill_alpha": 0.0},
    "pretraining": {},  # toggled: "no pretraining" or "with pretraining" (see the module docstring)
}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_ablation(
    p: Pipeline, runner: Runner, variants: Mapping[str, dict[str, Any]] = VARIANTS, resume: bool = True
) -> dict[str, Any]:
    """Train, soup and score every variant; returns ``{"markdown", "table_path", "models", "rows"}`` and
    writes ``pipeline/<name>/ablation.md``."""
    from kalm.training.config import resolve_model_path

    pc, root = p.config, p.root
    run = run_retrain(p, runner, stages=["ingest", "mine", "pretrain", "refresh", "score"], resume=resume)
    pretrains, _ = pretraining(p)
    start = finished_model(p, "pretrain", run_name(p, "pretrain")) if pretrains else initial_model(p)
    if start is None:
        raise RuntimeError("the pretrain stage left no model")
    recipes = sorted((run.get("mined") or {}).get("finetune", {})) or None
    models: dict[str, str] = {"base": resolve_model_path(pc.mining.base_model, root)}
    for name, overrides in variants.items():
        if name == "no distillation" and not pc.scoring.enabled:
            continue  # no teacher scores: the same runs as "full"
        init = start
        if name == "pretraining":
            name = "no pretraining" if pretrains else "with pretraining"
            init = initial_model(p) if pretrains else _pretrain(p, runner, run)
        finals = []
        for seed in pc.finetune.seeds:
            own = name == "full"  # the pipeline's own runs: cache hits after a retrain
            decided = {
                "run_name": run_name(p, "finetune", seed)
                if own
                else f"{p.name}-ablate-{_slug(name)}-seed{seed}",
                "seed": seed,
                "model.path": init,
                "data.recipes": recipes,
                **finetune_source(p),
            }
            where = f"{pc.name}: ablation {name}"
            cfg = _train_config(p.finetune, pc.finetune.overrides, decided, where)
            # the variant's switch wins over the pipeline's own overrides (they may set the same key)
            cfg = with_updates(cfg, overrides, where) if overrides else cfg
            finals.append(runner.run(TRAIN, cfg=cfg, root=root, nproc=pc.finetune.nproc).output)
        out = soup_dir(root, pc.name if name == "full" else f"{pc.name}-ablate-{_slug(name)}")
        soup = run_soup(p, runner, finals, out, out.name)
        models[name] = soup.output
        if name == "full":
            models["no soup"] = finals[0]
    comparison = runner.run(COMPARE, models=models, config=p.eval, data_root=root.uri, force=False)
    md = ablation_markdown(comparison.table.to_pylist(), list(models))
    root.write_bytes(f"pipeline/{pc.name}/ablation.md", md.encode("utf-8"))
    runner.publish("ablation", md, "Each component switched off in turn")
    return {
        "markdown": md,
        "table_path": comparison.table_path,
        "models": models,
        "rows": comparison.table.to_pylist(),
    }


def _pretrain(p: Pipeline, runner: Runner, run: dict[str, Any]) -> str:
    """A pre-training run of the pipeline's pretrain config (its own run name) for a pipeline that skips
    pre-training: the ``with pretraining`` variant starts from it."""
    decided = {
        "run_name": f"{p.name}-ablate-pretrain",
        "data.recipes": sorted((run.get("mixtures") or {}).get("pretrain", {})) or None,
    }
    cfg = _train_config(p.pretrain, p.config.pretrain.overrides, decided, f"{p.name}: ablation pretrain")
    return str(runner.run(TRAIN, cfg=cfg, root=p.root, nproc=p.config.pretrain.nproc).output)


def ablation_markdown(rows: list[dict[str, Any]], labels: list[str]) -> str:
    """One row per variant, one column per task (full dim, ×100), then the mean; the delta to ``full``."""
    full_dim = {r["task"]: max(x["dim"] for x in rows if x["task"] == r["task"]) for r in rows}
    score = {(r["label"], r["task"]): 100 * r["main_score"] for r in rows if r["dim"] == full_dim[r["task"]]}
    tasks = sorted({t for _, t in score})
    lines = [
        "| variant | " + " | ".join(tasks) + " | mean | mean - full |",
        "|---|" + "---:|" * (len(tasks) + 2),
    ]
    means = {lb: sum(score.get((lb, t), 0.0) for t in tasks) / len(tasks) for lb in labels}
    for lb in labels:
        cells = " | ".join(f"{score[(lb, t)]:.2f}" if (lb, t) in score else "-" for t in tasks)
        delta = "" if lb == "full" else f"{means[lb] - means.get('full', 0.0):+.2f}"
        lines.append(f"| {lb} | {cells} | {means[lb]:.2f} | {delta} |")
    return "\n".join(lines) + "\n"
