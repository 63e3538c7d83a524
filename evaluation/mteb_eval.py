"""Evaluate a sentence-transformers folder with mteb: real MTEB tasks and benchmarks plus local tasks, every
configured Matryoshka dim, results under ``<data root>/eval/<model fingerprint>/``.

Order of work, so mistakes cost nothing: resolve every task name (unknown -> KalmError with close matches),
read and check every local task's data, check that offline runs have every real task's data in the
Hugging Face cache (one KalmError naming all missing ones), and only then load the model and run mteb.

Output layout (a local folder or S3, through ``kalm.storage.DataRoot``)::

    eval/<fingerprint>/results/d<dim>/<task>.json        mteb's TaskResult JSON, as mteb writes it
    eval/<fingerprint>/results/d<dim>/<task>.kalm.json   our row: score, instruction used, reuse key
    eval/<fingerprint>/summary.parquet | summary.md      every result of this model (SUMMARY_SCHEMA)
    eval/<fingerprint>/_manifest.json                    last run: tasks, dims, versions, timings
    eval/compare/<key>/compare.parquet | compare.md | compare_<type>.png    (compare_models)

A rerun reuses a (task, dim) result whose :func:`result_key` (model fingerprint, task data revision,
instruction, instructions version, template, dim, max length, mteb version) is unchanged; ``force``
recomputes. With more than one visible CUDA device, tasks are spread over one worker process per device
from a queue (:func:`run_queue`); otherwise they run sequentially in this process (CPU included).

>>> res = run_eval("models/soup", ["STSBenchmark"], "configs/local_tasks.yaml", dims=[256, 128])
>>> res.table.column("main_score")  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import queue
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from evaluation.checkpoints import check_model_folder, model_fingerprint, read_json_file
from evaluation.config import (
    EvalConfig,
    LocalTaskSpec,
    check_unique_names,
    load_eval_config,
    load_local_tasks,
)
from evaluation.instructions import InstructionSet, load_instructions, model_query_template
from evaluation.report import (
    comparison_markdown,
    comparison_table,
    plot_comparison,
    summary_markdown,
    summary_table,
)
from kalm.errors import KalmError
from kalm.hashing import hash_obj
from kalm.storage import MANIFEST, DataRoot

log = logging.getLogger(__name__)

EVAL_FORMAT_VERSION = 1


# -- task resolution -------------------------------------------------------------------------------
@dataclass
class ResolvedTask:
    """One task to run: its mteb instance plus what the summary needs. ``spec`` is set for local tasks."""

    name: str
    task_type: str
    task: Any  # mteb.AbsTask
    spec: LocalTaskSpec | None = None

    @property
    def source(self) -> str:
        return "local" if self.spec is not None else "mteb"

    @property
    def revision(self) -> str:
        return str(self.task.metadata.dataset.get("revision") or "")


@functools.lru_cache(maxsize=1)
def mteb_names() -> tuple[frozenset[str], frozenset[str]]:
    """(every mteb task name, every benchmark name and alias) of the installed mteb."""
    import importlib
    import warnings

    import mteb

    try:  # the name -> class registry: no task is instantiated (instances warn about beta tasks)
        tasks = frozenset(importlib.import_module("mteb.get_tasks")._TASKS_REGISTRY)
    except (ImportError, AttributeError):  # a later mteb without it: the public, slower way
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tasks = frozenset(t.metadata.name for t in mteb.get_tasks(exclude_superseded=False))
    benchmarks: set[str] = set()
    for b in mteb.get_benchmarks():
        benchmarks.add(b.name)
        benchmarks.update(getattr(b, "aliases", None) or [])
    return tasks, frozenset(benchmarks)


def unknown_task_error(name: str, known: Sequence[str]) -> KalmError:
    """A KalmError for an unknown name listing up to 5 close matches (difflib, then case-insensitive)."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    lower = {k.lower(): k for k in known}
    close += [
        lower[k]
        for k in difflib.get_close_matches(name.lower(), list(lower), n=5, cutoff=0.6)
        if lower[k] not in close
    ]
    hint = f"; close matches: {', '.join(close[:5])}" if close else "; see `mteb.get_tasks()` for names"
    return KalmError(f"unknown task or benchmark {name!r}{hint}")


