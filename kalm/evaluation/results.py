"""Evaluation results and their cache: one model folder scored on mteb and local tasks at each dim, every
(task, dim) result stored under ``<data root>/eval/<model fingerprint>/`` and reused while its
:func:`result_key` is unchanged.

Output layout (a local folder or S3, through ``kalm.core.storage.DataRoot``)::

    eval/<fingerprint>/results/d<dim>/<task>.json        mteb's TaskResult JSON, as mteb writes it
    eval/<fingerprint>/results/d<dim>/<task>.kalm.json   our row: score, instruction used, reuse key
    eval/<fingerprint>/summary.parquet | summary.md      every result of this model (SUMMARY_SCHEMA)
    eval/<fingerprint>/_manifest.json                    last run: tasks, dims, versions, timings
    eval/mteb/results/kalm__<folder>[-d<dim>]/<fingerprint>/<task>.json (+ model_meta.json)
                                                         the same results in mteb's layout, for its tools:
                                                         mteb.ResultCache("<data root>/eval/mteb")

A rerun reuses a (task, dim) result whose key (model fingerprint, task data revision, instruction,
instructions version, template, dim, max length, mteb version) is unchanged; ``force`` recomputes.

>>> res = run_eval("models/soup", ["STSBenchmark"], "configs/local_tasks.yaml", dims=[256, 128])
>>> res.table.column("main_score")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from kalm.core.fingerprint import model_fingerprint
from kalm.core.hashing import hash_obj
from kalm.core.layout import MANIFEST, eval_dir
from kalm.core.storage import DataRoot
from kalm.evaluation.checkpoints import check_model_folder
from kalm.evaluation.config import EvalConfig, LocalTaskSpec, load_eval_config, load_local_tasks
from kalm.evaluation.instructions import eval_template, load_instructions
from kalm.evaluation.mteb_tasks import (
    EVAL_FORMAT_VERSION,
    ResolvedTask,
    check_offline,
    mteb_version,
    resolve_tasks,
    select_tasks,
)
from kalm.evaluation.report import summary_markdown, summary_table
from kalm.evaluation.scoring import dims_to_score, evaluate_model, full_dim, mteb_model_dir

log = logging.getLogger(__name__)
MTEB_CACHE = "mteb"  # <data root>/eval/mteb: a cache folder mteb's own tools read (mteb.ResultCache)


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
            "mteb": mteb_version(),
            "format": EVAL_FORMAT_VERSION,
        }
    )


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
        root, prefix = DataRoot.from_uri(data_root), eval_dir(fp, output_prefix)

    def rel(p: str) -> str:
        return f"{prefix}/{p}" if prefix else p

    # the same results in mteb's own layout, shared by every model of the root: mteb.ResultCache(<that>)
    mteb_dir = f"{output_prefix}/{MTEB_CACHE}" if not output_dir else MTEB_CACHE

    # reuse stored results whose key still matches
    template = eval_template(path, ins) or ""  # "": plain texts (a model without its own template)
    reused: list[dict[str, Any]] = []
    jobs: list[tuple[ResolvedTask, list[int]]] = []
    for rt in resolved:
        instruction = ins.lookup(rt.name, rt.task_type)[0] if template else None
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
                result = (work / f"d{d}" / f"{rt.name}.json").read_bytes()
                root.write_bytes(rel(f"results/d{d}/{rt.name}.json"), result)
                meta = work / f"d{d}" / "model_meta.json"
                if meta.is_file():  # mteb.ResultCache layout: results/<model>/<revision>/<task>.json
                    name = json.loads(meta.read_text(encoding="utf-8"))["name"]
                    folder = f"{mteb_dir}/results/{mteb_model_dir(name)}/{fp}"
                    root.write_bytes(f"{folder}/{rt.name}.json", result)
                    root.write_bytes(f"{folder}/model_meta.json", meta.read_bytes())
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
            "mteb_version": mteb_version(),
            "seconds": round(time.perf_counter() - t0, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    out_uri = root.full_uri(prefix) if prefix else root.uri
    log.info("eval of %s done: %d results (%d reused) -> %s", path.name, len(rows), len(reused), out_uri)
    return EvalResult(str(path), fp, out_uri, rows, table, reused=len(reused), new=len(new_rows))


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
