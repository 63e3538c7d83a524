"""Which tasks an evaluation runs: mteb task and benchmark names and local task specs resolved to task
instances, checked before any model is loaded (unknown names with close matches, local data read and
checked, offline runs checked against the Hugging Face cache: one KalmError naming every missing task).

>>> names, specs = select_tasks(load_eval_config())      # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kalm.core.config import hf_offline
from kalm.core.errors import KalmError
from kalm.core.storage import DataRoot
from kalm.evaluation.config import EvalConfig, LocalTaskSpec, check_unique_names

log = logging.getLogger(__name__)

EVAL_FORMAT_VERSION = 1  # of our stored result rows: a change re-scores everything


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
    from kalm.evaluation.local_tasks import make_local_task

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


@functools.lru_cache(maxsize=1)
def mteb_version() -> str:
    from importlib.metadata import version

    return version("mteb")


def config_local_tasks(cfg: EvalConfig, data_root: str | None = None) -> list[LocalTaskSpec]:
    """The local tasks an eval config asks for: its ``local_tasks``, plus a retrieval task per recipe with
    held-out rows (``holdout_tasks``), the stdlib docstring classification task (``stdlib_task``) and the
    held-out general suite (``general_suite``)."""
    specs = list(cfg.local_tasks)
    if cfg.holdout_tasks or cfg.stdlib_task or cfg.general_suite:
        from kalm.evaluation.local_tasks import build_stdlib_docstring_task, holdout_task_specs

        root = DataRoot.from_uri(data_root)
        if cfg.holdout_tasks:
            found = holdout_task_specs(root)
            if not found:
                log.warning("holdout_tasks: no held-out rows under %s (the data stage writes them)", root.uri)
            specs += found
        if cfg.stdlib_task:
            specs.append(build_stdlib_docstring_task(root))
        if cfg.general_suite:
            from kalm.evaluation.heldout import build_general_suite

            specs += build_general_suite(root)
    check_unique_names(specs)
    return specs


def task_texts(cfg: EvalConfig, data_root: str | None = None) -> tuple[list[str], list[str]]:
    """Every text of the evaluation tasks ``cfg`` names, for decontaminating training data against them:
    its local tasks always, its mteb tasks where their data is in the local Hugging Face cache.

    Returns (texts, notices): one notice line per mteb task whose data is not cached (not decontaminated
    against)."""
    from kalm.core.storage import read_table

    texts: list[str] = []
    for spec in config_local_tasks(cfg, data_root):
        table = read_table(spec.path, "local task data")
        for col in ("query", "pos", "neg", "text", "sentence1", "sentence2"):
            if col in table.column_names:
                for v in table.column(col).to_pylist():
                    texts += [v] if isinstance(v, str) else [t for t in (v or []) if isinstance(t, str)]
    notices: list[str] = []
    task_names, bench_names = mteb_names()
    known = [n for n in cfg.tasks if n in task_names | bench_names]
    for rt in resolve_tasks(known) if known else []:
        for leaf in _mteb_leaf_tasks(rt.task):
            ds = leaf.metadata.dataset
            if not dataset_cached(str(ds["path"]), ds.get("revision")):
                notices.append(f"{leaf.metadata.name} ({ds['path']}): data not in the local cache")
                continue
            texts += _mteb_task_texts(leaf)
    return texts, notices


def _mteb_task_texts(task: Any) -> list[str]:
    """The strings of a cached mteb task's dataset (every split and text column, nested values too)."""
    out: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "column_names") and hasattr(x, "to_dict"):  # a datasets.Dataset
            for col in x.column_names:
                if x.features[col].dtype in ("string", "large_string") or "Sequence" in repr(x.features[col]):
                    walk(x[col])

    task.load_data()
    try:
        walk(task.dataset)
    finally:
        task.unload_data()
    return [t for t in out if len(t) >= 8]


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
