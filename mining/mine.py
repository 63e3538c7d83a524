"""Hard-negative mining of a stage's mixtures: ``mixtures/<stage>/<recipe>/`` -> ``mined/<stage>/<recipe>/``.

Per recipe: build the candidate pool (the recipe's own positives and negatives, or a corpus plus the
positives), encode pool and queries through the embedding cache, index the pool, then work through the
queries in chunks (search, filter, sample) and publish the rows that kept negatives, same schema, ``neg``
filled. Every chunk is a file plus a done marker under ``mined/_work/<stage>/<recipe>/<job>/``; a rerun
after a crash (even ``kill -9``) skips finished chunks and produces the same bytes. The work folder goes
once the output is published.

>>> cfg = load_mine_config()                                                   # doctest: +SKIP
>>> run_mine_recipe(DataRoot.from_uri("./data"), "finetune", "faq_demo", "minilm", cfg)["rows_out"]
412
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.stage import mixture_dir, read_manifest, read_rows
from kalm.errors import KalmError
from kalm.hashing import hash_obj
from kalm.schema import ROW_SCHEMA, SCHEMA_VERSION, STAGES
from kalm.storage import MANIFEST, DataRoot
from mining.cache import EmbeddingStore, cache_dir, embed_texts
from mining.config import MineConfig, PoolSpec
from mining.encode import Encoder, load_encoder, show_progress
from mining.sample import (
    ChunkCandidates,
    Window,
    effective_window,
    merge_stats,
    new_stats,
    norm_key,
    row_seeds,
    sample_negatives,
)
from mining.search import Searcher, build_searcher

log = logging.getLogger(__name__)


def mined_dir(stage: str, recipe: str) -> str:
    return f"mined/{stage}/{recipe}"


def work_root(stage: str, recipe: str) -> str:
    """Where a recipe's unfinished jobs keep their chunks (``_`` prefix: never listed as a recipe)."""
    return f"mined/_work/{stage}/{recipe}"


# -- inputs ---------------------------------------------------------------------------------------------


class _Keys:
    """Interns normalised texts to small ints: equal ids <=> equal after normalisation."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        return self.ids.setdefault(norm_key(text), len(self.ids))


@dataclass
class Pool:
    """Candidate texts (what ``neg`` will hold), what the model sees for each, and their key ids."""

    texts: list[str]
    formatted: list[str]
    index: dict[str, int]
    keys: np.ndarray
    lineage: dict[str, Any]


def load_corpus(root: DataRoot, spec: PoolSpec) -> tuple[list[str], dict[str, Any]]:
    """Texts of the configured corpus file (Parquet or JSONL) and its lineage (path, bytes, sha256)."""
    assert spec.corpus is not None
    path = spec.corpus
    local = Path(path).expanduser()
    try:
        data = local.read_bytes() if local.is_absolute() else root.read_bytes(path)
    except (FileNotFoundError, OSError) as err:
        if isinstance(err, FileNotFoundError) or not (local.is_absolute() or root.exists(path)):
            raise KalmError(f"pool corpus not found: {path} (absolute, or relative to {root.uri})") from None
        raise
    field = spec.text_field
    if path.endswith(".parquet"):
        table = pq.read_table(pa.BufferReader(data))
        if field not in table.column_names:
            raise KalmError(
                f"pool corpus {path}: no column {field!r} (columns: {', '.join(table.column_names)})"
            )
        texts = [t for t in table.column(field).to_pylist() if isinstance(t, str)]
    elif path.endswith((".jsonl", ".json")):
        texts = []
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise KalmError(f"pool corpus {path}: line {n} is not JSON ({err.msg})") from None
            if isinstance(rec, dict) and isinstance(rec.get(field), str):
                texts.append(rec[field])
    else:
        raise KalmError(f"pool corpus {path}: use a .parquet or .jsonl file")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise KalmError(f"pool corpus {path}: no non-empty {field!r} texts")
    return texts, {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16]}


def build_pool(
    rows: dict[str, list[Any]],
    corpus: list[str] | None,
    doc_instruction: str | None,
    enc: Encoder,
    keys: _Keys,
) -> Pool:
    """The recipe's positives and negatives (deduplicated, first-seen order), or a corpus plus positives."""
    seen: dict[str, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, str) and t.strip() and t not in seen:
            seen[t] = len(seen)

    if corpus is None:
        for pos, neg in zip(rows["pos"], rows["neg"], strict=True):
            for t in pos:
                add(t)
            for t in neg:
                add(t)
    else:
        for t in corpus:
            add(t)
        for pos in rows["pos"]:
            for t in pos:
                add(t)  # positives must be rankable for the consistency filter
    texts = list(seen)
    formatted = [enc.format_query(t, doc_instruction) for t in texts] if doc_instruction else texts
    return Pool(
        texts=texts,
        formatted=formatted,
        index=seen,
        keys=np.array([keys(t) for t in texts], dtype=np.int64),
        lineage={"source": "corpus" if corpus is not None else "recipe", "size": len(texts)},
    )


