"""The retraining DAG as a plain function over a :class:`~kalm.pipeline.runner.Runner`.

ingest (every recipe, in parallel) -> stage mixtures (dedup, decontamination) -> mine with the base model
-> pre-train -> refresh negatives with the pre-trained checkpoint -> teacher scores (when the pipeline's
``scoring`` is enabled) -> fine-tune once per seed -> soup -> evaluate -> run manifest. Every stage is
content-keyed by the function it runs (recipe file, source fingerprint, config hash, model fingerprint,
teacher fingerprint) and says itself whether it was a cache hit, so an unchanged
rerun is a chain of cache hits and a changed recipe recomputes that recipe and what depends on it. The run
manifest and the reports are built from the stages' results, not re-read from disk.

    pipeline = load_pipeline("pipeline_demo.yaml", "./data")
    manifest = run_retrain(pipeline, LocalRunner())            # or PrefectRunner(), inside a flow
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from kalm.core.config import with_updates
from kalm.core.errors import KalmError
from kalm.core.hashing import hash_obj
from kalm.core.layout import final_dir, pipeline_latest, pipeline_run_manifest, run_dir, soup_dir
from kalm.core.results import StageResult
from kalm.data.recipes import LoadedRecipe
from kalm.pipeline.config import ALL_STAGES, Pipeline
from kalm.pipeline.data import run_data
from kalm.pipeline.report import stage_table_markdown, training_markdown
from kalm.pipeline.runner import Runner
from kalm.pipeline.stages import COMPARE, MINE, SCORE, SOUP, TRAIN

log = logging.getLogger(__name__)


def check_stages(stages: Sequence[str] | None) -> list[str]:
    wanted = list(stages or ALL_STAGES)
    bad = [s for s in wanted if s not in ALL_STAGES]
    if bad:
        raise KalmError(f"unknown stages {bad}; choose from {list(ALL_STAGES)}")
    return wanted


def select_recipes(p: Pipeline) -> dict[str, LoadedRecipe]:
    """The recipes this pipeline trains on (its names and tags), by name."""
    pc = p.config
    picked = {lr.name: lr for lr in p.recipes.select(pc.data.recipes, pc.data.tags)}
    if not picked:
        raise KalmError(f"pipeline {pc.name}: no recipe matches tags {pc.data.tags}, names {pc.data.recipes}")
    return picked


def run_name(p: Pipeline, stage: str, seed: int | None = None) -> str:
    return f"{p.name}-{stage}" if seed is None else f"{p.name}-{stage}-seed{seed}"


def finished_model(p: Pipeline, stage: str, name: str) -> str | None:
    final = final_dir(p.root, stage, name)
    return str(final) if (final / "kalm_run.json").exists() else None


def pretraining(p: Pipeline) -> tuple[bool, str]:
    """Whether this pipeline pre-trains, and why (``pretrain.enabled``; "auto" reads the initial model).

    KaLM's weakly supervised pre-training turns a language model into an embedder. A model that already is
    one is fine-tuned directly under "auto": on the demo, 30 pre-training steps on one domain's pairs cost
    all-MiniLM-L6-v2 2.1 points of held-out classification (averaged over 30 cross-validation splits) that
    fine-tuning did not win back, for about 2 points in-domain (docs/model_and_losses.md).
    """
    setting = p.config.pretrain.enabled
    if isinstance(setting, bool):
        return setting, f"pretrain.enabled: {str(setting).lower()}"
    from kalm.training.config import resolve_model_path
    from kalm.training.model import is_sentence_embedder

    spec = p.pretrain.model.path
    try:
        model = resolve_model_path(spec, p.root)  # aliases, stage:NAME, folders; hub ids when online
    except KalmError:
        model = spec  # a hub id offline: decided from its cached modules.json
    try:
        embedder = is_sentence_embedder(model)
    except ValueError as err:
        raise KalmError(f"pretrain.enabled auto: {err}; set pretrain.enabled to true or false") from None
    if embedder:
        return False, f"auto: {spec} already is a sentence embedder; fine-tuning starts from it"
    return True, f"auto: {spec} is a plain backbone; pre-training makes it an embedder"


def initial_model(p: Pipeline) -> str:
    """The model the pipeline's training starts from (the pretrain config's ``model.path``, resolved)."""
    from kalm.training.config import resolve_model_path

    return resolve_model_path(p.pretrain.model.path, p.root)


def _train_config(base: Any, overrides: dict[str, Any], decided: dict[str, Any], where: str) -> Any:
    """The stage config with what the DAG decides (run name, seed, model, recipes); a key the pipeline
    file overrides itself keeps the pipeline's value."""
    return with_updates(base, {k: v for k, v in decided.items() if k not in overrides}, where)


