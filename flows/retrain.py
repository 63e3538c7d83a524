"""The full retraining DAG and its two small siblings.

``retrain``: ingest (every recipe, in parallel) -> stage mixtures (dedup, decontamination) -> mine with the
base model -> pre-train -> refresh negatives with the pre-trained checkpoint -> fine-tune N times -> soup ->
evaluate -> report. Every stage is content-keyed by the plain function it wraps (recipe file, source
fingerprint, config hash, model fingerprint), so an unchanged rerun is a chain of cache hits and a changed
recipe recomputes that recipe and what depends on it.

``rerun_recipe``: force one recipe's ingest, then let the DAG recompute its dependents.
``evaluate``: score one model folder with the eval config.

The flow only wires tasks (STYLE.md #4); all logic lives in curation/, mining/, training/, evaluation/.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from kalm.errors import KalmError
from kalm.hashing import hash_obj
from kalm.pipeline import ALL_STAGES, PipelineConfig, config_path, load_pipeline_config
from kalm.recipes import discover
from kalm.storage import DataRoot, resolve_root

log = logging.getLogger("flows.retrain")

# When set, tasks run as plain function calls (no Prefect): bench/bench_pipeline.py measures Prefect's own
# overhead by running the same DAG both ways.
PLAIN: ContextVar[bool] = ContextVar("kalm_plain", default=False)


def _call(task: Any, *args: Any, **kwargs: Any) -> Any:
    return task.fn(*args, **kwargs) if PLAIN.get() else task(*args, **kwargs)


def _map(task: Any, calls: list[tuple[Any, ...]], workers: int = 2) -> list[Any]:
    """Run ``task(*args)`` for each args tuple concurrently; results in order."""
    if PLAIN.get():
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda a: task.fn(*a), calls))
    futures = [task.submit(*a) for a in calls]
    return [f.result() for f in futures]


def _logger() -> Any:
    if PLAIN.get():
        return log
    from prefect import get_run_logger

    try:
        return get_run_logger()
    except Exception:  # called outside a run context
        return log


def _artifact(kind: str, **kwargs: Any) -> None:
    if PLAIN.get():
        return
    from prefect import artifacts

    try:
        getattr(artifacts, f"create_{kind}_artifact")(**kwargs)
    except Exception as e:  # an artifact is a convenience; never fail a run for it
        log.warning("could not publish %s artifact: %s", kind, e)


def select_recipes(pc: PipelineConfig, recipes_dirs: list[str]) -> dict[str, str]:
    """{recipe name: stage} of the recipes this pipeline trains on (its tags / names)."""
    found = discover(recipes_dirs)
    if pc.data.recipes:
        unknown = sorted(set(pc.data.recipes) - set(found))
        if unknown:
            raise KalmError(f"pipeline {pc.name}: unknown recipes {unknown}; see `kalm data list`")
    picked: dict[str, str] = {
        n: lr.recipe.stage
        for n, lr in sorted(found.items())
        if (not pc.data.recipes or n in pc.data.recipes)
        and (not pc.data.tags or set(pc.data.tags) & set(lr.recipe.tags))
    }
    if not picked:
        raise KalmError(f"pipeline {pc.name}: no recipe matches tags {pc.data.tags}, names {pc.data.recipes}")
    return picked


def _check_stages(stages: list[str] | None) -> list[str]:
    wanted = list(stages or ALL_STAGES)
    bad = [s for s in wanted if s not in ALL_STAGES]
    if bad:
        raise KalmError(f"unknown stages {bad}; choose from {list(ALL_STAGES)}")
    return wanted


def _run_name(pc: PipelineConfig, stage: str, seed: int | None = None) -> str:
    return f"{pc.name}-{stage}" if seed is None else f"{pc.name}-{stage}-seed{seed}"


def run_dir(root: DataRoot, stage: str, name: str) -> Path:
    """Where a training run writes. Checkpoints need a local disk: with an s3:// data root they go to
    $KALM_LOCAL_DIR (default ~/.cache/kalm/<root hash>) and the final model is copied to the data root."""
    if root.is_local:
        return Path(root.path("runs", stage, name))
    import os

    base = Path(os.environ.get("KALM_LOCAL_DIR") or Path.home() / ".cache" / "kalm" / hash_obj(root.uri, 8))
    return base / "runs" / stage / name


def _upload_final(root: DataRoot, stage: str, name: str, final: Path) -> None:
    if root.is_local:
        return
    from pyarrow import fs as pafs

    dest = root.path("runs", stage, name, "final")
    local = pafs.LocalFileSystem()
    pafs.copy_files(str(final), dest, source_filesystem=local, destination_filesystem=root.fs)


def _finished_model(root: DataRoot, stage: str, run_name: str) -> str | None:
    final = run_dir(root, stage, run_name) / "final"
    return str(final) if (final / "kalm_run.json").exists() else None


def _png_markdown(title: str, png: Path) -> str:
    """A PNG inlined as a data URI (the UI shows it without any file server) plus where the file lives."""
    if not png.exists():
        return f"### {title}\n\n(no image: {png})\n"
    data = base64.b64encode(png.read_bytes()).decode()
    return f"### {title}\n\n![{title}](data:image/png;base64,{data})\n\n`{png}`\n"


def _mine(
    stage: str, names: list[str], model: str, data_root: str, mine_config: str, force: bool
) -> list[dict[str, Any]]:
    from tasks.mining import mine_recipe_task

    return _map(mine_recipe_task, [(stage, n, model, data_root, mine_config, force) for n in names])


@flow(name="retrain", log_prints=False, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def retrain_flow(
    config: str = "pipeline_demo.yaml",
    stages: list[str] | None = None,
    recipes: list[str] | None = None,
    data_root: str | None = None,
    resume: bool = True,
    recipes_dirs: list[str] | None = None,
    force_recipes: list[str] | None = None,
) -> dict[str, Any]:
    """Run the retraining DAG.

    config: a pipeline YAML (path or name in configs/). stages: a subset of ingest, mine, pretrain, refresh,
    finetune, soup, eval (default all; a skipped stage's previous outputs are used). recipes: only (re)ingest
    these (the later stages still use every recipe of the pipeline). resume: reuse finished outputs and
    checkpoints (False recomputes every selected stage). force_recipes: re-ingest these even if unchanged.
    """
    from tasks.data import build_stage_task, ingest_recipe_task
    from tasks.training import train_task

    t_start = time.perf_counter()
    logger = _logger()
    pc = load_pipeline_config(config)
    wanted = _check_stages(stages)
    root_uri = resolve_root(data_root)
    root = DataRoot.from_uri(root_uri)
    rdirs = list(recipes_dirs or [])
    picked = select_recipes(pc, rdirs)
    force = not resume
    cfg_ingest = str(config_path(pc.data.config))
    cfg_mine = str(config_path(pc.mining.config))
    cfg_eval = str(config_path(pc.eval.config))
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}
    manifest: dict[str, Any] = {
        "pipeline": pc.name,
        "config": str(config_path(config)),
        "config_hash": hash_obj(pc.model_dump(mode="json")),
        "data_root": root.uri,
        "stages": wanted,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    def timed(stage: str, t0: float) -> None:
        timings[stage] = round(time.perf_counter() - t0, 3)
        logger.info("stage %s: %.1f s%s", stage, timings[stage], " (cache hit)" if cached.get(stage) else "")

    # ---- ingest -> stage mixtures
    by_stage: dict[str, list[str]] = {}
    for n, s in picked.items():
        by_stage.setdefault(s, []).append(n)
    if "ingest" in wanted:
        t0 = time.perf_counter()
        todo = [n for n in picked if not recipes or n in recipes]
        unknown = sorted(set(recipes or []) - set(picked))
        if unknown:
            raise KalmError(f"recipes {unknown} are not part of pipeline {pc.name} ({sorted(picked)})")
        forced = set(force_recipes or [])
        results = _map(
            ingest_recipe_task,
            [(n, root_uri, rdirs, cfg_ingest, force or n in forced) for n in todo],
        )
        mixtures = [
            _call(build_stage_task, s, names, root_uri, cfg_ingest, force) for s, names in by_stage.items()
        ]
        from kalm.reports import data_report_markdown

        _artifact(
            "markdown",
            markdown=data_report_markdown(f"Data: {pc.name}", results, mixtures),
            key="data-report",
            description="Rows per recipe and mixture, drops by reason",
        )
        cached["ingest"] = all(r.get("skipped") for r in results) and all(
            all(v.get("skipped") for v in m.get("recipes", {}).values()) for m in mixtures
        )
        manifest["recipes"] = {
            r["recipe"]: {
                k: r.get(k)
                for k in ("recipe_file", "source_fingerprint", "config_hash", "rows_in", "rows_out", "drops")
            }
            for r in results
        }
        timed("ingest", t0)
    from curation.stage import mixture_dir, read_manifest

    manifest["mixtures"] = {
        s: {
            n: (read_manifest(root, mixture_dir(s, n)) or {}).get("input_fingerprint")
            for n in names
            if read_manifest(root, mixture_dir(s, n)) is not None
        }
        for s, names in by_stage.items()
    }
    mine_names = {s: sorted(manifest["mixtures"].get(s, {})) for s in pc.mining.stages}

    # ---- first mining pass, with the base model, only where no checkpoint of ours exists yet
    pre_name = _run_name(pc, "pretrain")
    mined: dict[str, list[dict[str, Any]]] = {}
    if "mine" in wanted:
        t0 = time.perf_counter()
        have_ckpt = _finished_model(root, "pretrain", pre_name) is not None and "refresh" in wanted
        if have_ckpt and not force:
            logger.info("mine: a pre-trained checkpoint exists; negatives come from the refresh stage")
            cached["mine"] = True
        else:
            for s, names in mine_names.items():
                mined[s] = _mine(s, names, pc.mining.base_model, root_uri, cfg_mine, force)
            cached["mine"] = all(m.get("skipped") for ms in mined.values() for m in ms)
        timed("mine", t0)

    # ---- pre-training
    pretrained = _finished_model(root, "pretrain", pre_name)
    if "pretrain" in wanted:
        t0 = time.perf_counter()
        overrides = {
            "run_name": pre_name,
            "data.recipes": sorted(manifest["mixtures"].get("pretrain", {})) or None,
            **({} if root.is_local else {"output_dir": str(run_dir(root, "pretrain", pre_name))}),
            **pc.pretrain.overrides,
        }
        if force:
            _wipe_run(root, "pretrain", pre_name)
        before = _run_stamp(root, "pretrain", pre_name)
        pretrained = _call(train_task, pc.pretrain.config, pre_name, root_uri, overrides, pc.pretrain.nproc)
        cached["pretrain"] = before is not None and before == _run_stamp(root, "pretrain", pre_name)
        _upload_final(root, "pretrain", pre_name, Path(str(pretrained)))
        timed("pretrain", t0)
        _publish_training("pretrain", Path(str(pretrained)))

    # ---- refresh the negatives with the newest checkpoint, right before fine-tuning
    if "refresh" in wanted:
        t0 = time.perf_counter()
        if pretrained is None:
            logger.warning("refresh: no pre-trained checkpoint; keeping the base model's negatives")
        else:
            for s, names in mine_names.items():
                mined[s] = _mine(s, names, str(pretrained), root_uri, cfg_mine, force)
        cached["refresh"] = all(m.get("skipped") for ms in mined.values() for m in ms)
        timed("refresh", t0)
    if mined:
        from mining.mine import stale_negatives

        manifest["mined"] = {
            s: {m["recipe"]: _mined_lineage(m) for m in ms if m.get("recipe")} for s, ms in mined.items()
        }
        fps = {m.get("miner", {}).get("fingerprint") for ms in mined.values() for m in ms} - {None}
        stale = {
            s: [r for r in stale_negatives(root, s, fp) if r in names]
            for s, names in mine_names.items()
            for fp in sorted(fps)[:1]
        }
        manifest["stale_negatives"] = {s: v for s, v in stale.items() if v}
        if manifest["stale_negatives"]:
            logger.warning("negatives mined by an older model: %s", manifest["stale_negatives"])
    else:
        manifest["stale_negatives"] = {}

    # ---- fine-tuning, once per seed (the soup's inputs)
    finetuned: list[str] = []
    ft_names = [_run_name(pc, "finetune", seed) for seed in pc.finetune.seeds]
    if "finetune" in wanted:
        t0 = time.perf_counter()
        if pretrained is None:
            raise KalmError("finetune: no pre-trained model; run the pretrain stage first")
        stamps = [_run_stamp(root, "finetune", n) for n in ft_names]
        for seed, name in zip(pc.finetune.seeds, ft_names, strict=True):
            if force:
                _wipe_run(root, "finetune", name)
            overrides = {
                "run_name": name,
                "seed": seed,
                "model.path": str(pretrained),
                "data.recipes": mine_names.get("finetune") or None,
                **({} if root.is_local else {"output_dir": str(run_dir(root, "finetune", name))}),
                **pc.finetune.overrides,
            }
            final = str(_call(train_task, pc.finetune.config, name, root_uri, overrides, pc.finetune.nproc))
            _upload_final(root, "finetune", name, Path(final))
            finetuned.append(final)
        cached["finetune"] = all(s is not None for s in stamps) and stamps == [
            _run_stamp(root, "finetune", n) for n in ft_names
        ]
        timed("finetune", t0)
        _publish_training("finetune", Path(finetuned[0]))
    else:
        finetuned = [m for n in ft_names if (m := _finished_model(root, "finetune", n))]

    # ---- soup
    soup_path = str(run_dir(root, "soup", pc.name))
    soup: dict[str, Any] | None = None
    if "soup" in wanted:
        t0 = time.perf_counter()
        from tasks.evaluation import soup_task

        if not finetuned:
            raise KalmError("soup: no fine-tuned checkpoints; run the finetune stage first")
        soup = _call(
            soup_task, pc.soup.method, finetuned, soup_path, pc.soup.weights, cfg_eval, root_uri, force
        )
        cached["soup"] = bool(soup and soup.get("reused"))
        if not cached["soup"]:
            _upload_final(root, "soup", pc.name, Path(soup_path))
        timed("soup", t0)
        manifest["soup"] = soup

    # ---- evaluate: the base model, each stage and the soup, in one comparison table
    if "eval" in wanted:
        t0 = time.perf_counter()
        from tasks.evaluation import compare_task
        from training.config import resolve_model_path

        models: dict[str, str] = {}
        if pc.eval.compare_base:
            models["base"] = resolve_model_path(pc.mining.base_model, root)
        if pretrained:
            models["pretrain"] = str(pretrained)
        for seed, path in zip(pc.finetune.seeds, finetuned, strict=False):
            models[f"finetune-seed{seed}"] = path
        if Path(soup_path, "config.json").exists() or Path(soup_path, "modules.json").exists():
            models["soup"] = soup_path
        comparison = _call(compare_task, models, cfg_eval, root_uri, force)
        cached["eval"] = bool(comparison.get("reused"))
        manifest["scores"] = {
            "models": models,
            **{k: comparison.get(k) for k in ("table_path", "markdown_path", "charts", "markdown", "rows")},
        }
        _artifact(
            "markdown",
            markdown=comparison.get("markdown", ""),
            key="evaluation",
            description="Base model vs each stage vs the soup",
        )
        timed("eval", t0)

    # ---- report: one run manifest linking every artifact
    manifest["checkpoints"] = {"pretrain": str(pretrained) if pretrained else None, "finetune": finetuned}
    manifest["timings_s"] = timings
    manifest["cache_hits"] = cached
    manifest["seconds"] = round(time.perf_counter() - t_start, 3)
    manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    rel = f"pipeline/{pc.name}/runs/{stamp}.json"
    root.write_json(rel, manifest)
    root.write_json(f"pipeline/{pc.name}/latest.json", manifest)
    _artifact("link", link=root.full_uri(rel), link_text="run manifest (lineage)", key="run-manifest")
    logger.info("run manifest: %s", root.full_uri(rel))
    return manifest


def _wipe_run(root: DataRoot, stage: str, name: str) -> None:
    import shutil

    shutil.rmtree(run_dir(root, stage, name), ignore_errors=True)


def _run_stamp(root: DataRoot, stage: str, name: str) -> str | None:
    """The finished run's identity (job fingerprint + write time): equal before and after = cache hit."""
    m = run_dir(root, stage, name) / "_manifest.json"
    if not m.exists():
        return None
    return f"{json.loads(m.read_text()).get('job_fingerprint')}:{m.stat().st_mtime_ns}"


def _mined_lineage(m: dict[str, Any]) -> dict[str, Any]:
    keep = ("miner", "index", "window", "top_k", "M", "seed", "inputs", "fingerprint", "rows_out", "skipped")
    return {k: m.get(k) for k in keep if k in m}


def _publish_training(stage: str, final: Path) -> None:
    run_dir = final.parent
    md = [f"## {stage}: `{run_dir.name}`", ""]
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        last = [json.loads(x) for x in metrics.read_text().splitlines()[-1:] if x.strip()]
        if last:
            md += ["last step: " + ", ".join(f"{k} {v}" for k, v in last[0].items()), ""]
    md.append(_png_markdown(f"{stage} loss", final / "loss.png"))
    _artifact("markdown", markdown="\n".join(md), key=f"{stage}-loss", description=f"{stage} loss curve")


@flow(name="rerun_recipe")
def rerun_recipe_flow(
    recipe: str,
    config: str = "pipeline_demo.yaml",
    data_root: str | None = None,
    downstream: bool = True,
    recipes_dirs: list[str] | None = None,
) -> dict[str, Any]:
    """Re-ingest one recipe (even if unchanged), then recompute only what depends on it: its stage
    mixture, its mined negatives and, when its data changed, the training runs, soup and scores.
    downstream=False stops after the recipe's mixture."""
    stages = None if downstream else ["ingest"]
    return retrain_flow(
        config=config,
        stages=stages,
        recipes=[recipe],
        data_root=data_root,
        recipes_dirs=recipes_dirs,
        force_recipes=[recipe],
    )


@flow(name="evaluate")
def evaluate_flow(
    model: str,
    config: str = "eval.yaml",
    data_root: str | None = None,
    tasks: list[str] | None = None,
    label: str = "model",
) -> dict[str, Any]:
    """Score one model folder (or alias, e.g. minilm) on the eval config's tasks; publishes the table."""
    from tasks.evaluation import evaluate_task
    from training.config import resolve_model_path

    root_uri = resolve_root(data_root)
    path = resolve_model_path(model, DataRoot.from_uri(root_uri))
    res = _call(evaluate_task, path, label, str(config_path(config)), root_uri, tasks)
    rows = res.get("rows") or []
    if rows:
        cols = list(rows[0])
        md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        md += "".join("| " + " | ".join(str(r.get(c)) for c in cols) + " |\n" for r in rows)
        _artifact("markdown", markdown=f"# {label}: `{path}`\n\n{md}", key="evaluation")
    return dict(res)