def resolve_tasks(names: Sequence[str], local: Sequence[LocalTaskSpec] = ()) -> list[ResolvedTask]:
    """mteb task/benchmark names and local task specs -> task instances, deduplicated, in order.

    Benchmarks expand to their tasks. Local data is read and checked here. Raises a one-line KalmError for
    an empty task list, an unknown name, a local name that shadows an mteb task, or unusable local data.
    """
    from evaluation.local_tasks import make_local_task

    if not names and not local:
        raise KalmError("no tasks to evaluate: give mteb task/benchmark names (--tasks) or local tasks")
    import mteb

    check_unique_names(list(local))
    task_names, bench_names = mteb_names()
    local_names = {s.name for s in local}
    out: dict[str, ResolvedTask] = {}
    for name in names:
        if name in local_names:
            continue  # a local task named in --tasks: selected below with the others
        if name in bench_names:
            for t in mteb.get_benchmark(name).tasks:
                out.setdefault(t.metadata.name, ResolvedTask(t.metadata.name, str(t.metadata.type), t))
        elif name in task_names:
            t = mteb.get_task(name)
            out.setdefault(name, ResolvedTask(name, str(t.metadata.type), t))
        else:
            raise unknown_task_error(name, sorted(task_names | bench_names | local_names))
    for spec in local:
        if spec.name in task_names:
            raise KalmError(f"local task name {spec.name!r} is also an mteb task: rename the local task")
        out[spec.name] = ResolvedTask(spec.name, spec.mteb_type, make_local_task(spec), spec)
    return list(out.values())