def _most_common(values: list[Any], default: Any) -> Any:
    return Counter(values).most_common(1)[0][0] if values else default


# -- one recipe -----------------------------------------------------------------------------------------


def run_mine_recipe(
    root: DataRoot,
    stage: str,
    recipe: str,
    model: str,
    cfg: MineConfig,
    force: bool = False,
    *,
    encoder: Encoder | None = None,
    store: EmbeddingStore | None = None,
) -> dict[str, Any]:
    """Mine one recipe's mixture; returns its mined manifest plus ``skipped`` (True = cache hit).

    ``encoder`` reuses a loaded model (``model`` is then only recorded); ``store`` a shared embedding cache.
    A cache hit needs the same miner fingerprint and precision, config hash and input fingerprint.
    """
    t_start = time.perf_counter()
    if stage not in STAGES:
        raise KalmError(f"invalid stage {stage!r} (allowed: {', '.join(STAGES)})")
    src = mixture_dir(stage, recipe)
    m_in = read_manifest(root, src)
    if m_in is None:
        raise KalmError(f"{root.full_uri(src)} is missing or incomplete; build the {stage} mixtures first")
    enc = encoder or load_encoder(model, root, cfg.max_seq_length, cfg.precision, cfg.devices)
    corpus, corpus_lineage = load_corpus(root, cfg.pool) if cfg.pool.source == "corpus" else (None, None)
    inputs = {
        "mixture": {
            "path": src,
            "input_fingerprint": m_in.get("input_fingerprint"),
            "files": m_in.get("files", []),
            "rows_out": m_in.get("rows_out"),
        },
        "corpus": corpus_lineage,
        "schema_version": SCHEMA_VERSION,
    }
    input_fp = hash_obj(inputs)
    cfg_hash = cfg.config_hash()
    out = mined_dir(stage, recipe)
    old = read_manifest(root, out)
    if (
        not force
        and old is not None
        and old.get("miner", {}).get("fingerprint") == enc.fingerprint
        and old.get("miner", {}).get("precision") == enc.precision
        and old.get("config_hash") == cfg_hash
        and old.get("input_fingerprint") == input_fp
    ):
        log.info("mined %s/%s: unchanged model, config and inputs: cache hit", stage, recipe)
        return {**old, "skipped": True}

    job = hash_obj({"miner": enc.key, "config": cfg_hash, "inputs": input_fp, "chunk": cfg.chunk_queries}, 12)
    work = f"{work_root(stage, recipe)}/{job}"
    table = read_rows(root, src)
    cols = {c: table.column(c).to_pylist() for c in ("id", "query", "pos", "neg", "instruction", "symmetric")}
    n = table.num_rows

    keys = _Keys()
    symmetric = bool(_most_common(cols["symmetric"], False))
    doc_instruction = _most_common(cols["instruction"], None) if symmetric else None
    pool = build_pool(cols, corpus, doc_instruction, enc, keys)
    if n and not pool.texts:
        raise KalmError(f"{src}: empty candidate pool (no non-empty positives or negatives to mine from)")
    window = effective_window(cfg.window, cfg.top_k, len(pool.texts), cfg.small_pool) if n else None
    if window is not None and window.scaled:
        log.warning(
            "mined %s/%s: pool of %d texts is smaller than window %s: scaled to ranks [%d, %d), top-k %d",
            stage,
            recipe,
            len(pool.texts),
            list(cfg.window),
            window.lo,
            window.hi,
            window.top_k,
        )

    # Per-row facts (cheap, pure Python over the rows).
    own_pos: list[list[int]] = []
    group: dict[str, set[int]] = {}
    qnorm: list[str] = []
    for q, pos in zip(cols["query"], cols["pos"], strict=True):
        ids = list(dict.fromkeys(pool.index[p] for p in pos if isinstance(p, str) and p.strip()))
        own_pos.append(ids)
        nq = norm_key(q)
        qnorm.append(nq)
        group.setdefault(nq, set()).update(ids)

    n_chunks = math.ceil(n / cfg.chunk_queries) if n else 0
    markers = _finished_chunks(root, work, n_chunks)
    pending = [i for i in range(n_chunks) if i not in markers]
    if markers:
        log.info(
            "mined %s/%s: resuming job %s, %d of %d chunks already done",
            stage,
            recipe,
            job,
            len(markers),
            n_chunks,
        )

    enc_stats: dict[str, Any] = {"texts": 0, "unique": 0, "cache_hits": 0, "encoded": 0}
    enc_stats.update(corrupt_entries=0, corrupt_shards=0)
    timing = {"encode_s": 0.0, "index_s": 0.0, "search_s": 0.0, "sample_s": 0.0}
    if pending and window is not None:
        todo = [
            r
            for i in pending
            for r in range(i * cfg.chunk_queries, min(n, (i + 1) * cfg.chunk_queries))
            if cols["query"][r].strip() and own_pos[r]
        ]
        q_texts = [enc.format_query(cols["query"][r], cols["instruction"][r]) for r in todo]
        if store is None or not cfg.cache:
            where = cache_dir(enc.key) if cfg.cache else f"{work}/embeddings"
            store = EmbeddingStore(root, where, enc.dim)
        vecs, enc_stats = embed_texts(
            enc,
            pool.formatted + q_texts,
            store,
            batch_size=cfg.batch_size,
            shard_texts=cfg.cache_shard_texts,
            progress=show_progress(),
            desc=f"encode {recipe}",
        )
        timing["encode_s"] = enc_stats["encode_s"]
        pool_vecs = vecs[: len(pool.texts)]
        q_row = {r: j for j, r in enumerate(todo)}
        q_vecs = vecs[len(pool.texts) :]
        t0 = time.perf_counter()
        searcher = build_searcher(pool_vecs, cfg.index, cfg.search.query_batch)
        timing["index_s"] = round(time.perf_counter() - t0, 3)
        bar = _bar(len(pending), f"mine {recipe}") if show_progress() else None
        for i in pending:
            markers[i] = _mine_chunk(
                root, work, i, table, cols, cfg, pool, pool_vecs, q_vecs, q_row, own_pos, group, qnorm, keys,
                window, searcher, timing,
            )  # fmt: skip
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    elif pending:  # window is None: pool smaller than the window and small_pool: drop
        for i in pending:
            markers[i] = _drop_chunk(
                root, work, i, table, cols, own_pos, cfg.chunk_queries, "pool_smaller_than_window"
            )

    stats = new_stats()
    for i in range(n_chunks):
        stats = merge_stats(stats, markers[i]["stats"])
    index_lineage = next((markers[i].get("index") for i in range(n_chunks) if markers[i].get("index")), None)
    manifest = {
        "recipe": recipe,
        "stage": stage,
        "category": _most_common(table.column("category").to_pylist(), ""),
        "task_type": _most_common(table.column("task_type").to_pylist(), ""),
        "rows_in": n,
        "rows_out": stats["rows_kept"],
        "drops": stats["drops"],
        "stats": stats,
        "miner": enc.lineage(),
        "index": index_lineage or {"type": cfg.index.type, "backend": None},
        "window": list(cfg.window),
        "top_k": cfg.top_k,
        "num_negatives": cfg.num_negatives,
        "seed": cfg.seed,
        "effective": window.lineage() if window is not None else None,
        "pool": {**pool.lineage, "corpus": corpus_lineage},
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg_hash,
        "inputs": inputs,
        "input_fingerprint": input_fp,
        "job": job,
        "encode": enc_stats,
        "chunks": {
            "total": n_chunks,
            "resumed": n_chunks - len(pending),
            "computed": len(pending),
            "chunk_queries": cfg.chunk_queries,
        },
        "schema_version": SCHEMA_VERSION,
    }
    _publish(root, stage, recipe, work, markers, n_chunks, manifest, timing, t_start)
    log.info(
        "mined %s/%s: %d -> %d rows, drops %s, short %d, encoded %d texts (%d cached), %.1fs",
        stage,
        recipe,
        n,
        manifest["rows_out"],
        stats["drops"],
        stats["short_rows"],
        enc_stats["encoded"],
        enc_stats["cache_hits"],
        manifest["timing"]["total_s"],
    )
    return {**manifest, "skipped": False}


