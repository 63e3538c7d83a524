"""Ingest one recipe: source -> mapped, normalised, filtered, deduplicated rows -> Parquet shards.

Three passes with bounded memory (only 8-byte ids and LSH band hashes per row stay in RAM):

1. stream raw records, map and clean them, compute ids and MinHash signatures per batch; rows go to a
   local spill file, signatures to a memory-mapped file;
2. exact dedup on ids, then near dedup with LSH band collisions verified on the signatures;
3. stream the spill again and write the kept rows as zstd shards of at most ``shard_rows`` rows.

Output: ``<root>/shards/<stage>/<recipe>/part-NNNNN.parquet`` + ``_manifest.json``, built in a staging
folder and published at once; an unchanged recipe with an unchanged source is skipped.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kalm.core.hashing import hash_obj
from kalm.core.layout import MANIFEST, holdout_dir, shard_dir
from kalm.core.process import pid_alive
from kalm.core.results import StageResult
from kalm.core.schema import ROW_SCHEMA, SCHEMA_VERSION, row_id
from kalm.core.storage import DataRoot
from kalm.data import minhash
from kalm.data.config import IngestConfig
from kalm.data.normalize import comparison_form
from kalm.data.readers import iter_records, source_fingerprint
from kalm.data.recipes import LoadedRecipe
from kalm.data.rows import clean_row, clean_text, map_record

log = logging.getLogger(__name__)
# Reasons counted by the readers, before a record exists (they add to rows_in).
READER_SKIPS = ("malformed_json", "invalid_utf8_line", "not_an_object", "malformed_csv", "unparsable_file")


def ingest_fingerprint(lr: LoadedRecipe, cfg: IngestConfig, use_samples: bool) -> str:
    """What decides whether the recipe's shards are still valid (besides the source itself)."""
    return hash_obj(
        {
            "recipe_file": lr.fingerprint,
            "recipe": lr.recipe.model_dump(mode="json"),
            "near": cfg.near_dedup.model_dump(),
            "shard_rows": cfg.shard_rows,
            "schema": SCHEMA_VERSION,
            "samples": use_samples,
        }
    )


def _canonical(lr: LoadedRecipe, partial: dict[str, Any]) -> dict[str, Any]:
    r = lr.recipe
    return {
        "id": row_id(partial["query"], partial["pos"][0]),
        "query": partial["query"],
        "pos": partial["pos"],
        "neg": partial.get("neg", []),
        "instruction": partial.get("instruction") or r.instruction,
        "symmetric": r.task_type in ("sts", "pair_classification", "clustering", "bitext"),
        "category": r.category,
        "task_type": r.task_type,
        "recipe": r.name,
        "stage": r.stage,
        "lang": r.language,
        "label": partial.get("label", "") if r.label_based else "",
        "neg_labels": partial.get("neg_labels", []),
    }


def _pair_rows(lr: LoadedRecipe, records: Iterator[dict[str, Any]], stats: Counter[str]) -> Iterator[dict]:
    """Query/positive sources: map, filter by score/label, clean."""
    r = lr.recipe
    keep_labels = set(r.keep_labels) if r.keep_labels is not None else None
    for rec in records:
        stats["records"] += 1
        partial = map_record(rec, lr)
        if isinstance(partial, str):
            stats[partial] += 1
            continue
        if r.min_score is not None and partial.get("score", r.min_score) < r.min_score:
            stats["low_score"] += 1
            continue
        if keep_labels is not None and partial.get("label") not in keep_labels:
            stats["label_not_kept"] += 1
            continue
        try:
            cleaned = clean_row(partial, r.filters, stats)
            if isinstance(cleaned, str):
                stats[cleaned] += 1
                continue
            row = _canonical(lr, cleaned)
        except (KeyError, TypeError, ValueError, UnicodeError) as err:  # one bad record, not the recipe
            stats["bad_record"] += 1
            log.warning(
                "%s: a record could not be made a row (%s: %s), skipped", r.name, type(err).__name__, err
            )
            continue
        yield row