# -- offline check ---------------------------------------------------------------------------------
def hf_offline() -> bool:
    """True when Hugging Face downloads are disabled (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``)."""
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hf_cache_dirs() -> tuple[Path, Path]:
    """(hub cache, datasets cache), read from the environment now (tests point them at tmp folders)."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub"
    datasets = os.environ.get("HF_DATASETS_CACHE") or home / "datasets"
    return Path(hub).expanduser(), Path(datasets).expanduser()


def dataset_cached(path: str, revision: str | None) -> bool:
    """Whether ``datasets.load_dataset(path, revision=...)`` can be served without a network.

    True for a local folder, a hub snapshot of that revision (``datasets--org--name/snapshots/<rev>`` or a
    ref pointing at it), or a prepared copy in the datasets cache (``org___name/<config>/<version>/<hash>``).
    """
    if Path(path).expanduser().is_dir():
        return True
    from datasets.naming import camelcase_to_snakecase

    hub, ds_cache = hf_cache_dirs()
    repo = hub / f"datasets--{path.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if snapshots.is_dir():
        if not revision or (snapshots / revision).is_dir():
            return True
        refs = repo / "refs"
        if refs.is_dir() and any(
            r.is_file() and r.read_text().strip() == revision and (snapshots / revision).is_dir()
            for r in refs.rglob("*")
        ):
            return True
    parts = path.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    prepared = ds_cache / "___".join(parts)
    return prepared.is_dir() and any(p.is_dir() for p in prepared.glob("*/*/*"))


def _mteb_leaf_tasks(task: Any) -> list[Any]:
    from mteb.abstasks.aggregated_task import AbsTaskAggregate

    if isinstance(task, AbsTaskAggregate):
        return [leaf for sub in task.metadata.tasks for leaf in _mteb_leaf_tasks(sub)]
    return [task]


def check_offline(tasks: Sequence[ResolvedTask]) -> None:
    """Offline, fail before any work with ONE message naming every real task whose data is not cached."""
    if not hf_offline():
        return
    missing = []
    for rt in tasks:
        if rt.spec is not None:
            continue  # local tasks always run
        for leaf in _mteb_leaf_tasks(rt.task):
            ds = leaf.metadata.dataset
            if not dataset_cached(str(ds["path"]), ds.get("revision")):
                missing.append(f"{leaf.metadata.name} ({ds['path']}@{str(ds.get('revision') or 'main')[:7]})")
    if missing:
        hub, ds_cache = hf_cache_dirs()
        raise KalmError(
            f"offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set) and the data of {len(missing)} MTEB task(s) "
            f"is not in the Hugging Face cache ({hub}, {ds_cache}): {', '.join(missing)}; cache them once "
            "with network access (run the same command without HF_HUB_OFFLINE), or evaluate local tasks"
        )


# -- running ---------------------------------------------------------------------------------------
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
        from evaluation.encoder import KalmEncoder

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


def result_key(
    fingerprint: str,
    rt: ResolvedTask,
    dim: int,
    instruction: str | None,
    instructions_version: str,
    template: str,
    max_len: int | None,
) -> str:
    """What a stored (task, dim) result depends on; a rerun reuses the result only while this is unchanged.

    Model fingerprint, task name and data revision (a content hash for local tasks), dim, the instruction
    text this task gets plus the template and the instructions file version (a finer digest than the whole
    file: editing one task's instruction re-scores that task only), max length, mteb version and our
    result format. Batch size and device are left out: they do not change what is computed.
    """
    return hash_obj(
        {
            "fp": fingerprint,
            "task": rt.name,
            "rev": rt.revision,
            "dim": dim,
            "ins": instruction,
            "ins_version": instructions_version,
            "tpl": template,
            "len": max_len,
            "mteb": _mteb_version(),
            "format": EVAL_FORMAT_VERSION,
        }
    )


@functools.lru_cache(maxsize=1)
def _mteb_version() -> str:
    from importlib.metadata import version

    return version("mteb")


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
                    "mteb_version": _mteb_version(),
                    "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "template": encoder.template,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
            log.info("%s d%d: %s = %.4f", rt.name, dim, rows[-1]["metric"], rows[-1]["main_score"])
    finally:
        if loaded_here:
            rt.task.unload_data()
    return rows


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
    from evaluation.encoder import KalmEncoder

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
    from evaluation.encoder import KalmEncoder

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


@dataclass
class EvalResult:
    """What :func:`run_eval` produced: this run's rows, the model's full summary, and where it lives."""

    model_path: str
    fingerprint: str
    output: str  # URI of eval/<fingerprint>
    rows: list[dict[str, Any]]  # this run's (task, dim) rows, reused ones included
    table: pa.Table  # the summary of every result stored for this model (SUMMARY_SCHEMA)
    reused: int = 0  # results taken from storage (key unchanged)
    new: int = 0  # results computed by this run

    def score(self, task: str, dim: int | None = None) -> float:
        """Main score of ``task`` at ``dim`` (default: the largest dim evaluated)."""
        hits = [r for r in self.rows if r["task"] == task and (dim is None or r["dim"] == dim)]
        if not hits:
            raise KeyError(f"no result for {task} at dim {dim}")
        return float(max(hits, key=lambda r: r["dim"])["main_score"])

    def mean_score(self, dim: int | None = None) -> float:
        d = dim or max(r["dim"] for r in self.rows)
        vals = [r["main_score"] for r in self.rows if r["dim"] == d]
        return sum(vals) / len(vals)


def _list_sidecars(root: DataRoot, prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(root.path(f"{prefix}/results"), recursive=True, allow_not_found=True)
    base = root.path(prefix) + "/"
    return sorted(
        i.path[len(base) :] for i in root.fs.get_file_info(sel) if i.is_file and i.path.endswith(".kalm.json")
    )


def run_eval(
    model_path: str | Path,
    tasks: Sequence[str] = (),
    local_tasks: Sequence[LocalTaskSpec] | str | Path = (),
    output_dir: str | None = None,
    dims: Sequence[int] | None = None,
    *,
    data_root: str | None = None,
    output_prefix: str = "eval",
    batch_size: int = 32,
    instructions: str | Path | None = None,
    max_seq_length: int | None = None,
    devices: Sequence[str] | None = None,
    force: bool = False,
) -> EvalResult:
    """Evaluate one model folder on mteb tasks/benchmarks and local tasks at each dim; store and summarise.

    ``local_tasks``: specs, or a YAML file ``{local_tasks: [...]}``. ``output_dir``: a folder or
    ``s3://`` URI for this model's results; default ``<data root>/<output_prefix>/<fingerprint>``.
    ``dims``: Matryoshka truncations scored besides the full dimension.
    """
    path = check_model_folder(model_path)
    specs = load_local_tasks(local_tasks) if isinstance(local_tasks, (str, Path)) else list(local_tasks)
    ins = load_instructions(instructions).with_overrides(
        {s.name: s.instruction for s in specs if s.instruction is not None}
    )
    resolved = resolve_tasks(list(tasks), specs)
    check_offline(resolved)
    t0 = time.perf_counter()
    fp = model_fingerprint(path)
    all_dims = dims_to_score(full_dim(path, ins, fp), dims)
    if output_dir:
        root, prefix = DataRoot.from_uri(output_dir), ""
    else:
        root, prefix = DataRoot.from_uri(data_root), f"{output_prefix.strip('/')}/{fp}"

    def rel(p: str) -> str:
        return f"{prefix}/{p}" if prefix else p

    # reuse stored results whose key still matches
    template = model_query_template(path) or ins.file.template
    reused: list[dict[str, Any]] = []
    jobs: list[tuple[ResolvedTask, list[int]]] = []
    for rt in resolved:
        instruction, _ = ins.lookup(rt.name, rt.task_type)
        todo = []
        for d in all_dims:
            side = rel(f"results/d{d}/{rt.name}.kalm.json")
            key = result_key(fp, rt, d, instruction, ins.version, template, max_seq_length)
            stored = root.read_json(side) if not force and root.exists(side) else {}
            if stored.get("key") == key:
                reused.append(stored["row"])
            else:
                todo.append(d)
        if todo:
            jobs.append((rt, todo))
    log.info(
        "eval %s (%s): %d tasks x dims %s; %d results reused",
        path,
        fp,
        len(resolved),
        all_dims,
        len(reused),
    )

    new_rows: list[dict[str, Any]] = []
    by_name = {rt.name: rt for rt in resolved}
    with tempfile.TemporaryDirectory(prefix="kalm-eval-") as tmp:
        work = Path(tmp)

        def store(task_rows: list[dict[str, Any]]) -> None:
            """Publish one finished task (mteb JSON, then our sidecar: the sidecar marks it complete)."""
            for row in task_rows:
                rt, d = by_name[row["task"]], row["dim"]
                root.write_bytes(
                    rel(f"results/d{d}/{rt.name}.json"), (work / f"d{d}" / f"{rt.name}.json").read_bytes()
                )
                key = result_key(fp, rt, d, row["instruction"], ins.version, row["template"], max_seq_length)
                root.write_json(rel(f"results/d{d}/{rt.name}.kalm.json"), {"key": key, "row": row})

        by_dims: dict[tuple[int, ...], list[ResolvedTask]] = {}
        for rt, todo in jobs:
            by_dims.setdefault(tuple(todo), []).append(rt)
        for todo_dims, group in by_dims.items():
            new_rows += evaluate_model(
                path,
                group,
                list(todo_dims),
                work,
                instructions=ins,
                batch_size=batch_size,
                max_seq_length=max_seq_length,
                devices=devices,
                fingerprint=fp,
                on_task_done=store,
            )

    everything = [root.read_json(rel(s))["row"] for s in _list_sidecars(root, prefix)]
    table = summary_table(everything)
    root.write_parquet(rel("summary.parquet"), table)
    root.write_bytes(rel("summary.md"), summary_markdown(table, f"Evaluation of {path.name}").encode("utf-8"))
    rows = reused + new_rows
    root.write_json(
        rel(MANIFEST),
        {
            "format_version": EVAL_FORMAT_VERSION,
            "model_path": str(path.resolve()),
            "fingerprint": fp,
            "tasks": [rt.name for rt in resolved],
            "dims": all_dims,
            "instructions": {"source": ins.source, "version": ins.version, "digest": ins.digest()},
            "results_new": len(new_rows),
            "results_reused": len(reused),
            "mteb_version": _mteb_version(),
            "seconds": round(time.perf_counter() - t0, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    out_uri = root.full_uri(prefix) if prefix else root.uri
    log.info("eval of %s done: %d results (%d reused) -> %s", path.name, len(rows), len(reused), out_uri)
    return EvalResult(str(path), fp, out_uri, rows, table, reused=len(reused), new=len(new_rows))


def config_local_tasks(cfg: EvalConfig, data_root: str | None = None) -> list[LocalTaskSpec]:
    """The local tasks an eval config asks for: its ``local_tasks``, plus a retrieval task per recipe with
    held-out rows (``holdout_tasks``), plus the stdlib docstring classification task (``stdlib_task``)."""
    specs = list(cfg.local_tasks)
    if cfg.holdout_tasks or cfg.stdlib_task:
        from evaluation.local_tasks import build_stdlib_docstring_task, holdout_task_specs

        root = DataRoot.from_uri(data_root)
        if cfg.holdout_tasks:
            found = holdout_task_specs(root)
            if not found:
                log.warning("holdout_tasks: no held-out rows under %s (the data stage writes them)", root.uri)
            specs += found
        if cfg.stdlib_task:
            specs.append(build_stdlib_docstring_task(root))
    check_unique_names(specs)
    return specs


def select_tasks(
    cfg: EvalConfig,
    data_root: str | None = None,
    tasks: Sequence[str] | None = None,
    local_tasks: Sequence[LocalTaskSpec] | None = None,
) -> tuple[list[str], list[LocalTaskSpec]]:
    """(mteb names, local specs) to evaluate: the arguments where given, else the config's.

    ``tasks`` given and ``local_tasks`` not: ONLY the named tasks run; a name that is not an mteb task or
    benchmark picks one of the config's local tasks (e.g. ``Holdout_faq``), else it is an unknown name
    (KalmError with close matches). ``local_tasks`` given (even empty) replaces the config's local tasks.
    Offline, mteb tasks without cached data fail here, before any local task is built.
    """
    if local_tasks is not None:
        return list(tasks) if tasks is not None else list(cfg.tasks), list(local_tasks)
    task_names, bench_names = mteb_names()
    known = task_names | bench_names
    requested = list(tasks) if tasks is not None else list(cfg.tasks)
    names = [n for n in requested if n in known]
    if names:
        check_offline(resolve_tasks(names))
    if tasks is None:
        if len(names) < len(requested):  # an unknown name in the config: resolve_tasks words the error
            resolve_tasks(requested)
        return names, config_local_tasks(cfg, data_root)
    wanted = [n for n in requested if n not in known]
    declared = config_local_tasks(cfg, data_root) if wanted else []
    for name in wanted:
        if name not in {s.name for s in declared}:
            raise unknown_task_error(name, sorted(known | {s.name for s in declared}))
    return names, [s for s in declared if s.name in wanted]


def run_eval_config(
    model_path: str | Path,
    config: EvalConfig | str | Path | None = None,
    *,
    data_root: str | None = None,
    tasks: Sequence[str] | None = None,
    local_tasks: Sequence[LocalTaskSpec] | None = None,
    dims: Sequence[int] | None = None,
    output_dir: str | None = None,
    force: bool = False,
    devices: Sequence[str] | None = None,
) -> EvalResult:
    """:func:`run_eval` driven by an :class:`EvalConfig` (default ``configs/eval.yaml``); arguments win
    (:func:`select_tasks`: ``tasks`` alone runs only those; ``local_tasks`` replaces the config's)."""
    cfg = config if isinstance(config, EvalConfig) else load_eval_config(config)
    check_model_folder(model_path)  # before building any local task
    names, specs = select_tasks(cfg, data_root, tasks, local_tasks)
    return run_eval(
        model_path,
        names,
        specs,
        output_dir,
        dims=list(dims) if dims is not None else cfg.dims,
        data_root=data_root,
        output_prefix=cfg.output,
        batch_size=cfg.batch_size,
        instructions=cfg.instructions,
        max_seq_length=cfg.max_seq_length,
        devices=devices,
        force=force,
    )


# -- greedy soup dev score -------------------------------------------------------------------------
class DevScorer:
    """``dev_score(model_folder) -> mean main score`` over fixed tasks at full dimension (greedy soups).

    Tasks are resolved and checked (offline availability included) once, at construction. Scores are
    memoised per model fingerprint, so a candidate is never evaluated twice. Nothing is written outside a
    temp folder. ``key`` names what is scored (tasks, data revisions, instructions, settings, mteb version):
    :func:`evaluation.soup.run_soup` reuses a greedy soup only when it was chosen with the same key.
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
                "mteb": _mteb_version(),
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


# -- comparison ------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """One comparison table of several labelled models (base, each stage, soup), as written.

    ``output``: the folder (local path or ``s3://`` URI) holding ``compare.parquet`` (``table_path``),
    ``compare.md`` (``markdown_path``) and one PNG bar chart per task type (``charts``).
    """

    table: pa.Table  # COMPARISON_SCHEMA, long format: one row per (label, task, dim)
    markdown: str
    output: str
    table_path: str
    markdown_path: str
    charts: list[str]
    models: dict[str, str] = field(default_factory=dict)  # label -> model path
    fingerprints: dict[str, str] = field(default_factory=dict)  # label -> model fingerprint
    baseline: str | None = None
    target: str | None = None
    reused: int = 0  # results taken from storage, over all models
    new: int = 0  # results computed by this call

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: what a Prefect task returns and a run manifest records."""
        return {
            "markdown": self.markdown,
            "output": self.output,
            "table_path": self.table_path,
            "markdown_path": self.markdown_path,
            "charts": list(self.charts),
            "rows": self.table.to_pylist(),
            "models": dict(self.models),
            "fingerprints": dict(self.fingerprints),
            "baseline": self.baseline,
            "target": self.target,
            "results_reused": self.reused,
            "results_new": self.new,
            "reused": self.new == 0,
        }


def _pick_labels(labels: Sequence[str], baseline: str | None, target: str | None) -> tuple[str, str] | None:
    """(baseline, target) of the delta column: by default ``base`` (else the first label) vs ``soup``
    (else the last label); None with fewer than two labels."""
    if len(labels) < 2:
        return None
    base = baseline or ("base" if "base" in labels else labels[0])
    tgt = target or ("soup" if "soup" in labels else labels[-1])
    for name in (base, tgt):
        if name not in labels:
            raise KalmError(f"unknown label {name!r} for the comparison (labels: {', '.join(labels)})")
    return (base, tgt) if base != tgt else None


def compare_results(
    results: Mapping[str, EvalResult | pa.Table],
    out: DataRoot,
    rel: str = "eval/compare",
    *,
    baseline: str | None = None,
    target: str | None = None,
) -> Comparison:
    """Stack several models' summaries (``{label: result}``) into compare.parquet, compare.md and PNG charts.

    Only (task, dim) pairs evaluated for a label are shown for it; missing ones print as ``-``. The
    Markdown adds a column ``target - baseline`` (default: soup - base).
    """
    # an EvalResult contributes this run's rows only, not every result ever stored for its model
    tables = {lb: summary_table(r.rows) if isinstance(r, EvalResult) else r for lb, r in results.items()}
    pair = _pick_labels(list(tables), baseline, target)
    table = comparison_table(tables)
    md = comparison_markdown(table, delta=pair)
    out.write_parquet(f"{rel}/compare.parquet", table)
    out.write_bytes(f"{rel}/compare.md", md.encode("utf-8"))
    charts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kalm-charts-") as tmp:
        for png in plot_comparison(table, tmp):
            out.write_bytes(f"{rel}/{png.name}", png.read_bytes())
            charts.append(out.full_uri(f"{rel}/{png.name}"))
    evals = {lb: r for lb, r in results.items() if isinstance(r, EvalResult)}
    return Comparison(
        table=table,
        markdown=md,
        output=out.full_uri(rel),
        table_path=out.full_uri(f"{rel}/compare.parquet"),
        markdown_path=out.full_uri(f"{rel}/compare.md"),
        charts=charts,
        models={lb: r.model_path for lb, r in evals.items()},
        fingerprints={lb: r.fingerprint for lb, r in evals.items()},
        baseline=pair[0] if pair else None,
        target=pair[1] if pair else None,
        reused=sum(r.reused for r in evals.values()),
        new=sum(r.new for r in evals.values()),
    )


def compare_models(
    models: Mapping[str, str | Path],
    config: EvalConfig | str | Path | None = None,
    data_root: str | None = None,
    *,
    tasks: Sequence[str] | None = None,
    local_tasks: Sequence[LocalTaskSpec] | None = None,
    dims: Sequence[int] | None = None,
    force: bool = False,
    devices: Sequence[str] | None = None,
    baseline: str | None = None,
    target: str | None = None,
) -> Comparison:
    """Evaluate each labelled model (``{"base": path, "finetune": path, "soup": path}``) on the same tasks,
    reusing stored results, and write ONE comparison under ``<data root>/<output>/compare/<key>/`` (key: a
    hash of the labels' fingerprints, the tasks and the dims): Markdown with a ``soup - base`` column,
    Parquet, a PNG bar chart per task type.

    Every model folder is checked before anything is evaluated (a missing one fails first, in one line).

    >>> cmp = compare_models({"base": "models/minilm", "soup": "runs/soup/demo"}, "configs/eval.yaml")
    >>> print(cmp.markdown); cmp.table_path  # doctest: +SKIP
    """
    if not models:
        raise KalmError("compare needs at least one model (label=PATH)")
    for p in models.values():
        check_model_folder(p)
    _pick_labels(list(models), baseline, target)  # a bad label fails before any evaluation
    cfg = config if isinstance(config, EvalConfig) else load_eval_config(config)
    names, specs = select_tasks(cfg, data_root, tasks, local_tasks)  # once, for every model
    results = {
        label: run_eval_config(
            p,
            cfg,
            data_root=data_root,
            tasks=names,
            local_tasks=specs,
            dims=dims,
            force=force,
            devices=devices,
        )
        for label, p in models.items()
    }
    key = hash_obj(
        {
            "models": {lb: r.fingerprint for lb, r in results.items()},
            "tasks": sorted({r["task"] for res in results.values() for r in res.rows}),
            "dims": sorted({r["dim"] for res in results.values() for r in res.rows}),
        },
        n=12,
    )
    cmp = compare_results(
        results, DataRoot.from_uri(data_root), f"{cfg.output}/compare/{key}", baseline=baseline, target=target
    )
    log.info(
        "comparison of %s: %d new results, %d reused -> %s", list(models), cmp.new, cmp.reused, cmp.output
    )
    return cmp
