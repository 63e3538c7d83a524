"""Stage mixtures: cross-recipe exact dedup and decontamination over all recipes of one stage.

Input: each recipe's published shards (``shards/<stage>/<recipe>``). Output, per recipe:
``mixtures/<stage>/<recipe>/part-NNNNN.parquet`` + ``_manifest.json``, which training reads. A row that
appears in several recipes is kept in the first recipe by name order. Each recipe's mixture is rebuilt only
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

from kalm.data import minhash
from kalm.data.config import DecontamSpec, IngestConfig
from kalm.data.normalize import normalize_text
from kalm.core.errors import KalmError
from kalm.core.hashing import hash_obj
from kalm.core.schema import SCHEMA_VERSION
from kalm.core.layout import MANIFEST, holdout_dir, mixture_dir, mixture_root, shard_dir
from kalm.core.results import StageResult
from kalm.core.storage import DataRoot, read_manifest, read_rows

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
        texts = sorted({normalize_text(t) for t in texts if t and t.strip()})
        p = minhash.MinHashParams(near.num_perm, near.ngram, spec.threshold, near.seed)
        sig = minhash.signatures(texts, p)
        b, r = p.lsh_shape()
        bands = minhash.band_hashes(sig, b, r)
        order = np.argsort(bands, axis=0, kind="stable")
        return cls(
            keys={t.casefold() for t in texts},
            sig=sig,
            bands=np.take_along_axis(bands, order, axis=0),
            order=order,
            params=p,
            fingerprint=hash_obj([texts, spec.threshold, p.num_perm, p.ngram, p.seed]),
        )

    def contaminated(self, texts: list[str]) -> np.ndarray:
        """Boolean per text: equal (case-folded) to an eval text or near-matching one."""
        hit = np.array([t.casefold() in self.keys for t in texts], dtype=bool)
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
) -> list[StageResult]:
    """Build the mixtures of ``stage`` from every recipe that has shards: one result per recipe (``cached``
    when its inputs are unchanged). Also writes the stage summary ``mixtures/<stage>/_manifest.json``."""
    names = sorted(n for n in recipe_names if read_manifest(root, shard_dir(stage, n)) is not None)
    missing = sorted(set(recipe_names) - set(names))
    if missing:
        log.warning("stage %s: no finished shards for %s (not ingested yet), left out", stage, missing)
    t0 = time.perf_counter()
    index = None
    if cfg.decontamination.enabled:
        near = minhash.MinHashParams(
            cfg.near_dedup.num_perm, cfg.near_dedup.ngram, cfg.decontamination.threshold, cfg.near_dedup.seed
        )
        index = EvalIndex.build(
            load_eval_texts(root, cfg, recipe_names), cfg.decontamination, near
        )
    # Who owns each id: the first recipe (by name) that has it.
    frames = []
    for order, name in enumerate(names):
        ids = read_rows(root, shard_dir(stage, name), ["id"]).column("id")
        frames.append(
            pl.DataFrame({"id": ids.to_numpy(zero_copy_only=False)}).with_columns(
                pl.lit(order, dtype=pl.Int32).alias("order")
            )
        )
    owners = (
        pl.concat(frames).group_by("id").agg(pl.col("order").min().alias("owner"))
        if frames
        else pl.DataFrame({"id": [], "owner": []})
    )
    results: list[StageResult] = []
    for order, name in enumerate(names):
        t_one = time.perf_counter()
        shard_m = read_manifest(root, shard_dir(stage, name))
        assert shard_m is not None
        ids_df = frames[order].join(owners, on="id", how="left")
        dup_ids = sorted(ids_df.filter(pl.col("owner") < order)["id"].to_list())
        fp = hash_obj(
            {
                "shards": [shard_m["config_hash"], shard_m["source_fingerprint"], shard_m["files"]],
                "dups": hash_obj(dup_ids),
                "eval": index.fingerprint if index else None,
                "schema": SCHEMA_VERSION,
            }
        )
        out = mixture_dir(stage, name)
        old = read_manifest(root, out)
        cached = not force and old is not None and old.get("input_fingerprint") == fp
        m = old if cached and old is not None else _build_one(root, stage, name, dup_ids, index, fp)
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


def _build_one(
    root: DataRoot, stage: str, name: str, dup_ids: list[str], index: EvalIndex | None, fp: str
) -> dict[str, Any]:
    """Filter one recipe's shards shard by shard (bounded memory: one input shard at a time)."""
    src = shard_dir(stage, name)
    shard_m = read_manifest(root, src)
    assert shard_m is not None
    out = mixture_dir(stage, name)
    staging = root.staging_dir(out)
    dup_set = pa.array(dup_ids, pa.string())
    drops = {"cross_recipe_dup": 0, "contaminated": 0}
    files, rows_in = [], 0
    for f in shard_m["files"]:
        table = root.read_parquet(f"{src}/{f['name']}")
        rows_in += table.num_rows
        if dup_ids:
            keep = pc.invert(pc.is_in(table.column("id"), value_set=dup_set))
            drops["cross_recipe_dup"] += table.num_rows - pc.sum(keep).as_py()
            table = table.filter(keep)
        if index is not None and table.num_rows:
            firsts = [p[0] for p in table.column("pos").to_pylist()]
            bad = index.contaminated(table.column("query").to_pylist()) | index.contaminated(firsts)
            drops["contaminated"] += int(bad.sum())
            table = table.filter(pa.array(~bad))
        root.write_parquet(f"{staging}/{f['name']}", table)
        files.append({"name": f["name"], "rows": table.num_rows})
    m = {
        "recipe": name,
        "stage": stage,
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