def _label_rows(
    lr: LoadedRecipe, records: Iterator[dict[str, Any]], stats: Counter[str], cfg: IngestConfig
) -> Iterator[dict]:
    """Classification/clustering: dedup texts, then pair each text with another of its label (positive)
    and texts of other labels (negatives): the paper's example-based multi-class labelling. In memory:
    labelled sources are curated and small (METHOD.md: ~6M samples over 100+ categories)."""
    r = lr.recipe
    texts: list[str] = []
    labels: list[str] = []
    seen: set[str] = set()
    for rec in records:
        stats["records"] += 1
        partial = map_record(rec, lr)
        if isinstance(partial, str):
            stats[partial] += 1
            continue
        t = clean_text(partial["text"], r.filters)
        if isinstance(t, tuple):
            stats[t[1]] += 1
            continue
        key = t.casefold()
        if key in seen:
            stats["exact_dup"] += 1
            continue
        seen.add(key)
        texts.append(t)
        labels.append(partial["label"])
    if cfg.near_dedup.enabled and texts:
        keep = _near_keep(texts, cfg)
        stats["near_dup"] += int((~keep).sum())
        texts = [t for t, k in zip(texts, keep, strict=True) if k]
        labels = [lab for lab, k in zip(labels, keep, strict=True) if k]
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by_label[lab].append(i)
    rng = random.Random(r.seed)
    all_labels = sorted(by_label)
    for i, (t, lab) in enumerate(zip(texts, labels, strict=True)):
        same = by_label[lab]
        if len(same) < 2:
            stats["singleton_label"] += 1
            continue
        j = i
        while j == i:
            j = rng.choice(same)
        others = [x for x in all_labels if x != lab]
        neg: dict[str, str] = {}  # text -> its label (distinct texts)
        if others:
            for other in rng.sample(others, min(r.negatives_per_row, len(others))):
                neg.setdefault(texts[rng.choice(by_label[other])], other)
            for _ in range(4 * r.negatives_per_row):  # fewer labels than negatives: draw more, bounded
                if len(neg) >= r.negatives_per_row:
                    break
                lab_n = rng.choice(others)
                neg.setdefault(texts[rng.choice(by_label[lab_n])], lab_n)
        row = {
            "query": t,
            "pos": [texts[j]],
            "neg": list(neg),
            "label": lab,
            "neg_labels": list(neg.values()),
        }
        yield _canonical(lr, row)


def near_text(row: dict[str, Any], label_based: bool = False) -> str:
    """What near dedup shingles: the comparison form (case, Unicode and whitespace normalised) of the query
    and first positive (of the text alone for classification/clustering rows, whose positive is random)."""
    if label_based:
        return comparison_form(row["query"])
    return comparison_form(row["query"]) + " \x1f " + comparison_form(row["pos"][0])


def _near_keep(texts: list[str], cfg: IngestConfig) -> np.ndarray:
    p = minhash.MinHashParams(
        num_perm=cfg.near_dedup.num_perm,
        ngram=cfg.near_dedup.ngram,
        threshold=cfg.near_dedup.threshold,
        seed=cfg.near_dedup.seed,
    )
    sig = minhash.signatures([comparison_form(t) for t in texts], p)
    labels = minhash.duplicate_clusters(minhash.band_hashes(sig, *p.lsh_shape()), sig, p.threshold)
    return minhash.first_of_clusters(labels)


def _is_holdout(row_id_hex: str, fraction: float) -> bool:
    return fraction > 0 and (int(row_id_hex[:8], 16) % 10_000) < fraction * 10_000