class _Clock:
    """Per-stage wall time and cache hits, logged as each stage ends."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.cached: dict[str, bool] = {}
        self.skipped: dict[str, str] = {}  # stage -> why the pipeline does not run it
        self._t0 = 0.0

    def skip(self, stage: str, why: str) -> None:
        self.skipped[stage] = why
        log.info("stage %s: skipped (%s)", stage, why)

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, stage: str, cached: bool) -> None:
        self.timings[stage] = round(time.perf_counter() - self._t0, 3)
        self.cached[stage] = cached
        log.info("stage %s: %.1f s%s", stage, self.timings[stage], " (cache hit)" if cached else "")


def run_soup(
    p: Pipeline, runner: Runner, checkpoints: list[str], out: Path, name: str, force: bool = False
) -> StageResult:
    """The pipeline's soup of ``checkpoints`` into ``out``: its method and weights, merged with the model
    training started from when ``soup.base_weight`` is set."""
    from kalm.training.config import resolve_model_path

    sc = p.config.soup
    return runner.run(
        SOUP,
        method=sc.method,
        checkpoints=checkpoints,
        out=out,
        weights=sc.weights,
        eval_cfg=p.eval,
        root=p.root,
        name=name,
        force=force,
        base=resolve_model_path(p.pretrain.model.path, p.root) if sc.base_weight else None,
        base_weight=sc.base_weight,
    )


def run_retrain(
    p: Pipeline,
    runner: Runner,
    *,
    stages: Sequence[str] | None = None,
    recipes: Sequence[str] | None = None,
    resume: bool = True,
    force_recipes: Collection[str] = (),
) -> dict[str, Any]:
    """Run the DAG; returns the run manifest (also written to ``pipeline/<name>/runs/<time>.json``).

    ``stages``: a subset of ingest, mine, pretrain, refresh, score, finetune, soup, eval (default all; a
    skipped stage's previous outputs are used). ``recipes``: only (re)ingest these (later stages still use
    every recipe of the pipeline). ``resume``: reuse finished outputs and checkpoints (False recomputes every
    selected stage). ``force_recipes``: re-ingest these even if unchanged.
    """
    t_start = time.perf_counter()
    pc, root = p.config, p.root
    wanted = check_stages(stages)
    for line in p.recipes.problems():
        log.warning("%s", line)
    picked = select_recipes(p)
    force = not resume
    clock = _Clock()
    results: dict[str, list[StageResult]] = {}
    manifest: dict[str, Any] = {
        "pipeline": pc.name,
        "config": str(p.source),
        "config_files": p.config_files,
        "config_hash": hash_obj(pc.model_dump(mode="json")),
        "data_root": root.uri,
        "stages": wanted,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    by_stage: dict[str, list[str]] = {}
    for n, lr in picked.items():
        by_stage.setdefault(lr.recipe.stage, []).append(n)

    # ---- ingest -> stage mixtures
    if "ingest" in wanted:
        clock.start()
        unknown = sorted(set(recipes or []) - set(picked))
        if unknown:
            raise KalmError(f"recipes {unknown} are not part of pipeline {pc.name} ({sorted(picked)})")
        todo = [lr for n, lr in picked.items() if not recipes or n in recipes]
        ingested, mixtures = run_data(
            runner,
            todo,
            list(picked.values()),
            root,
            p.ingest,
            force=force,
            forced=set(force_recipes),
            stages=list(by_stage),
            eval_cfg=p.eval,
        )
        from kalm.data.report import data_report_markdown

        runner.publish(
            "data-report",
            data_report_markdown(f"Data: {pc.name}", ingested, mixtures),
            "Rows per recipe and mixture, drops by reason",
        )
        results["ingest"], results["mixtures"] = ingested, mixtures
        clock.stop("ingest", all(r.cached for r in ingested + mixtures))
        manifest["recipes"] = {
            r.name: {**r.lineage, **{k: r.manifest.get(k) for k in ("rows_in", "rows_out", "drops")}}
            for r in ingested
        }
    else:
        from kalm.data.mixtures import published_mixtures

        results["mixtures"] = [m for s, names in by_stage.items() for m in published_mixtures(root, s, names)]
    mixed: dict[str, list[str]] = {}
    for m in results["mixtures"]:
        mixed.setdefault(str(m.manifest.get("stage")), []).append(m.name)
    manifest["mixtures"] = {
        s: {
            m.name: m.lineage.get("input_fingerprint")
            for m in results["mixtures"]
            if m.manifest.get("stage") == s
        }
        for s in by_stage
    }
    mine_names = {s: sorted(mixed.get(s, [])) for s in pc.mining.stages}

    def mine_with(model: str) -> list[StageResult]:
        calls = [
            {"root": root, "stage": s, "recipe": n, "model": model, "cfg": p.mine, "force": force}
            for s, names in mine_names.items()
            for n in names
        ]
        return runner.map(MINE, calls)

    # ---- first mining pass, with the base model, only where no checkpoint of ours exists yet
    pre_name = run_name(p, "pretrain")
    pretrains, why = pretraining(p)
    manifest["pretraining"] = {"enabled": pretrains, "why": why}
    if "mine" in wanted:
        clock.start()
        if pretrains and finished_model(p, "pretrain", pre_name) and "refresh" in wanted and not force:
            log.info("mine: a pre-trained checkpoint exists; negatives come from the refresh stage")
            clock.stop("mine", True)
        else:
            results["mine"] = mine_with(pc.mining.base_model)
            clock.stop("mine", all(r.cached for r in results["mine"]))

    # ---- pre-training (or none: fine-tuning then starts from the initial model)
    pretrained = finished_model(p, "pretrain", pre_name) if pretrains else None
    if "pretrain" in wanted and not pretrains:
        clock.skip("pretrain", why)
    elif "pretrain" in wanted:
        clock.start()
        cfg = _train_config(
            p.pretrain,
            pc.pretrain.overrides,
            {"run_name": pre_name, "data.recipes": sorted(mixed.get("pretrain", [])) or None},
            f"{pc.name}: pretrain",
        )
        if force:
            shutil.rmtree(run_dir(root, "pretrain", pre_name), ignore_errors=True)
        res = runner.run(TRAIN, cfg=cfg, root=root, nproc=pc.pretrain.nproc)
        results["pretrain"] = [res]
        pretrained = res.output
        clock.stop("pretrain", res.cached)
        runner.publish("pretrain-loss", training_markdown("pretrain", res), "pretrain loss curve")

    # ---- refresh the negatives with the newest checkpoint, right before fine-tuning
    if "refresh" in wanted and not pretrains:
        clock.skip("refresh", "no pre-training: the base model's negatives are current")
    elif "refresh" in wanted:
        clock.start()
        if pretrained is None:
            log.warning("refresh: no pre-trained checkpoint; keeping the base model's negatives")
        else:
            results["refresh"] = mine_with(str(pretrained))
        clock.stop("refresh", all(r.cached for r in results.get("refresh", [])))
    mined = results.get("refresh") or results.get("mine") or []
    manifest["mined"] = {}
    for r in mined:
        manifest["mined"].setdefault(r.manifest["stage"], {})[r.name] = _mined_lineage(r)
    manifest["stale_negatives"] = _stale(p, mined, mine_names)

    # ---- teacher scores of the mined rows (false-negative filter; distillation targets)
    if pc.scoring.enabled and "score" in wanted:
        clock.start()
        calls = [
            {"root": root, "stage": s, "recipe": n, "cfg": p.score, "force": force}
            for s, names in mine_names.items()
            for n in names
        ]
        results["score"] = runner.map(SCORE, calls)
        from kalm.mining.score import report_markdown

        runner.publish(
            "score-report", report_markdown(results["score"]), "Teacher scores and drops per recipe"
        )
        manifest["scored"] = {
            r.name: {**r.lineage, "stats": r.manifest.get("stats")} for r in results["score"]
        }
        clock.stop("score", all(r.cached for r in results["score"]))

    # ---- fine-tuning, once per seed (the soup's inputs)
    ft_names = [run_name(p, "finetune", seed) for seed in pc.finetune.seeds]
    finetuned: list[str] = []
    if "finetune" in wanted:
        clock.start()
        if pretrains and pretrained is None:
            raise KalmError("finetune: no pre-trained model; run the pretrain stage first")
        start = str(pretrained) if pretrains else initial_model(p)
        for seed, name in zip(pc.finetune.seeds, ft_names, strict=True):
            if force:
                shutil.rmtree(run_dir(root, "finetune", name), ignore_errors=True)
            decided = {
                "run_name": name,
                "seed": seed,
                "model.path": start,
                "data.recipes": mine_names.get("finetune") or None,
                **finetune_source(p),
            }
            cfg = _train_config(p.finetune, pc.finetune.overrides, decided, f"{pc.name}: finetune")
            results.setdefault("finetune", []).append(
                runner.run(TRAIN, cfg=cfg, root=root, nproc=pc.finetune.nproc)
            )
        finetuned = [r.output for r in results["finetune"]]
        clock.stop("finetune", all(r.cached for r in results["finetune"]))
        runner.publish(
            "finetune-loss", training_markdown("finetune", results["finetune"][0]), "finetune loss"
        )
    else:
        finetuned = [f for n in ft_names if (f := finished_model(p, "finetune", n))]

    # ---- soup
    soup_path = soup_dir(root, pc.name)
    if "soup" in wanted:
        clock.start()
        if not finetuned:
            raise KalmError("soup: no fine-tuned checkpoints; run the finetune stage first")
        soup = run_soup(p, runner, finetuned, soup_path, pc.name, force=force)
        results["soup"] = [soup]
        manifest["soup"] = soup.manifest
        clock.stop("soup", soup.cached)

    # ---- evaluate: the base model, each stage and the soup, in one comparison table
    if "eval" in wanted:
        clock.start()
        from kalm.training.config import resolve_model_path

        models: dict[str, str] = {}
        if pc.eval.compare_base:
            models["base"] = resolve_model_path(pc.mining.base_model, root)
        if pretrained:
            models["pretrain"] = str(pretrained)
        for seed, path in zip(pc.finetune.seeds, finetuned, strict=False):
            models[f"finetune-seed{seed}"] = path
        if (soup_path / "modules.json").exists():
            models["soup"] = str(soup_path)
        comparison = runner.run(COMPARE, models=models, config=p.eval, data_root=root.uri, force=force)
        out = comparison.to_dict()
        manifest["scores"] = {
            "models": models,
            **{k: out.get(k) for k in ("table_path", "markdown_path", "charts", "markdown", "rows")},
        }
        from kalm.evaluation.report import type_means_markdown

        by_label: dict[str, list[dict[str, Any]]] = {}
        for r in out.get("rows") or []:
            by_label.setdefault(str(r["label"]), []).append(r)
        overview = type_means_markdown(by_label) if by_label else ""
        runner.publish(
            "evaluation",
            f"# Overview: mean per task type\n\n{overview}\n{comparison.markdown}",
            "Base model vs each stage vs the soup",
        )
        if "soup" in models:
            _card_scores(soup_path, out["rows"])
        if comparison.new:  # new scores only: a cache hit would log the same points again
            _track_scores(models, out.get("rows") or [])
        clock.stop("eval", comparison.new == 0)

    # ---- report: one run manifest linking every artifact
    manifest["checkpoints"] = {"pretrain": str(pretrained) if pretrained else None, "finetune": finetuned}
    manifest["results"] = {k: [r.summary() for r in rs] for k, rs in results.items()}
    manifest["timings_s"] = clock.timings
    manifest["cache_hits"] = clock.cached
    manifest["skipped_stages"] = clock.skipped
    manifest["seconds"] = round(time.perf_counter() - t_start, 3)
    manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    rel = pipeline_run_manifest(pc.name, stamp)
    root.write_json(rel, manifest)
    root.write_json(pipeline_latest(pc.name), manifest)
    manifest["manifest_uri"] = root.full_uri(rel)
    runner.publish("stages", stage_table_markdown(manifest), "Stages: wall time and cache hits")
    log.info("run manifest: %s", root.full_uri(rel))
    return manifest


def finetune_source(p: Pipeline) -> dict[str, Any]:
    """What fine-tuning reads: the scored rows when the pipeline scores them, else its config's source."""
    return {"data.source": "scored"} if p.config.scoring.enabled else {}


