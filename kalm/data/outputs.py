"""What the partitioned data stage leaves behind: the published mixtures and held-out rows, the stage's
cache check, the results it reports, and the sweep of what a killed run left."""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from kalm.core.hashing import hash_obj
from kalm.core.layout import MANIFEST, holdout_dir, mixture_dir, mixture_root
from kalm.core.results import StageResult
from kalm.core.schema import SCHEMA_VERSION
from kalm.core.storage import DataRoot, digest_of, read_manifest
from kalm.data.units import SignedRecipe, holdouts, sign_file

log = logging.getLogger(__name__)


_TMP = re.compile(r".*\.tmp-[0-9a-f]{8}")


def sweep_tmp(root: DataRoot, d: str) -> None:
    """Remove the half-written files (``<name>.tmp-XXXXXXXX``) a killed unit left in ``d``."""
    sel = pafs.FileSelector(root.path(d), recursive=True, allow_not_found=True)
    for info in root.fs.get_file_info(sel):
        if info.type == pafs.FileType.File and _TMP.fullmatch(info.base_name):
            log.warning("removing %s, left by a killed unit", info.path)
            root.fs.delete_file(info.path)


def unchanged_stage(
    root: DataRoot, stage: str, signed: list[SignedRecipe], red_fp: str
) -> list[StageResult] | None:
    """The published mixtures, when the last run of this stage reduced exactly these inputs and every
    mixture it published is still there, intact; else None."""
    rep_path = f"{mixture_root(stage)}/{MANIFEST}"
    if not root.exists(rep_path):
        return None
    rep = root.read_json(rep_path)
    if rep.get("reduce_fingerprint") != red_fp:
        return None
    out = []
    for r in signed:
        if r.lr.name not in rep.get("recipes", {}):
            continue  # left out (0 rows) by that run
        d = mixture_dir(stage, r.lr.name)
        m = read_manifest(root, d)
        if m is None or m.get("input_fingerprint") != rep["recipes"][r.lr.name].get("input_fingerprint"):
            return None
        if root.files_intact(d, m.get("files", [])):
            return None
        out.append(
            StageResult(
                stage="mixture",
                name=r.lr.name,
                outputs=[root.full_uri(d)],
                rows=int(m["rows_out"]),
                cached=True,
                lineage={"input_fingerprint": m["input_fingerprint"]},
                manifest=m,
            )
        )
    return out


def holdout_texts(root: DataRoot, signed: list[SignedRecipe]) -> list[str]:
    texts: list[str] = []
    for r in signed:
        for t in holdouts(root, r):
            texts += t.column("query").to_pylist() + [p[0] for p in t.column("pos").to_pylist() if p]
    return texts


def ingest_result(root: DataRoot, r: SignedRecipe, cached: bool) -> StageResult:
    ms = list(r.markers.values())
    stats: Counter[str] = Counter()
    for m in ms:
        stats.update(m["stats"])
    return StageResult(
        stage="ingest",
        name=r.lr.name,
        outputs=[root.full_uri(r.dir)],
        rows=sum(m["rows"] for m in ms),
        cached=cached,
        lineage={"sign_fingerprint": r.fp, "recipe_file": r.lr.fingerprint},
        manifest={
            "recipe": r.lr.name,
            "rows_in": sum(m["rows_in"] for m in ms),
            "partitions": len(ms),
            "drops": dict(sorted(stats.items())),
            "rows_out": sum(m["rows"] for m in ms),
        },
    )


