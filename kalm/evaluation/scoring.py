"""Running mteb on one model: every task at every Matryoshka dim, sequentially in this process or spread
over one spawned worker per GPU (:func:`run_queue`); plus the greedy soup's dev score (:class:`DevScorer`).

>>> rows = evaluate_model("runs/soup/demo", tasks, [384], Path("/tmp/w"), instructions=ins)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import queue
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalm.core.errors import KalmError
from kalm.core.fingerprint import model_fingerprint
from kalm.core.hashing import hash_obj
from kalm.evaluation.checkpoints import check_model_folder, read_json_file
from kalm.evaluation.config import EvalConfig, LocalTaskSpec
from kalm.evaluation.instructions import InstructionSet, load_instructions
from kalm.evaluation.mteb_tasks import (
    EVAL_FORMAT_VERSION,
    ResolvedTask,
    check_offline,
    config_local_tasks,
    mteb_version,
    resolve_tasks,
)

log = logging.getLogger(__name__)


def embedding_dim(model_path: Path) -> int | None:
    """The output dimension a sentence-transformers folder declares (Dense or Pooling config), if readable."""
    modules = json.loads((model_path / "modules.json").read_text(encoding="utf-8"))
    for m in reversed(modules):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        cfg = read_json_file(model_path / m.get("path", "") / "config.json")
        if kind == "Dense" and "out_features" in cfg:
            return int(cfg["out_features"])
        if kind == "Pooling":
            base = cfg.get("word_embedding_dimension") or cfg.get("embedding_dimension")
            if not base:
                return None
            legacy = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
            return int(base) * max(1, len(legacy))
    return None


def full_dim(model_path: Path, instructions: InstructionSet, fingerprint: str) -> int:
    """The model's embedding dimension: from its configs, else by loading it (unusual module layouts)."""
    dim = embedding_dim(model_path)
    if dim is None:
        from kalm.evaluation.encoder import KalmEncoder

        dim = KalmEncoder(model_path, instructions=instructions, fingerprint=fingerprint).full_dim
    return dim


def dims_to_score(full_dim: int, dims: Sequence[int] | None) -> list[int]:
    """The full dimension plus the configured Matryoshka dims, unique, descending.

    >>> dims_to_score(384, [256, 384, 128])
    [384, 256, 128]
    """
    bad = [d for d in dims or [] if d > full_dim]
    if bad:
        raise KalmError(f"dims {bad} exceed the model's embedding dimension {full_dim}")
    return sorted({full_dim, *(dims or [])}, reverse=True)


