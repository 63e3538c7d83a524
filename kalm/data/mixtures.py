"""Stage mixtures: cross-recipe exact and near dedup and decontamination over all recipes of one stage.

Input: each recipe's published shards (``shards/<stage>/<recipe>``). Output, per recipe:
``mixtures/<stage>/<recipe>/part-NNNNN.parquet`` + ``_manifest.json``, which training reads. A row that
appears in several recipes (exactly: ``cross_recipe_dup``; or a near duplicate by MinHash on the comparison
form of query + positive: ``cross_recipe_near_dup``) is kept in the first recipe by name order, and the
drop is counted in the recipe that lost it. Each recipe's mixture is rebuilt only
when its own shards, the set of its ids owned by an earlier recipe, or the evaluation texts changed, so
rerunning one recipe recomputes only what depends on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from kalm.core.errors import KalmError
from kalm.core.hashing import hash_obj
from kalm.core.layout import MANIFEST, holdout_dir, mixture_dir, mixture_root, shard_dir
from kalm.core.results import StageResult
from kalm.core.schema import SCHEMA_VERSION
from kalm.core.storage import DataRoot, read_manifest, read_rows
from kalm.data import minhash
from kalm.data.config import DecontamSpec, IngestConfig
from kalm.data.ingest import near_text
from kalm.data.normalize import comparison_form

log = logging.getLogger(__name__)


@dataclass
class EvalIndex:
    """Normalised evaluation texts with MinHash signatures and LSH band hashes for near-match lookup."""

    keys: set[str]
    sig: np.ndarray
    bands: np.ndarray  # (n_eval, B), each column sorted order in ``order``
    order: np.ndarray
    params: minhash.MinHashParams
    fingerprint: str

    @classmethod
    def build(cls, texts: list[str], spec: DecontamSpec, near: minhash.MinHashParams) -> EvalIndex:
        texts = sorted({comparison_form(t) for t in texts if t and t.strip()})
        p = minhash.MinHashParams(near.num_perm, near.ngram, spec.threshold, near.seed)
        sig = minhash.signatures(texts, p)
        b, r = p.lsh_shape()
        bands = minhash.band_hashes(sig, b, r)
        order = np.argsort(bands, axis=0, kind="stable")
        return cls(
            keys=set(texts),
            sig=sig,
            bands=np.take_along_axis(bands, order, axis=0),
            order=order,
            params=p,
            fingerprint=hash_obj([texts, spec.threshold, p.num_perm, p.ngram, p.seed]),
        )

    def contaminated(self, texts: list[str], forms: bool = False) -> np.ndarray:
        """Boolean per text: equal (comparison form) to an eval text or near-matching one. ``forms``: the
        texts are already in comparison form."""
        if not forms:
            texts = [comparison_form(t) for t in texts]
        if not self.keys:
            return np.zeros(len(texts), dtype=bool)
        hit = np.array([t in self.keys for t in texts], dtype=bool)
        if len(self.sig) == 0 or not texts:
            return hit
        sig = minhash.signatures(texts, self.params)
        b, r = self.params.lsh_shape()
        bands = minhash.band_hashes(sig, b, r)
        for band in range(b):
            col = self.bands[:, band]
            lo = np.searchsorted(col, bands[:, band], side="left")
            hi = np.searchsorted(col, bands[:, band], side="right")
            for i in np.nonzero((hi > lo) & ~hit)[0]:
                cand = self.order[lo[i] : hi[i], band]
                if (minhash.estimated_jaccard(self.sig[cand], sig[i]) >= self.params.threshold).any():
                    hit[i] = True
        return hit


def load_eval_texts(root: DataRoot, cfg: IngestConfig, recipe_names: Sequence[str]) -> list[str]:
    """Texts of the configured evaluation sets plus the recipes' held-out rows."""
    texts: list[str] = []
    spec = cfg.decontamination
    for es in spec.eval_sets:
        path = Path(es.path)
        if not path.exists():
            raise KalmError(f"evaluation set {es.name!r} not found: {path}")
        df = pl.read_parquet(path) if es.format == "parquet" else pl.read_ndjson(path)
        for col in es.text_fields:
            if col in df.columns:
                texts += [t for t in df[col].cast(pl.Utf8).to_list() if t]
    if spec.include_holdouts:
        for name in recipe_names:
            if read_manifest(root, holdout_dir(name)) is None:
                continue
            t = read_rows(root, holdout_dir(name), ["query", "pos"])
            texts += t.column("query").to_pylist()
            texts += [p[0] for p in t.column("pos").to_pylist() if p]
    return texts