def publish_recipe(
    root: DataRoot,
    stage: str,
    r: SignedRecipe,
    red: str,
    applied: list[dict[str, Any]],
    red_fp: str,
    force: bool,
) -> StageResult | None:
    """Make the recipe's applied shards its mixture (kept as it is when its rows did not change). A recipe
    left with 0 rows gets no mixture (an old one is removed: nothing stale to train on)."""
    t0 = time.perf_counter()
    out = mixture_dir(stage, r.lr.name)
    files = [f for m in applied for f in m["files"]]
    publish_holdout(root, r)  # first: decontamination already counted these rows as eval rows
    if sum(f["rows"] for f in files) == 0:
        log.warning(
            "stage %s: %s has 0 rows after ingest and dedup, left out of the mixtures", stage, r.lr.name
        )
        root.delete_dir(out)
        return None
    fp = hash_obj({"sign": r.fp, "shards": [digest_of(f) for f in files], "schema": SCHEMA_VERSION})
    old = read_manifest(root, out)
    cached = (
        not force
        and old is not None
        and old.get("input_fingerprint") == fp
        and not root.files_intact(out, old.get("files", []))
    )
    drops: Counter[str] = Counter()
    for m in r.markers.values():
        drops.update({k: v for k, v in m["stats"].items() if k != "neg_removed"})
    for m in applied:
        drops.update(m["drops"])
    if not cached:
        staging = root.staging_dir(out)
        listed = []
        for f in files:
            name = f["name"].rsplit("/", 1)[1]
            move_file(root, f"{red}/{f['name']}", f"{staging}/{name}")
            listed.append({**f, "name": name})
        lrp = r.lr.recipe
        m = {
            "recipe": r.lr.name,
            "stage": stage,
            "category": lrp.category,
            "task_type": lrp.task_type,
            "rows_in": sum(x["rows_in"] for x in r.markers.values()),
            "rows_out": sum(f["rows"] for f in files),
            "drops": dict(sorted((k, v) for k, v in drops.items() if v)),
            "files": listed,
            "input_fingerprint": fp,
            "reduce_fingerprint": red_fp,
            "partitions": len(files),
            "schema_version": SCHEMA_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        root.write_json(f"{staging}/{MANIFEST}", m)
        root.publish_dir(staging, out)
        old = m
    assert old is not None
    return StageResult(
        stage="mixture",
        name=r.lr.name,
        outputs=[root.full_uri(out)],
        rows=int(old["rows_out"]),
        cached=cached,
        seconds=round(time.perf_counter() - t0, 3),
        lineage={"input_fingerprint": fp},
        manifest=old,
    )


def move_file(root: DataRoot, src: str, dst: str) -> None:
    """A rename on a local root; a copy on S3 (the reduce folder is deleted after the stage)."""
    if not root.is_local:
        root.fs.copy_file(root.path(src), root.path(dst))
        return
    os.makedirs(os.path.dirname(root.path(dst)), exist_ok=True)
    os.replace(root.path(src), root.path(dst))


def publish_holdout(root: DataRoot, r: SignedRecipe) -> None:
    """Make ``holdout/<recipe>/`` the recipe's held-out rows (exact copies once), or remove it when it has
    none; kept as it is when the rows are the same. Runs on every publish, cached mixture or not, so a
    changed ``holdout`` (or a kill between the two publishes) never leaves stale eval rows."""
    ho = holdout_dir(r.lr.name)
    refs = [sign_file(r, i, "holdout.parquet") for i in sorted(r.markers)]
    fp = hash_obj([digest_of(x) for x in refs if x is not None])
    tables = holdouts(root, r)
    if not tables:
        root.delete_dir(ho)
        return
    old = read_manifest(root, ho)
    if old is not None and old.get("input_fingerprint") == fp and not root.files_intact(ho, old["files"]):
        return
    t = pa.concat_tables(tables)
    _, first = np.unique(np.array(t.column("id").to_pylist()), return_index=True)
    t = t.take(pa.array(np.sort(first)))
    staging = root.staging_dir(ho)
    info = root.write_parquet(f"{staging}/part-00000.parquet", t)
    files = [{"name": "part-00000.parquet", "rows": t.num_rows, **info}]
    root.write_json(
        f"{staging}/{MANIFEST}", {"rows_out": t.num_rows, "files": files, "input_fingerprint": fp}
    )
    root.publish_dir(staging, ho)