def run_ingest_recipe(
    lr: LoadedRecipe,
    root: DataRoot,
    cfg: IngestConfig,
    *,
    use_samples: bool = False,
    force: bool = False,
) -> StageResult:
    """Build (or skip: ``cached``) the shards of one recipe; the result's manifest is the folder's."""
    t_call = time.perf_counter()
    r = lr.recipe
    out = shard_dir(r.stage, r.name)
    fp = ingest_fingerprint(lr, cfg, use_samples)
    src_path = lr.sample_path() if use_samples else None
    src_fp = hash_obj(
        source_fingerprint(r.source, lr.dir) if not use_samples else [str(src_path), _stat(src_path)]
    )
    if not force and root.exists(f"{out}/{MANIFEST}"):
        old = root.read_json(f"{out}/{MANIFEST}")
        broken = root.files_intact(out, old.get("files", []))
        if broken:
            log.warning("%s: shards changed after they were written (%s); rebuilding", r.name, broken)
        elif old.get("config_hash") == fp and old.get("source_fingerprint") == src_fp:
            log.info("%s: unchanged recipe and source, skipped", r.name)
            return _result(root, out, old, True, time.perf_counter() - t_call)
    t0 = time.perf_counter()
    stats: Counter[str] = Counter()
    records = iter_records(r.source, lr.dir, stats, src_path)
    p = minhash.MinHashParams(
        num_perm=cfg.near_dedup.num_perm,
        ngram=cfg.near_dedup.ngram,
        threshold=cfg.near_dedup.threshold,
        seed=cfg.near_dedup.seed,
    )
    bands, band_rows = p.lsh_shape()
    _sweep_spills(r.name)
    with tempfile.TemporaryDirectory(prefix=f"kalm-{r.name}-{os.getpid()}-") as tmp:
        spill_path = Path(tmp) / "spill.parquet"
        sig_path = Path(tmp) / "sig.u32"
        ids: list[np.ndarray] = []
        band_chunks: list[np.ndarray] = []
        n = 0
        rows_iter = _label_rows(lr, records, stats, cfg) if r.label_based else _pair_rows(lr, records, stats)
        near_on = cfg.near_dedup.enabled and not r.label_based  # label sources dedup texts before pairing
        with pq.ParquetWriter(spill_path, ROW_SCHEMA, compression="lz4") as spill, open(sig_path, "wb") as sf:
            for batch in _batched(rows_iter, cfg.batch_rows, r.max_rows):
                spill.write_table(pa.Table.from_pylist(batch, schema=ROW_SCHEMA))
                ids.append(np.array([int(b["id"], 16) for b in batch], dtype=np.uint64))
                if near_on:
                    sig = minhash.signatures([near_text(b) for b in batch], p)
                    sf.write(sig.tobytes())
                    band_chunks.append(minhash.band_hashes(sig, bands, band_rows))
                n += len(batch)
        keep = _dedup_mask(ids, band_chunks, sig_path, n, p, stats) if n else np.zeros(0, dtype=bool)
        meta = {
            "recipe": r.name,
            "stage": r.stage,
            "category": r.category,
            "task_type": r.task_type,
            "language": r.language,
            "recipe_path": str(lr.path),
            "recipe_file": lr.fingerprint,  # the recipe file's content hash: lineage of "recipe version"
            "config_hash": fp,
            "source_fingerprint": src_fp,
            "used_samples": use_samples,
            "schema_version": SCHEMA_VERSION,
            "lsh": {"bands": bands, "rows": band_rows, **cfg.near_dedup.model_dump()},
        }
        manifest = _write_shards(root, out, spill_path, keep, cfg, r.holdout, stats, meta, t0)
    return _result(root, out, manifest, False, time.perf_counter() - t_call)


def _sweep_spills(recipe: str) -> None:
    """Remove the spill folders (tens of MB each) that killed ingests of ``recipe`` left in the temp dir:
    those whose process is gone."""
    mine = re.compile(re.escape(f"kalm-{recipe}-") + r"(\d+)-[^/]*")
    for d in Path(tempfile.gettempdir()).glob(f"kalm-{glob.escape(recipe)}-*"):
        m = mine.fullmatch(d.name)
        if not m or not d.is_dir() or pid_alive(int(m.group(1))):
            continue
        log.warning("%s: removing %s, left by a killed ingest", recipe, d)
        shutil.rmtree(d, ignore_errors=True)


def _result(root: DataRoot, out: str, m: dict[str, Any], cached: bool, seconds: float) -> StageResult:
    keys = ("recipe_file", "source_fingerprint", "config_hash")
    return StageResult(
        stage="ingest",
        name=m["recipe"],
        outputs=[root.full_uri(out)],
        rows=int(m["rows_out"]),
        cached=cached,
        seconds=round(seconds, 3),
        lineage={k: m.get(k) for k in keys},
        manifest=m,
    )


def _stat(p: Path | None) -> list[Any]:
    if p is None or not p.exists():
        return []
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _batched(rows: Iterator[dict], size: int, limit: int | None) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for total, row in enumerate(rows):
        if limit is not None and total >= limit:
            break
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _dedup_mask(
    ids: list[np.ndarray],
    band_chunks: list[np.ndarray],
    sig_path: Path,
    n: int,
    p: minhash.MinHashParams,
    stats: Counter[str],
) -> np.ndarray:
    """Keep-mask over spilled rows: first of each exact id, then first of each verified near cluster."""
    all_ids = np.concatenate(ids)
    _, first = np.unique(all_ids, return_index=True)
    keep = np.zeros(n, dtype=bool)
    keep[first] = True
    stats["exact_dup"] += int(n - keep.sum())
    if band_chunks:
        idx = np.nonzero(keep)[0]
        bands = np.concatenate(band_chunks)
        band_chunks.clear()
        if len(idx) < n:
            bands = bands[idx]
        labels = minhash.duplicate_clusters(bands, _SigFile(sig_path, p.num_perm, idx), p.threshold)
        del bands
        near_keep = minhash.first_of_clusters(labels)
        stats["near_dup"] += int((~near_keep).sum())
        keep[idx[~near_keep]] = False
    return keep


