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

from curation import minhash
from curation.config import DecontamSpec, IngestConfig
from curation.ingest import holdout_dir, shard_dir
from curation.normalize import normalize_text
from kalm.errors import KalmError
from kalm.hashing import hash_obj
from kalm.schema import SCHEMA_VERSION
from kalm.storage import MANIFEST, DataRoot

log = logging.getLogger(__name__)


def mixture_dir(stage: str, recipe: str) -> str:
    return f"mixtures/{stage}/{recipe}"


def read_manifest(root: DataRoot, rel: str) -> dict[str, Any] | None:
    """The manifest of a finished folder, or None when the folder is missing or incomplete."""
    return root.read_json(f"{rel}/{MANIFEST}") if root.exists(f"{rel}/{MANIFEST}") else None


def read_rows(root: DataRoot, rel: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of a finished folder, through its manifest (never a glob: stray files are ignored)."""
    m = read_manifest(root, rel)
    if m is None:
        raise KalmError(f"{root.full_uri(rel)} is missing or incomplete (no {MANIFEST}); run its stage first")
    tables = [root.read_parquet(f"{rel}/{f['name']}", columns=columns) for f in m["files"]]
    if not tables:
        from kalm.schema import ROW_SCHEMA

        schema = ROW_SCHEMA if columns is None else pa.schema([ROW_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables)


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


def load_eval_texts(
    root: DataRoot, cfg: IngestConfig, config_dir: Path, recipe_names: Sequence[str]
) -> list[str]:
    """Texts of the configured evaluation sets plus the recipes' held-out rows."""
    texts: list[str] = []
    spec = cfg.decontamination
    for es in spec.eval_sets:
        path = Path(es.path) if Path(es.path).is_absolute() else config_dir / es.path
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
    config_dir: Path,
    force: bool = False,
) -> dict[str, Any]:
    """Build the mixtures of ``stage`` from every recipe that has shards; returns the stage manifest."""
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
            load_eval_texts(root, cfg, config_dir, recipe_names), cfg.decontamination, near
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
    report: dict[str, Any] = {"stage": stage, "recipes": {}, "schema_version": SCHEMA_VERSION}
    for order, name in enumerate(names):
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
        if not force and old is not None and old.get("input_fingerprint") == fp:
            report["recipes"][name] = {**_summary(old), "skipped": True}
            continue
        report["recipes"][name] = {
            **_summary(_build_one(root, stage, name, dup_ids, index, fp)),
            "skipped": False,
        }
    report["rows_out"] = sum(r["rows_out"] for r in report["recipes"].values())
    report["seconds"] = round(time.perf_counter() - t0, 3)
    root.write_json(f"mixtures/{stage}/{MANIFEST}", report)
    return report


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
