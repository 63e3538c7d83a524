"""The score stage: a teacher scores every mined row, and drops the negatives it calls false.

``mined/<stage>/<recipe>/`` -> ``scored/<stage>/<recipe>/``: the same rows with ``pos_scores`` and
``neg_scores`` (the teacher's score of the query against each positive and each negative, declared in
:data:`kalm.core.schema.SCORED_SCHEMA`), the negatives the teacher scores within the margin of the positive
removed (NV-Retriever's TopK-PercPos; :class:`~kalm.mining.config.ScoreConfig`). Fine-tuning reads these
rows (``data.source: scored``) and distills the scores (``loss.distill_alpha``).

Teachers (:class:`~kalm.mining.config.TeacherSpec`): an embedding model (cosine; queries formatted with the
teacher's own template, documents of symmetric tasks too; vectors through the shared embedding cache, so a
teacher that also mined reuses the miner's vectors) or a cross-encoder (sentence-transformers
``CrossEncoder``, one raw logit per (query, document) pair). A cache hit needs the same teacher fingerprint,
config hash and input fingerprint; chunks resume after a crash (even ``kill -9``) with the same bytes
(:mod:`kalm.mining.chunks`). On GPUs the embedding teacher uses every device of the node (``devices``).

>>> cfg = load_score_config()                                                  # doctest: +SKIP
>>> run_score_recipe(DataRoot.from_uri("./data"), "finetune", "faq_demo", cfg).rows     # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kalm.core.errors import KalmError
from kalm.core.fingerprint import model_fingerprint
from kalm.core.hashing import hash_obj
from kalm.core.layout import embedding_cache_dir, mined_dir, mined_root, scored_dir, scored_work_dir
from kalm.core.results import StageResult
from kalm.core.schema import SCHEMA_VERSION, SCORED_SCHEMA, STAGES
from kalm.core.storage import DataRoot, read_manifest, read_rows
from kalm.mining.cache import EmbeddingStore, embed_texts
from kalm.mining.chunks import folder_result, publish, resume_state, write_chunk
from kalm.mining.config import ScoreConfig, TeacherSpec
from kalm.mining.encode import Encoder, load_encoder, resolve_devices, resolve_precision

log = logging.getLogger(__name__)

ROW_DROPS = ("no_positive_score", "too_few_negatives")
NEG_DROPS = ("within_margin", "no_score", "row_dropped")


@dataclass
class Teacher:
    """A loaded teacher and what identifies its scores (``fingerprint``: its folder's, plus kind)."""

    kind: str
    spec: str
    path: str
    fingerprint: str
    encoder: Encoder | None = None
    cross: Any = None  # sentence_transformers.CrossEncoder

    def lineage(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "model": self.spec,
            "path": self.path,
            "fingerprint": self.fingerprint,
        }
        if self.encoder is not None:
            out.update(precision=self.encoder.precision, max_length=self.encoder.embedder.max_length)
        return out


def _architectures(path: str) -> list[str]:
    cfg = Path(path) / "config.json"
    try:
        return list(json.loads(cfg.read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []


def _checked_path(spec: TeacherSpec, root: DataRoot | None) -> str:
    """The teacher's folder, its kind checked against its ``architectures``: one-line errors."""
    from kalm.training.config import resolve_model_path

    path = resolve_model_path(spec.model, root)
    if not Path(path).is_dir():
        raise KalmError(f"teacher {spec.model!r}: no model folder at {path}")
    archs = _architectures(path)
    is_cross = any(a.endswith("ForSequenceClassification") for a in archs)
    if spec.kind == "embedding" and is_cross:
        raise KalmError(
            f"teacher {spec.model!r} is a cross-encoder ({archs[0]}): set teacher.kind: cross_encoder"
        )
    if spec.kind == "cross_encoder" and not is_cross:
        found = ", ".join(archs) or "no sequence-classification head"
        raise KalmError(
            f"teacher {spec.model!r} is not a cross-encoder ({found}): set teacher.kind: embedding"
        )
    return path


def teacher_fingerprint(spec: TeacherSpec, root: DataRoot | None = None, devices: str = "auto") -> str:
    """What identifies the teacher's scores, without loading it (a cache hit never loads the model):
    kind, model folder fingerprint, max length and, for embedding teachers, the precision it runs in."""
    path = _checked_path(spec, root)
    fp = hash_obj({"kind": spec.kind, "model": model_fingerprint(path), "len": spec.max_seq_length}, 16)
    if spec.kind == "embedding":
        return f"{fp}-{resolve_precision(spec.precision, resolve_devices(devices)[0])}"
    return fp


def load_teacher(spec: TeacherSpec, root: DataRoot | None = None, devices: str = "auto") -> Teacher:
    """Resolve and load the teacher; a missing model or the wrong kind is a one-line KalmError."""
    fp = teacher_fingerprint(spec, root, devices)
    path = _checked_path(spec, root)
    if spec.kind == "embedding":
        enc = load_encoder(spec.model, root, spec.max_seq_length, spec.precision, devices)
        return Teacher("embedding", spec.model, path, fp, encoder=enc)
    from sentence_transformers import CrossEncoder

    try:
        cross = CrossEncoder(path, max_length=spec.max_seq_length, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise KalmError(f"cannot load cross-encoder {spec.model!r} from {path}: {line}") from None
    if cross.num_labels != 1:
        raise KalmError(f"teacher {spec.model!r} has {cross.num_labels} labels; a reranker has 1")
    return Teacher("cross_encoder", spec.model, path, fp, cross=cross)


def teacher_scores(
    teacher: Teacher, rows: dict[str, list[Any]], cfg: ScoreConfig, store: EmbeddingStore | None
) -> tuple[list[list[float]], list[list[float]], int]:
    """The teacher's scores of each row's query against its positives and its negatives, and how many
    texts the teacher encoded (embedding) or pairs it scored (cross-encoder)."""
    n = len(rows["query"])
    docs = [list(rows["pos"][r]) + list(rows["neg"][r]) for r in range(n)]
    if teacher.kind == "cross_encoder":
        import torch

        pairs = [(rows["query"][r], d) for r in range(n) for d in docs[r]]
        flat = teacher.cross.predict(
            pairs, batch_size=cfg.batch_size, activation_fn=torch.nn.Identity(), show_progress_bar=False
        )
        scores, done = np.asarray(flat, dtype=np.float32).reshape(-1), len(pairs)
    else:
        enc = teacher.encoder
        assert enc is not None and store is not None
        q_texts = [enc.format_query(rows["query"][r], rows["instruction"][r]) for r in range(n)]
        d_texts = [
            enc.format_query(d, rows["instruction"][r]) if rows["symmetric"][r] else d
            for r in range(n)
            for d in docs[r]
        ]
        vecs, stats = embed_texts(enc, q_texts + d_texts, store, batch_size=cfg.batch_size)
        q_vecs, d_vecs = vecs[:n], vecs[n:]
        owner = np.repeat(np.arange(n), [len(d) for d in docs])
        scores = np.einsum("ij,ij->i", q_vecs[owner], d_vecs).astype(np.float32)
        done = int(stats["encoded"])
    out_pos, out_neg, at = [], [], 0
    for r in range(n):
        k, m = len(rows["pos"][r]), len(rows["neg"][r])
        out_pos.append([float(x) for x in scores[at : at + k]])
        out_neg.append([float(x) for x in scores[at + k : at + k + m]])
        at += k + m
    return out_pos, out_neg, done


def filter_negatives(
    pos_scores: list[float], neg_scores: list[float], cfg: ScoreConfig
) -> tuple[list[int], dict[str, int]]:
    """Indices of the negatives the teacher keeps, and why the others went: ``no_score`` (NaN or missing),
    ``within_margin`` (above ``pos - absolute`` or ``pos - |pos| * relative``; ``pos`` the lowest finite
    positive score). No finite positive score: nothing is kept (the caller drops the row and counts its
    negatives as ``row_dropped``)."""
    why = dict.fromkeys(NEG_DROPS, 0)
    finite = [s for s in pos_scores if math.isfinite(s)]
    if not finite:
        return [], why
    pos = min(finite)
    ceiling = pos
    if cfg.margin.absolute is not None:
        ceiling = min(ceiling, pos - cfg.margin.absolute)
    if cfg.margin.relative is not None:
        ceiling = min(ceiling, pos - abs(pos) * cfg.margin.relative)
    keep = []
    for j, s in enumerate(neg_scores):
        if not math.isfinite(s):
            why["no_score"] += 1
        elif s > ceiling:
            why["within_margin"] += 1
        else:
            keep.append(j)
    return keep, why


def new_score_stats() -> dict[str, Any]:
    return {
        "rows_in": 0,
        "rows_kept": 0,
        "drops": {},
        "negatives_in": 0,
        "negatives_kept": 0,
        "negative_drops": dict.fromkeys(NEG_DROPS, 0),
        "teacher_work": 0,
        "pairs": 0,
    }


def merge_score_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    keys = ("rows_in", "rows_kept", "negatives_in", "negatives_kept", "teacher_work", "pairs")
    out = {k: a[k] + b[k] for k in keys}
    out["drops"] = {k: a["drops"].get(k, 0) + b["drops"].get(k, 0) for k in {*a["drops"], *b["drops"]}}
    out["negative_drops"] = {k: a["negative_drops"][k] + b["negative_drops"][k] for k in NEG_DROPS}
    return out


def score_chunk(
    chunk: pa.Table, teacher: Teacher, cfg: ScoreConfig, store: EmbeddingStore | None
) -> tuple[pa.Table, dict[str, Any]]:
    """Score one chunk of mined rows and filter its negatives -> (kept rows with scores, stats)."""
    names = ("query", "pos", "neg", "instruction", "symmetric", "neg_labels")
    rows = {c: chunk.column(c).to_pylist() for c in names}
    pos_s, neg_s, work = teacher_scores(teacher, rows, cfg, store)
    stats = new_score_stats()
    stats.update(rows_in=chunk.num_rows, teacher_work=work, pairs=sum(map(len, pos_s)) + sum(map(len, neg_s)))
    keep, negs, labels, p_out, n_out = [], [], [], [], []
    for r in range(chunk.num_rows):
        stats["negatives_in"] += len(rows["neg"][r])
        kept, why = filter_negatives(pos_s[r], neg_s[r], cfg)
        for k, v in why.items():
            stats["negative_drops"][k] += v
        reason = None
        if not any(math.isfinite(s) for s in pos_s[r]):
            reason = "no_positive_score"
        elif len(kept) < cfg.min_negatives:
            reason = "too_few_negatives"
        if reason is not None:
            stats["drops"][reason] = stats["drops"].get(reason, 0) + 1
            # the row's negatives the filter did not already drop go with it
            stats["negative_drops"]["row_dropped"] += len(rows["neg"][r]) - sum(why.values())
            continue
        labs = rows["neg_labels"][r] or []
        keep.append(r)
        negs.append([rows["neg"][r][j] for j in kept])
        labels.append([labs[j] for j in kept] if len(labs) == len(rows["neg"][r]) else [""] * len(kept))
        p_out.append(pos_s[r])
        n_out.append([neg_s[r][j] for j in kept])
        stats["negatives_kept"] += len(kept)
    stats["rows_kept"] = len(keep)
    out = chunk.take(pa.array(keep, pa.int64()))
    for name, values in (("neg", negs), ("neg_labels", labels)):
        field = SCORED_SCHEMA.field(name)
        out = out.set_column(out.schema.get_field_index(name), field, pa.array(values, field.type))
    for name, values in (("pos_scores", p_out), ("neg_scores", n_out)):
        field = SCORED_SCHEMA.field(name)
        out = out.append_column(field, pa.array(values, field.type))
    return out, stats


_TEACHERS: dict[tuple[Any, ...], Teacher] = {}  # per process: a teacher loads once for every recipe


def _teacher_for(cfg: ScoreConfig, root: DataRoot) -> Teacher:
    key = (cfg.teacher.model_dump_json(), cfg.devices, root.uri)
    if key not in _TEACHERS:
        _TEACHERS[key] = load_teacher(cfg.teacher, root, cfg.devices)
    return _TEACHERS[key]


def run_score_recipe(
    root: DataRoot,
    stage: str,
    recipe: str,
    cfg: ScoreConfig,
    force: bool = False,
    *,
    teacher: Teacher | None = None,
) -> StageResult:
    """Score one recipe's mined rows; the result's manifest is the scored folder's (``cached`` = hit)."""
    t_start = time.perf_counter()
    if stage not in STAGES:
        raise KalmError(f"invalid stage {stage!r} (allowed: {', '.join(STAGES)})")
    src = mined_dir(stage, recipe)
    m_in = read_manifest(root, src)
    if m_in is None:
        raise KalmError(f"{root.full_uri(src)} is missing or incomplete; mine {stage}/{recipe} first")
    fp = teacher.fingerprint if teacher is not None else teacher_fingerprint(cfg.teacher, root, cfg.devices)
    inputs = {"mined": src, "fingerprint": m_in.get("fingerprint"), "schema_version": SCHEMA_VERSION}
    input_fp, cfg_hash = hash_obj(inputs), cfg.config_hash()
    old = read_manifest(root, scored_dir(stage, recipe))
    if (
        not force
        and old is not None
        and (old.get("teacher") or {}).get("fingerprint") == fp
        and old.get("config_hash") == cfg_hash
        and old.get("input_fingerprint") == input_fp
    ):
        log.info("scored %s/%s: unchanged teacher, config and inputs: cache hit", stage, recipe)
        return _result(root, stage, recipe, old, True, t_start)
    job_id = hash_obj({"teacher": fp, "config": cfg_hash, "inputs": input_fp, "chunk": cfg.chunk_rows}, 12)
    work = f"{scored_work_dir(stage, recipe)}/{job_id}"
    table = read_rows(root, src)
    n = table.num_rows
    n_chunks, markers, pending = resume_state(root, work, n, cfg.chunk_rows, f"scored {stage}/{recipe}")
    t = teacher or _teacher_for(cfg, root)  # loaded only when something is left to score
    store = None
    if t.encoder is not None:
        where = embedding_cache_dir(t.encoder.key) if cfg.cache else f"{work}/embeddings"
        store = EmbeddingStore(root, where, t.encoder.dim)
    t0 = time.perf_counter()
    for i in pending:
        chunk = table.slice(i * cfg.chunk_rows, cfg.chunk_rows)
        out, stats = score_chunk(chunk, t, cfg, store)
        markers[i] = write_chunk(root, work, i, out, stats, None, schema=SCORED_SCHEMA)
    score_s = time.perf_counter() - t0
    stats = new_score_stats()
    for i in range(n_chunks):
        stats = merge_score_stats(stats, markers[i]["stats"])
    texts = sum(markers[i]["stats"]["teacher_work"] for i in pending)
    pairs = sum(markers[i]["stats"]["pairs"] for i in pending)
    manifest = {
        "recipe": recipe,
        "stage": stage,
        "category": m_in.get("category", ""),
        "task_type": m_in.get("task_type", ""),
        "rows_in": n,
        "rows_out": stats["rows_kept"],
        "drops": stats["drops"],
        "stats": stats,
        "teacher": t.lineage(),
        "miner": m_in.get("miner"),
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg_hash,
        "inputs": inputs,
        "input_fingerprint": input_fp,
        "job": job_id,
        "chunks": {"total": n_chunks, "resumed": n_chunks - len(pending), "computed": len(pending)},
        "cost": {
            "score_s": round(score_s, 3),
            "units": "texts encoded" if t.kind == "embedding" else "pairs scored",
            "teacher_work": texts,
            "per_s": round(texts / score_s, 1) if texts and score_s > 0 else None,
            "pairs": pairs,  # (query, document) scores computed, cache hits included
            "pairs_per_s": round(pairs / score_s, 1) if pairs and score_s > 0 else None,
        },
        "schema_version": SCHEMA_VERSION,
    }
    publish(
        root,
        scored_dir(stage, recipe),
        scored_work_dir(stage, recipe),
        work,
        markers,
        n_chunks,
        manifest,
        {},
        t_start,
    )
    log.info(
        "scored %s/%s: %d -> %d rows, %d -> %d negatives (dropped %s), rows dropped %s, %.1fs",
        stage,
        recipe,
        n,
        stats["rows_kept"],
        stats["negatives_in"],
        stats["negatives_kept"],
        stats["negative_drops"],
        stats["drops"],
        manifest["timing"]["total_s"],
    )
    return _result(root, stage, recipe, manifest, False, t_start)


def run_score_stage(
    root: DataRoot, stage: str, cfg: ScoreConfig, recipes: list[str] | None = None, force: bool = False
) -> list[StageResult]:
    """Score every mined recipe of ``stage`` (or only ``recipes``); the teacher loads once, and only if a
    recipe is not a cache hit."""
    names = [n for n in root.list_dirs(mined_root(stage)) if not n.startswith("_")]
    unknown = sorted(set(recipes or []) - set(names))
    if unknown:
        raise KalmError(f"no mined rows for {unknown} in {root.full_uri(mined_root(stage))}; mine them first")
    chosen = recipes or names
    if not chosen:
        raise KalmError(f"nothing to score: {root.full_uri(mined_root(stage))} has no mined recipes")
    return [run_score_recipe(root, stage, n, cfg, force) for n in chosen]


def _result(
    root: DataRoot, stage: str, recipe: str, m: dict[str, Any], cached: bool, t0: float
) -> StageResult:
    return folder_result(root, "score", recipe, scored_dir(stage, recipe), m, cached, t0, "teacher")


def report_markdown(results: list[StageResult], title: str = "Teacher scores") -> str:
    """Per recipe: rows in/out, negatives in/out, why negatives and rows were dropped, cost, cache hit."""
    lines = [
        f"# {title}",
        "",
        "| recipe | rows in | rows out | negatives in | kept | within margin | no score | rows dropped | "
        "teacher work/s | pairs/s | cached |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in results:
        s, cost = r.manifest.get("stats", {}), r.manifest.get("cost", {})
        nd = s.get("negative_drops", {})
        drops = ", ".join(f"{k} {v}" for k, v in sorted(s.get("drops", {}).items())) or "-"
        rate, pairs = cost.get("per_s"), cost.get("pairs_per_s")
        lines.append(
            f"| {r.name} | {s.get('rows_in', 0)} | {s.get('rows_kept', 0)} | {s.get('negatives_in', 0)} | "
            f"{s.get('negatives_kept', 0)} | {nd.get('within_margin', 0)} | {nd.get('no_score', 0)} | "
            f"{drops} | {rate if rate is not None else '-'} | {pairs if pairs is not None else '-'} | "
            f"{'yes' if r.cached else 'no'} |"
        )
    if results:
        t = results[0].manifest.get("teacher", {})
        lines += ["", f"Teacher: {t.get('kind')} `{t.get('model')}` (fingerprint {t.get('fingerprint')})."]
    return "\n".join(lines) + "\n"