class _SigFile:
    """Signature rows read on demand with ``os.pread``: ``_SigFile(path, k, idx)[a] == sig[idx[a]]``.

    Only candidate pairs are verified, so only their rows are read. A memory map would be simpler, but every
    page it touches counts as resident memory, which then grows with the source (512 bytes per row)."""

    def __init__(self, path: Path, num_perm: int, idx: np.ndarray) -> None:
        self.path, self.row_bytes, self.idx = path, num_perm * 4, idx
        self.num_perm = num_perm

    def __getitem__(self, a: np.ndarray) -> np.ndarray:
        rows = self.idx[a]
        uniq, inverse = np.unique(rows, return_inverse=True)
        buf = bytearray(len(uniq) * self.row_bytes)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            view = memoryview(buf)
            for j, r in enumerate(uniq.tolist()):
                view[j * self.row_bytes : (j + 1) * self.row_bytes] = os.pread(
                    fd, self.row_bytes, r * self.row_bytes
                )
        finally:
            os.close(fd)
        return np.frombuffer(buf, dtype=np.uint32).reshape(len(uniq), self.num_perm)[inverse]


def _write_shards(
    root: DataRoot,
    out: str,
    spill_path: Path,
    keep: np.ndarray,
    cfg: IngestConfig,
    holdout: float,
    stats: Counter[str],
    meta: dict[str, Any],
    t0: float,
) -> dict[str, Any]:
    staging = root.staging_dir(out)
    files: list[dict[str, Any]] = []
    held: list[pa.Table] = []
    pending: list[pa.Table] = []
    pending_rows = 0
    offset = 0

    def flush(tables: list[pa.Table]) -> None:
        table = pa.concat_tables(tables)
        name = f"part-{len(files):05d}.parquet"
        files.append({"name": name, "rows": table.num_rows, **root.write_parquet(f"{staging}/{name}", table)})

    with pq.ParquetFile(spill_path) as pf:
        for batch in pf.iter_batches(batch_size=cfg.batch_rows):
            mask = keep[offset : offset + batch.num_rows]
            offset += batch.num_rows
            table = pa.Table.from_batches([batch]).filter(pa.array(mask))
            if holdout > 0 and table.num_rows:
                ho = pa.array([_is_holdout(i, holdout) for i in table.column("id").to_pylist()])
                held.append(table.filter(ho))
                table = table.filter(pc.invert(ho))
            while table.num_rows:
                take = min(table.num_rows, cfg.shard_rows - pending_rows)
                pending.append(table.slice(0, take))
                pending_rows += take
                table = table.slice(take)
                if pending_rows >= cfg.shard_rows:
                    flush(pending)
                    pending, pending_rows = [], 0
    if pending:
        flush(pending)
    rows_out = sum(f["rows"] for f in files)
    drops = {k: v for k, v in sorted(stats.items()) if v and k not in ("records", "neg_removed")}
    manifest: dict[str, Any] = {
        **meta,
        "rows_in": stats["records"] + sum(stats[k] for k in READER_SKIPS),
        "rows_out": rows_out,
        "drops": drops,
        "negatives_removed": stats["neg_removed"],
        "files": files,
        "holdout_rows": 0,
    }
    if held and sum(t.num_rows for t in held):
        table = pa.concat_tables(held)
        ho_dir = holdout_dir(out.rsplit("/", 1)[-1])
        ho_staging = root.staging_dir(ho_dir)
        info = root.write_parquet(f"{ho_staging}/part-00000.parquet", table)
        files_ho = [{"name": "part-00000.parquet", "rows": table.num_rows, **info}]
        root.write_json(f"{ho_staging}/{MANIFEST}", {"rows_out": table.num_rows, "files": files_ho})
        root.publish_dir(ho_staging, ho_dir)
        manifest["holdout_rows"] = table.num_rows
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    manifest["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    root.write_json(f"{staging}/{MANIFEST}", manifest)  # manifest last: it marks the folder complete
    root.publish_dir(staging, out)
    return manifest