def evaluate_task_dims(
    encoder: Any,
    rt: ResolvedTask,
    dims: Sequence[int],
    work_dir: Path,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Run one task at every dim with ``encoder`` (a KalmEncoder); write mteb JSON; return summary rows.

    The task's data is loaded once for all dims, and the encoder's memo makes each text encoded once.
    """
    import mteb
    from mteb.abstasks.aggregated_task import AbsTaskAggregate

    encoder.clear_cache()
    loaded_here = False
    if not isinstance(rt.task, AbsTaskAggregate) and not rt.task.data_loaded:
        rt.task.load_data()
        loaded_here = True
    rows = []
    try:
        for dim in dims:
            encoder.set_dim(dim)
            t0 = time.perf_counter()
            res = mteb.evaluate(
                encoder,
                [rt.task],
                cache=None,
                overwrite_strategy="always",
                show_progress_bar=False,
                encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
            )
            if res.exceptions:
                raise RuntimeError(f"mteb failed on {rt.name}: {res.exceptions}")
            tr = res.task_results[0]
            out = work_dir / f"d{dim}" / f"{rt.name}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            tr.to_disk(out)
            write_model_meta(encoder, dim, out.parent / "model_meta.json")
            used = encoder.used_instructions.get(rt.name) or dict(
                zip(
                    ("instruction", "source"), encoder.instructions.lookup(rt.name, rt.task_type), strict=True
                )
            )
            rows.append(
                {
                    "model": encoder.path.name,
                    "model_path": str(encoder.path.resolve()),
                    "fingerprint": encoder.fingerprint,
                    "task": rt.name,
                    "task_type": rt.task_type,
                    "source": rt.source,
                    "dim": dim,
                    "main_score": float(tr.get_score()),
                    "metric": str(rt.task.metadata.main_score),
                    "instruction": used["instruction"],
                    "instruction_source": used["source"],
                    "instructions_version": encoder.instructions.version,
                    "dataset_revision": rt.revision,
                    "mteb_version": mteb_version(),
                    "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "template": encoder.template or "",
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
            log.info("%s d%d: %s = %.4f", rt.name, dim, rows[-1]["metric"], rows[-1]["main_score"])
    finally:
        if loaded_here:
            rt.task.unload_data()
    return rows


def mteb_model_name(model_name: str, dim: int, full: int) -> str:
    """The model's name in mteb's results layout: a Matryoshka truncation is its own model (``-d256``)."""
    return model_name if dim == full else f"{model_name}-d{dim}"


def mteb_model_dir(model_name: str) -> str:
    """A model name as mteb's results layout names its folder (``ModelMeta.model_name_as_path``)."""
    return model_name.replace("/", "__").replace(" ", "_")


def write_model_meta(encoder: Any, dim: int, path: Path) -> None:
    """mteb's ``model_meta.json`` for the encoder at ``dim`` (what ``mteb.ResultCache`` reads a model by)."""
    meta = encoder.mteb_model_meta
    name = mteb_model_name(str(meta.name), dim, encoder.full_dim)
    path.write_text(json.dumps({**meta.to_dict(), "name": name}, default=str, indent=2), encoding="utf-8")


def visible_devices(devices: Sequence[str] | None = None) -> list[str]:
    """``devices`` as given, else one ``cuda:i`` per visible GPU when there are several, else one device."""
    if devices:
        return list(devices)
    import torch

    n = torch.cuda.device_count()
    if n > 1:
        return [f"cuda:{i}" for i in range(n)]
    return ["cuda:0" if n == 1 else "cpu"]


@dataclass(frozen=True)
class _RunSpec:
    """Everything a worker needs to rebuild the encoder and the tasks (picklable: no mteb objects)."""

    model_path: str
    fingerprint: str
    instructions_path: str
    overrides: dict[str, str | None]
    batch_size: int
    max_seq_length: int | None
    work_dir: str
    local: list[dict[str, Any]] = field(default_factory=list)


def _make_encoder(run: _RunSpec, device: str) -> Any:
    from kalm.evaluation.encoder import KalmEncoder

    ins = load_instructions(run.instructions_path).with_overrides(run.overrides)
    return KalmEncoder(
        run.model_path,
        instructions=ins,
        device=device,
        batch_size=run.batch_size,
        max_seq_length=run.max_seq_length,
        fingerprint=run.fingerprint,
    )


def _queue_worker(device: str, run: _RunSpec, jobs: Any, results: Any) -> None:
    """One process per GPU: take (task name, dims) jobs until the None sentinel; send rows or an error."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {device} %(name)s: %(message)s")
    try:
        encoder = _make_encoder(run, device)
        specs = {d["name"]: LocalTaskSpec.model_validate(d) for d in run.local}
    except BaseException as err:  # report, or the parent waits forever
        results.put(("fatal", device, f"{type(err).__name__}: {err}"))
        return
    while (job := jobs.get()) is not None:
        name, dims = job
        try:
            spec = specs.get(name)
            rt = resolve_tasks([] if spec else [name], [spec] if spec else [])[0]
            results.put(
                ("rows", name, evaluate_task_dims(encoder, rt, dims, Path(run.work_dir), run.batch_size))
            )
        except BaseException as err:
            results.put(("error", name, f"{type(err).__name__}: {err}"))


def run_queue(
    run: Any,
    jobs: list[tuple[str, list[int]]],
    devices: list[str],
    worker: Callable[[str, Any, Any, Any], None] = _queue_worker,
    on_task_done: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Spread (task, dims) jobs over one spawned process per device; returns every worker's rows.

    ``worker(device, run, jobs, results)`` takes jobs until a None sentinel and answers each with
    ``("rows", task, rows)`` or ``("error", task, message)``, or once ``("fatal", device, message)`` when it
    cannot start: the others then take its share, and the run succeeds (with a warning) if they finish it.
    A failed task, or tasks left when no worker is left, fail the whole evaluation after every other job is
    done (one RuntimeError naming each). Spawned, not forked: CUDA contexts do not survive fork.
    ``on_task_done(rows)`` is called in this process as each task's rows arrive (to store them at once).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    job_q: Any = ctx.Queue()
    res_q: Any = ctx.Queue()
    for j in jobs:
        job_q.put(j)
    for _ in devices:
        job_q.put(None)
    procs = [ctx.Process(target=worker, args=(d, run, job_q, res_q), daemon=True) for d in devices]
    for p in procs:
        p.start()
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    broken: list[str] = []
    pending = len(jobs)
    try:
        while pending and len(broken) < len(procs):
            try:
                kind, name, payload = res_q.get(timeout=10)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    errors.append(f"workers exited with {pending} task(s) left")
                    break
                continue
            if kind == "rows":
                rows += payload
                pending -= 1
                if on_task_done is not None:
                    on_task_done(payload)
            elif kind == "error":
                errors.append(f"{name}: {payload}")
                pending -= 1
            else:  # a worker could not start; the others keep taking jobs
                log.warning("device %s could not start (%s); the other devices take its tasks", name, payload)
                broken.append(f"worker {name}: {payload}")
        if pending and len(broken) == len(procs):
            errors += [*broken, f"no worker could start; {pending} task(s) not evaluated"]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    if errors:
        raise RuntimeError("evaluation failed: " + "; ".join(errors))
    return rows


def evaluate_model(
    model_path: str | Path,
    tasks: Sequence[ResolvedTask],
    dims: Sequence[int],
    work_dir: Path,
    *,
    instructions: InstructionSet,
    batch_size: int = 32,
    max_seq_length: int | None = None,
    devices: Sequence[str] | None = None,
    fingerprint: str | None = None,
    on_task_done: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``tasks`` x ``dims`` on one model; mteb JSON goes to ``work_dir/d<dim>/<task>.json``; returns rows.

    Sequential in this process unless several devices are visible (or given): then a queue, one process each.
    ``on_task_done(rows)`` gets each task's rows as soon as the task is done, so a crash loses one task.
    """
    path = check_model_folder(model_path)
    fp = fingerprint or model_fingerprint(path)
    devs = visible_devices(devices)
    if len(devs) > 1 and len(tasks) > 1:
        run = _RunSpec(
            model_path=str(path),
            fingerprint=fp,
            instructions_path=instructions.source,
            overrides=dict(instructions.overrides),
            batch_size=batch_size,
            max_seq_length=max_seq_length,
            work_dir=str(work_dir),
            local=[rt.spec.model_dump() for rt in tasks if rt.spec is not None],
        )
        log.info("evaluating %d tasks on %d devices: %s", len(tasks), len(devs), devs)
        return run_queue(run, [(rt.name, list(dims)) for rt in tasks], devs, on_task_done=on_task_done)
    from kalm.evaluation.encoder import KalmEncoder

    encoder = KalmEncoder(
        path,
        instructions=instructions,
        device=devs[0],
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        fingerprint=fp,
    )
    rows: list[dict[str, Any]] = []
    for rt in tasks:
        task_rows = evaluate_task_dims(encoder, rt, dims, work_dir, batch_size)
        if on_task_done is not None:
            on_task_done(task_rows)
        rows += task_rows
    return rows


# -- greedy soup dev score -------------------------------------------------------------------------
class DevScorer:
    """``dev_score(model_folder) -> mean main score`` over fixed tasks at full dimension (greedy soups).

    Tasks are resolved and checked (offline availability included) once, at construction. Scores are
    memoised per model fingerprint, so a candidate is never evaluated twice. Nothing is written outside a
    temp folder. ``key`` names what is scored (tasks, data revisions, instructions, settings, mteb version):
    :func:`kalm.evaluation.soup.run_soup` reuses a greedy soup only when it was chosen with the same key.
    """

    def __init__(
        self,
        tasks: Sequence[str] = (),
        local_tasks: Sequence[LocalTaskSpec] = (),
        *,
        instructions: str | Path | None = None,
        batch_size: int = 32,
        max_seq_length: int | None = None,
    ) -> None:
        specs = list(local_tasks)
        self.instructions = load_instructions(instructions).with_overrides(
            {s.name: s.instruction for s in specs if s.instruction is not None}
        )
        self.tasks = resolve_tasks(list(tasks), specs)
        check_offline(self.tasks)
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.memo: dict[str, float] = {}
        self.key = hash_obj(
            {
                "tasks": [(rt.name, rt.revision) for rt in self.tasks],
                "instructions": self.instructions.digest(),
                "len": max_seq_length,
                "mteb": mteb_version(),
                "format": EVAL_FORMAT_VERSION,
            }
        )

    def __call__(self, model_path: Path) -> float:
        fp = model_fingerprint(model_path)
        if fp not in self.memo:
            full = full_dim(Path(model_path), self.instructions, fp)
            with tempfile.TemporaryDirectory(prefix="kalm-dev-") as tmp:
                rows = evaluate_model(
                    model_path,
                    self.tasks,
                    [full],
                    Path(tmp),
                    instructions=self.instructions,
                    batch_size=self.batch_size,
                    max_seq_length=self.max_seq_length,
                    fingerprint=fp,
                )
            self.memo[fp] = sum(r["main_score"] for r in rows) / len(rows)
            log.info("dev score of %s: %.5f", model_path, self.memo[fp])
        return self.memo[fp]


def dev_scorer_from_config(cfg: EvalConfig, data_root: str | None = None) -> DevScorer:
    """The greedy soup's dev score from an eval config: ``dev_tasks`` (names), else every local task."""
    specs = config_local_tasks(cfg, data_root)
    if cfg.dev_tasks:
        local = [s for s in specs if s.name in cfg.dev_tasks]
        names = [n for n in cfg.dev_tasks if n not in {s.name for s in local}]
    else:
        local, names = specs, []
        log.warning(
            "no dev_tasks configured: the greedy soup selects on the local tasks it is also scored on"
        )
    return DevScorer(
        names,
        local,
        instructions=cfg.instructions,
        batch_size=cfg.batch_size,
        max_seq_length=cfg.max_seq_length,
    )