def run_build_stage(
    stage: str,
    recipe_names: Sequence[str],
    root: DataRoot,
    cfg: IngestConfig,
    force: bool = False,
    eval_texts: Sequence[str] = (),
) -> list[StageResult]:
    """Build the mixtures of ``stage`` from every recipe that has shards: one result per recipe (``cached``
    when its inputs are unchanged). Also writes the stage summary ``mixtures/<stage>/_manifest.json``.

    ``eval_texts``: texts of the evaluation tasks (the pipeline passes the eval config's tasks),
    decontaminated against besides the config's eval sets and the recipes' held-out rows."""
    shard_ms = {n: read_manifest(root, shard_dir(stage, n)) for n in recipe_names}
    missing = sorted(n for n, m in shard_ms.items() if m is None)
    if missing:
        log.warning("stage %s: no finished shards for %s (not ingested yet), left out", stage, missing)
    empty = sorted(n for n, m in shard_ms.items() if m is not None and int(m.get("rows_out", 0)) == 0)
    if empty:  # an empty or all-garbage source: nothing to mix, and no stale mixture left to train on
        log.warning("stage %s: %s ingested 0 rows, left out of the mixtures", stage, empty)
        for n in empty:
            root.delete_dir(mixture_dir(stage, n))
    names = sorted(n for n, m in shard_ms.items() if m is not None and n not in empty)
    t0 = time.perf_counter()
    index = None
    if cfg.decontamination.enabled:
        decon = minhash.MinHashParams(
            cfg.near_dedup.num_perm, cfg.near_dedup.ngram, cfg.decontamination.threshold, cfg.near_dedup.seed
        )
        texts = load_eval_texts(root, cfg, recipe_names) + list(eval_texts)
        index = EvalIndex.build(texts, cfg.decontamination, decon)
    # Who owns each id: the first recipe (by name) that has it.
    frames = []
    for order, name in enumerate(names):
        ids = read_rows(root, shard_dir(stage, name), ["id"]).column("id").cast(pa.string())
        frame = pl.from_arrow(pa.table({"id": ids}))
        assert isinstance(frame, pl.DataFrame)
        frames.append(frame.with_columns(pl.lit(order, dtype=pl.Int32).alias("order")))
    owners = (
        pl.concat(frames).group_by("id").agg(pl.col("order").min().alias("owner"))
        if frames
        else pl.DataFrame(schema={"id": pl.Utf8, "owner": pl.Int32})
    )
    dups = {
        name: sorted(
            frames[order].join(owners, on="id", how="left").filter(pl.col("owner") < order)["id"].to_list()
        )
        for order, name in enumerate(names)
    }
    near = _cross_recipe_near_dups(root, stage, names, dups, cfg) if cfg.near_dedup.enabled else {}
    results: list[StageResult] = []
    for name in names:
        t_one = time.perf_counter()
        shard_m = read_manifest(root, shard_dir(stage, name))
        assert shard_m is not None
        drop = {"cross_recipe_dup": dups[name], "cross_recipe_near_dup": near.get(name, [])}
        drop["contaminated"] = _contaminated(
            root, stage, name, index, set(drop["cross_recipe_dup"]) | set(drop["cross_recipe_near_dup"])
        )
        # What the mixture depends on is what it drops, not the whole evaluation index: a new eval text that
        # matches none of this recipe's rows leaves its mixture (and the training that read it) cached.
        fp = hash_obj(
            {
                "shards": [shard_m["config_hash"], shard_m["source_fingerprint"], shard_m["files"]],
                "drops": {reason: hash_obj(ids) for reason, ids in drop.items()},
                "decontamination": cfg.decontamination.enabled,
                "schema": SCHEMA_VERSION,
            }
        )
        out = mixture_dir(stage, name)
        old = read_manifest(root, out)
        broken = root.files_intact(out, old.get("files", [])) if old is not None else None
        if broken:
            log.warning("mixture %s/%s changed after it was written (%s); rebuilding", stage, name, broken)
        cached = not force and not broken and old is not None and old.get("input_fingerprint") == fp
        m = old if cached and old is not None else _build_one(root, stage, name, drop, fp)
        results.append(
            StageResult(
                stage="mixture",
                name=name,
                outputs=[root.full_uri(out)],
                rows=int(m["rows_out"]),
                cached=cached,
                seconds=round(time.perf_counter() - t_one, 3),
                lineage={"input_fingerprint": fp, "eval_index": index.fingerprint if index else None},
                manifest=m,
            )
        )
    report = {
        "stage": stage,
        "schema_version": SCHEMA_VERSION,
        "recipes": {r.name: {**_summary(r.manifest), "cached": r.cached} for r in results},
        "rows_out": sum(r.rows or 0 for r in results),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    root.write_json(f"{mixture_root(stage)}/{MANIFEST}", report)
    return results


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {"rows_in": m["rows_in"], "rows_out": m["rows_out"], "drops": m["drops"]}


def _cross_recipe_near_dups(
    root: DataRoot, stage: str, names: list[str], exact: dict[str, list[str]], cfg: IngestConfig
) -> dict[str, list[str]]:
    """Ids each recipe loses to a near duplicate in an earlier recipe (by name order), across the stage.

    Rows are clustered by MinHash LSH on their comparison form (band collisions verified on the
    signatures); a row whose cluster's first member belongs to an earlier recipe is dropped from its own
    recipe. Within a recipe, near duplicates were already removed at ingest."""
    if len(names) < 2:
        return {}
    texts: list[str] = []
    owner: list[int] = []
    ids: list[str] = []
    for order, name in enumerate(names):
        m = read_manifest(root, shard_dir(stage, name))
        label_based = (m or {}).get("task_type") in ("classification", "clustering")
        t = read_rows(root, shard_dir(stage, name), ["id", "query", "pos"])
        skip = set(exact[name])
        for rid, q, pos in zip(*(t.column(c).to_pylist() for c in ("id", "query", "pos")), strict=True):
            if rid not in skip:
                texts.append(near_text({"query": q, "pos": pos}, label_based))
                owner.append(order)
                ids.append(rid)
    p = minhash.MinHashParams(
        cfg.near_dedup.num_perm, cfg.near_dedup.ngram, cfg.near_dedup.threshold, cfg.near_dedup.seed
    )
    sig = minhash.signatures(texts, p)
    labels = minhash.duplicate_clusters(minhash.band_hashes(sig, *p.lsh_shape()), sig, p.threshold)
    owners = np.asarray(owner)
    first_owner = np.full(int(labels.max()) + 1 if len(labels) else 0, len(names), dtype=np.int64)
    np.minimum.at(first_owner, labels, owners)  # rows are in recipe order: the cluster's first recipe
    lost = np.nonzero(owners > first_owner[labels])[0]
    out: dict[str, list[str]] = {}
    for i in lost.tolist():
        out.setdefault(names[owner[i]], []).append(ids[i])
    return {k: sorted(v) for k, v in out.items()}


def _contaminated(
    root: DataRoot, stage: str, name: str, index: EvalIndex | None, skip: set[str]
) -> list[str]:
    """Ids of the recipe's rows whose query or first positive (near-)matches an evaluation text."""
    if index is None:
        return []
    t = read_rows(root, shard_dir(stage, name), ["id", "query", "pos"])
    ids = t.column("id").to_pylist()
    keep = [i for i, rid in enumerate(ids) if rid not in skip]
    if not keep:
        return []
    queries = [t.column("query")[i].as_py() for i in keep]
    firsts = [(t.column("pos")[i].as_py() or [""])[0] for i in keep]
    bad = index.contaminated(queries) | index.contaminated(firsts)
    return sorted(ids[keep[j]] for j in np.nonzero(bad)[0].tolist())


def _build_one(root: DataRoot, stage: str, name: str, drop: dict[str, list[str]], fp: str) -> dict[str, Any]:
    """Filter one recipe's shards shard by shard (bounded memory: one input shard at a time): drop the rows
    ``drop`` names, counted by reason (cross-recipe exact and near duplicates, contamination)."""
    src = shard_dir(stage, name)
    shard_m = read_manifest(root, src)
    assert shard_m is not None
    out = mixture_dir(stage, name)
    staging = root.staging_dir(out)
    drops = dict.fromkeys(drop, 0)
    files, rows_in = [], 0
    for f in shard_m["files"]:
        table = root.read_parquet_checked(f"{src}/{f['name']}", f)
        rows_in += table.num_rows
        for reason, ids in drop.items():
            if ids and table.num_rows:
                keep = pc.invert(pc.is_in(table.column("id"), value_set=pa.array(ids, pa.string())))
                drops[reason] += table.num_rows - pc.sum(keep).as_py()
                table = table.filter(keep)
        files.append(
            {"name": f["name"], "rows": table.num_rows, **root.write_parquet(f"{staging}/{f['name']}", table)}
        )
    m = {
        "recipe": name,
        "stage": stage,
        "category": shard_m.get("category", ""),
        "task_type": shard_m.get("task_type", ""),
        "rows_in": rows_in,
        "rows_out": sum(f["rows"] for f in files),
        "drops": {k: v for k, v in drops.items() if v},
        "files": files,
        "input_fingerprint": fp,
        "schema_version": SCHEMA_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    root.write_json(f"{staging}/{MANIFEST}", m)  # manifest last
    root.publish_dir(staging, out)
    log.info("mixture %s/%s: %d -> %d rows %s", stage, name, rows_in, m["rows_out"], m["drops"])
    return m


def published_mixtures(root: DataRoot, stage: str, names: Sequence[str]) -> list[StageResult]:
    """Results for the finished mixtures among ``names`` as they are on disk (a run that skips the data
    stage trains on these): ``cached`` is True, nothing is rebuilt."""
    out = []
    for name in sorted(names):
        m = read_manifest(root, mixture_dir(stage, name))
        if m is not None:
            out.append(
                StageResult(
                    stage="mixture",
                    name=name,
                    outputs=[root.full_uri(mixture_dir(stage, name))],
                    rows=int(m["rows_out"]),
                    cached=True,
                    lineage={"input_fingerprint": m.get("input_fingerprint")},
                    manifest=m,
                )
            )
    return out