def _chunk_paths(work: str, i: int) -> tuple[str, str]:
    return f"{work}/chunk-{i:05d}.parquet", f"{work}/chunk-{i:05d}.done.json"


def _finished_chunks(root: DataRoot, work: str, n_chunks: int) -> dict[int, dict[str, Any]]:
    """Chunks whose marker exists and whose file still has the recorded checksum."""
    done: dict[int, dict[str, Any]] = {}
    for i in range(n_chunks):
        data_rel, marker_rel = _chunk_paths(work, i)
        if not root.exists(marker_rel) or not root.exists(data_rel):
            continue
        marker = root.read_json(marker_rel)
        if hashlib.sha256(root.read_bytes(data_rel)).hexdigest() == marker.get("sha256"):
            done[i] = marker
        else:
            log.warning("mining: chunk %s does not match its marker; recomputing it", data_rel)
    return done


def _write_chunk(
    root: DataRoot, work: str, i: int, out: pa.Table, stats: dict[str, Any], index: dict[str, Any] | None
) -> dict[str, Any]:
    """The chunk file first (whole: temp name + rename, or one PUT), then its marker."""
    out = pa.Table.from_arrays(out.columns, schema=ROW_SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(out, buf, compression="zstd")
    data = buf.getvalue().to_pybytes()
    data_rel, marker_rel = _chunk_paths(work, i)
    root.write_bytes(data_rel, data)
    marker = {
        "chunk": i,
        "rows": out.num_rows,
        "sha256": hashlib.sha256(data).hexdigest(),
        "stats": stats,
        "index": index,
    }
    root.write_json(marker_rel, marker)
    return marker


def _with_negatives(chunk: pa.Table, keep: list[int], negs: list[list[str]]) -> pa.Table:
    kept = chunk.take(pa.array(keep, pa.int64()))
    col = kept.schema.get_field_index("neg")
    return kept.set_column(col, ROW_SCHEMA.field("neg"), pa.array(negs, pa.list_(pa.string())))


def _pre_drops(cols: dict[str, list[Any]], own_pos: list[list[int]], rows: range) -> tuple[list[int], dict]:
    """Rows that can be mined, and the stats of those that cannot (empty query, no positive)."""
    stats = new_stats()
    stats["rows_in"] = len(rows)
    ok: list[int] = []
    for r in rows:
        if not cols["query"][r].strip():
            stats["drops"]["empty_query"] = stats["drops"].get("empty_query", 0) + 1
        elif not own_pos[r]:
            stats["drops"]["no_positive"] = stats["drops"].get("no_positive", 0) + 1
        else:
            ok.append(r)
    return ok, stats


def _drop_chunk(
    root: DataRoot,
    work: str,
    i: int,
    table: pa.Table,
    cols: dict[str, list[Any]],
    own_pos: list[list[int]],
    chunk_queries: int,
    reason: str,
) -> dict[str, Any]:
    """A chunk whose minable rows are all dropped for one ``reason`` (no search needed)."""
    start, stop = i * chunk_queries, min(table.num_rows, (i + 1) * chunk_queries)
    ok, stats = _pre_drops(cols, own_pos, range(start, stop))
    if ok:
        stats["drops"][reason] = len(ok)
    return _write_chunk(root, work, i, table.slice(start, 0), stats, None)


def _mine_chunk(
    root: DataRoot,
    work: str,
    i: int,
    table: pa.Table,
    cols: dict[str, list[Any]],
    cfg: MineConfig,
    pool: Pool,
    pool_vecs: np.ndarray,
    q_vecs: np.ndarray,
    q_row: dict[int, int],
    own_pos: list[list[int]],
    group: dict[str, set[int]],
    qnorm: list[str],
    keys: _Keys,
    window: Window,
    searcher: Searcher,
    timing: dict[str, float],
) -> dict[str, Any]:
    """Search, filter and sample one chunk of queries; write its rows and marker."""
    start, stop = i * cfg.chunk_queries, min(table.num_rows, (i + 1) * cfg.chunk_queries)
    ok, stats = _pre_drops(cols, own_pos, range(start, stop))
    t0 = time.perf_counter()
    qv = q_vecs[[q_row[r] for r in ok]] if ok else np.zeros((0, pool_vecs.shape[1]), np.float32)
    scores, ids = searcher.search(qv, window.depth)
    timing["search_s"] = round(timing["search_s"] + time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    pos_score = np.array(
        [float((pool_vecs[own_pos[r]] @ qv[j]).min()) for j, r in enumerate(ok)], dtype=np.float32
    )
    group_pos = [sorted(group[qnorm[r]]) for r in ok]
    src_negs = [[t for t in cols["neg"][r] if isinstance(t, str) and t.strip()] for r in ok]
    cand = ChunkCandidates(
        ids=ids,
        scores=scores,
        own_pos=[own_pos[r] for r in ok],
        group_pos=group_pos,
        group_pos_keys=[sorted({int(pool.keys[p]) for p in g}) for g in group_pos],
        query_key=np.array([keys(cols["query"][r]) for r in ok], dtype=np.int64),
        pos_score=pos_score,
        seeds=row_seeds(cfg.seed, [cols["id"][r] for r in ok]),
        source_negs=src_negs,
        source_neg_keys=[[keys(t) for t in negs] for negs in src_negs],
    )
    negs, st = sample_negatives(cand, pool.texts, pool.keys, window, cfg)
    stats = merge_stats(stats, {**st, "rows_in": 0})
    keep = [r - start for r, ng in zip(ok, negs, strict=True) if ng is not None]
    out = _with_negatives(table.slice(start, stop - start), keep, [ng for ng in negs if ng is not None])
    timing["sample_s"] = round(timing["sample_s"] + time.perf_counter() - t0, 3)
    return _write_chunk(root, work, i, out, stats, searcher.lineage())


def _publish(
    root: DataRoot,
    stage: str,
    recipe: str,
    work: str,
    markers: dict[int, dict[str, Any]],
    n_chunks: int,
    manifest: dict[str, Any],
    timing: dict[str, float],
    t_start: float,
) -> None:
    """Copy the chunk files into a staging folder, manifest last, publish atomically, drop the work folder."""
    out = mined_dir(stage, recipe)
    staging = root.staging_dir(out)
    files = []
    for i in range(n_chunks):
        mk = markers[i]
        if mk["rows"] == 0:
            continue
        data = root.read_bytes(_chunk_paths(work, i)[0])
        if hashlib.sha256(data).hexdigest() != mk["sha256"]:
            raise KalmError(
                f"{root.full_uri(work)}: chunk {i} changed after it was written; rerun to redo it"
            )
        name = f"part-{i:05d}.parquet"
        root.write_bytes(f"{staging}/{name}", data)
        files.append({"name": name, "rows": mk["rows"], "sha256": mk["sha256"][:16]})
    manifest["files"] = files
    manifest["fingerprint"] = hash_obj([[f["name"], f["sha256"], f["rows"]] for f in files])
    manifest["timing"] = {**timing, "total_s": round(time.perf_counter() - t_start, 3)}
    manifest["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    root.write_json(f"{staging}/{MANIFEST}", manifest)  # manifest last
    root.publish_dir(staging, out)
    root.delete_dir(work_root(stage, recipe))


def _bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", leave=False)


# -- a stage ----------------------------------------------------------------------------------------------


def run_mine_stage(
    root: DataRoot,
    stage: str,
    model: str,
    cfg: MineConfig,
    recipes: list[str] | None = None,
    force: bool = False,
    *,
    encoder: Encoder | None = None,
) -> list[dict[str, Any]]:
    """Mine every recipe with a mixture under ``mixtures/<stage>/`` (or ``recipes``), loading the model once.

    Also writes ``mined/<stage>/_manifest.json``: one summary line per recipe.
    """
    if stage not in STAGES:
        raise KalmError(f"invalid stage {stage!r} (allowed: {', '.join(STAGES)})")
    available = [n for n in root.list_dirs(f"mixtures/{stage}") if read_manifest(root, mixture_dir(stage, n))]
    names = list(dict.fromkeys(recipes)) if recipes else available
    missing = [n for n in names if n not in available]
    if missing:
        raise KalmError(
            f"no finished mixture for {', '.join(missing)} under {root.full_uri('mixtures', stage)} "
            f"(available: {', '.join(available) or 'none'})"
        )
    if not names:
        raise KalmError(
            f"no mixtures under {root.full_uri('mixtures', stage)}; build the {stage} mixtures first"
        )
    t0 = time.perf_counter()
    enc = encoder or load_encoder(model, root, cfg.max_seq_length, cfg.precision, cfg.devices)
    store = EmbeddingStore(root, cache_dir(enc.key), enc.dim) if cfg.cache else None
    results = [run_mine_recipe(root, stage, n, model, cfg, force, encoder=enc, store=store) for n in names]
    report = {
        "stage": stage,
        "miner": enc.lineage(),
        "config_hash": cfg.config_hash(),
        "recipes": {r["recipe"]: summary(r) for r in results},
        "rows_out": sum(r["rows_out"] for r in results),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    root.write_json(f"mined/{stage}/{MANIFEST}", report)
    return results


def summary(m: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a report shows for one mined recipe."""
    s = m.get("stats", {})
    return {
        "rows_in": m["rows_in"],
        "rows_out": m["rows_out"],
        "drops": m.get("drops", {}),
        "short_rows": s.get("short_rows", 0),
        "positive_rank_hist": s.get("positive_rank_hist", {}),
        "encoded": m.get("encode", {}).get("encoded", 0),
        "skipped": m.get("skipped", False),
    }


def stale_negatives(root: DataRoot, stage: str, model_fingerprint: str) -> list[str]:
    """Recipes under ``mined/<stage>/`` whose negatives a model other than ``model_fingerprint`` mined."""
    stale = []
    for name in root.list_dirs(f"mined/{stage}"):
        m = read_manifest(root, mined_dir(stage, name))
        if m is not None and m.get("miner", {}).get("fingerprint") != model_fingerprint:
            stale.append(name)
    return stale


def report_markdown(results: list[dict[str, Any]], title: str = "Mining report") -> str:
    """A Markdown table: rows in/out, drops by reason, short rows, encoded texts, cache hit."""
    lines = [
        f"## {title}",
        "",
        "| recipe | rows in | rows out | drops | short rows | best positive rank | encoded | cache hit |",
        "|---|---:|---:|---|---:|---|---:|---|",
    ]
    for m in results:
        s = summary(m)
        drops = ", ".join(f"{k} {v}" for k, v in s["drops"].items()) or "-"
        hist = ", ".join(f"{k}: {v}" for k, v in s["positive_rank_hist"].items()) or "-"
        lines.append(
            f"| {m['recipe']} | {s['rows_in']} | {s['rows_out']} | {drops} | {s['short_rows']} | {hist} "
            f"| {s['encoded']} | {'yes' if s['skipped'] else 'no'} |"
        )
    return "\n".join(lines)