def _mined_lineage(r: StageResult) -> dict[str, Any]:
    keep = ("miner", "index", "window", "top_k", "seed", "inputs", "fingerprint", "rows_out")
    return {**{k: r.manifest.get(k) for k in keep if k in r.manifest}, "cached": r.cached}


def _stale(p: Pipeline, mined: list[StageResult], mine_names: dict[str, list[str]]) -> dict[str, list[str]]:
    """Recipes of the pipeline whose negatives on disk came from a model other than this run's miner."""
    from kalm.mining.report import stale_negatives

    fps = sorted({str(fp) for r in mined if (fp := (r.lineage.get("miner") or {}).get("fingerprint"))})
    if not fps:
        return {}
    stale = {
        s: [r for r in stale_negatives(p.root, s, fps[0]) if r in names] for s, names in mine_names.items()
    }
    stale = {s: v for s, v in stale.items() if v}
    if stale:
        log.warning("negatives mined by an older model: %s", stale)
    return stale


def rerun_recipe(p: Pipeline, runner: Runner, recipe: str, downstream: bool = True) -> dict[str, Any]:
    """Re-ingest one recipe (even if unchanged), then recompute only what depends on it: its stage mixture,
    its mined negatives and, when its data changed, the training runs, soup and scores.
    ``downstream=False`` stops after the recipe's mixture."""
    p.recipes.get(recipe)  # unknown or broken: one line, before any work
    stages = None if downstream else ["ingest"]
    return run_retrain(p, runner, stages=stages, recipes=[recipe], force_recipes=[recipe])


def _card_scores(folder: Path, rows: list[dict[str, Any]]) -> None:
    """The soup's model card gets its scores per task, next to the base model's."""
    from kalm.core.modelcard import CARD, with_scores, write_card

    card = folder / CARD
    if card.is_file():
        mine = [r for r in rows if r["label"] == "soup"]
        base = [r for r in rows if r["label"] == "base"] or None
        write_card(folder, with_scores(card.read_text(encoding="utf-8"), mine, base))


def _track_scores(models: dict[str, str], rows: list[dict[str, Any]]) -> None:
    """Scores into TensorBoard next to the step metrics: a training run's ``tb/`` at its last step, the
    soup's ``runs/soup/<name>.tb`` (not inside the model folder: its fingerprint would change)."""
    from kalm.evaluation.checkpoints import read_json_file
    from kalm.training.tracking import TB_DIR, log_scores

    for label, path in models.items():
        if label == "base" or "://" in path:
            continue
        mine = [r for r in rows if r["label"] == label]
        folder = Path(path)
        if label == "soup":
            log_scores(folder.parent / f"{folder.name}.tb", mine, 0)
        else:
            run = read_json_file(folder / "kalm_run.json")
            log_scores(folder.parent / TB_DIR, mine, int(run.get("steps") or 0))
