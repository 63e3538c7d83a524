"""Hard-negative mining of a stage's mixtures: ``mixtures/<stage>/<recipe>/`` -> ``mined/<stage>/<recipe>/``.

Per recipe: build the candidate pool (the recipe's own positives and negatives, or a corpus plus the
positives), encode pool and queries through the embedding cache, index the pool, then work through the
queries in chunks (search, filter, sample) and publish the rows that kept negatives, same schema, ``neg``
filled. Chunks are resumable (:mod:`kalm.mining.chunks`): a rerun after a crash (even ``kill -9``) skips
finished chunks and produces the same bytes.

>>> cfg = load_mine_config()                                                   # doctest: +SKIP
>>> run_mine_recipe(DataRoot.from_uri("./data"), "finetune", "faq_demo", "minilm", cfg).rows
412
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from kalm.core.errors import KalmError
from kalm.core.hashing import hash_obj
from kalm.core.layout import (
    MANIFEST,
    embedding_cache_dir,
    mined_dir,
    mined_root,
    mined_work_dir,
    mixture_dir,
    mixture_root,
)
from kalm.core.results import StageResult
from kalm.core.schema import SCHEMA_VERSION, STAGES
from kalm.core.storage import DataRoot, read_manifest, read_rows
from kalm.data.executors import Executor, make_executor
from kalm.mining.cache import EmbeddingStore, embed_texts
from kalm.mining.chunks import folder_result, pre_drops, publish, resume_state, with_negatives, write_chunk
from kalm.mining.config import MineConfig
from kalm.mining.encode import Encoder, load_encoder, show_progress
from kalm.mining.pool import Keys, Pool, build_pool, corpus_lineage, corpus_texts, most_common, pool_labels
from kalm.mining.report import summary
from kalm.mining.sample import (
    ChunkCandidates,
    Window,
    effective_window,
    merge_stats,
    new_stats,
    norm_key,
    row_seeds,
    sample_negatives,
)
from kalm.mining.search import BlockSearch, block_rows, pair_scores, search_blocks, search_sharded
from kalm.mining.texts import Concat

log = logging.getLogger(__name__)


@dataclass
class MineJob:
    """One recipe's mining job after encoding: everything a chunk needs, so a chunk is one method call.

    ``cols``: the mixture's columns as lists; ``own_pos[r]``: pool ids of row r's positives; ``group``:
    normalised query -> pool ids of every positive any row with that query has (never a negative for it);
    ``q_row``: row -> index into ``q_vecs`` (rows without a query or positive are not encoded).
    ``labels``: class names by id; ``row_label[r]`` the row's class id and ``pool_label[t]`` each pool
    text's (-1: none; classification/clustering rows have one, and never get a same-class negative).
    """

    root: DataRoot
    work: str
    cfg: MineConfig
    table: pa.Table
    cols: dict[str, list[Any]]
    pool: Pool
    keys: Keys
    own_pos: list[list[int]]
    group: dict[str, set[int]]
    qnorm: list[str]
    window: Window | None
    labels: list[str] = field(default_factory=list)
    row_label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pool_label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pool_vecs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # memmaps
    q_vecs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    q_row: dict[int, int] = field(default_factory=dict)
    found: BlockSearch | None = None  # the current pass's top-k, rows from ``first``
    pos_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    first: int = 0
    vectors: str = ""  # the vector file (pool rows, then queries)
    timing: dict[str, float] = field(
        default_factory=lambda: {"encode_s": 0.0, "search_s": 0.0, "sample_s": 0.0}
    )

    def _source_negatives(self, r: int) -> tuple[list[str], list[int]]:
        """Row r's own (non-empty) negatives and their class ids (-1 unknown)."""
        negs, labs = self.cols["neg"][r], self.cols["neg_labels"][r] or []
        aligned = len(labs) == len(negs)
        keep = [j for j, t in enumerate(negs) if isinstance(t, str) and t.strip()]
        return [negs[j] for j in keep], [self._label_id(labs[j]) if aligned else -1 for j in keep]

    def _label_id(self, name: str | None) -> int:
        return self.labels.index(name) if name and name in self.labels else -1

    def rows_of(self, i: int) -> range:
        q = self.cfg.chunk_queries
        return range(i * q, min(self.table.num_rows, (i + 1) * q))

    def drop_chunk(self, i: int, reason: str) -> dict[str, Any]:
        """A chunk whose minable rows are all dropped for one ``reason`` (no search needed)."""
        rows = self.rows_of(i)
        ok, stats = pre_drops(self.cols, self.own_pos, rows)
        if ok:
            stats["drops"][reason] = len(ok)
        return write_chunk(self.root, self.work, i, self.table.slice(rows.start, 0), stats, None)

    def passes(self, pending: list[int]) -> list[list[int]]:
        """Pending chunks in runs of consecutive encoded queries, at most ``search.pass_queries`` each."""
        out: list[list[int]] = []
        size = 0
        for i in pending:
            n = sum(1 for r in self.rows_of(i) if r in self.q_row)
            if not out or size + n > self.cfg.search.pass_queries:
                out.append([])
                size = 0
            out[-1].append(i)
            size += n
        return out

    def search(self, chunks: list[int], executor: Executor | None = None) -> None:
        """Top-k over the whole pool (block by block; over the executor's workers when it has several) for
        the encoded queries of ``chunks``, and each query's lowest positive score: both held for
        :meth:`mine_chunk` until the next pass."""
        assert self.window is not None
        t0 = time.perf_counter()
        todo = [r for i in chunks for r in self.rows_of(i) if r in self.q_row]
        self.first = self.q_row[todo[0]] if todo else 0
        queries = self.q_vecs[self.first : self.first + len(todo)]  # consecutive: a view, not a copy
        spec = self.cfg.search
        rows = block_rows(self.pool_vecs.shape[1], spec.block_mb, len(self.pool_vecs))
        depth = self.window.depth
        size = len(self.pool_vecs)
        if executor is not None and executor.workers > 1 and size > rows and self.cfg.index.type == "flat":
            where = (self.first, len(todo))
            self.found = search_sharded(executor, self.vectors, size, where, depth, self.cfg.index, rows)
        else:
            self.found = search_blocks(self.pool_vecs, queries, depth, self.cfg.index, spec.query_batch, rows)
        q_idx = np.array([j for j, r in enumerate(todo) for _ in self.own_pos[r]], dtype=np.int64)
        p_idx = np.array([p for r in todo for p in self.own_pos[r]], dtype=np.int64)
        pairs = pair_scores(self.pool_vecs, queries, q_idx, p_idx, rows)
        self.pos_score = np.full(len(todo), np.inf, dtype=np.float32)
        np.minimum.at(self.pos_score, q_idx, pairs)
        self.timing["search_s"] = round(self.timing["search_s"] + time.perf_counter() - t0, 3)

    def mine_chunk(self, i: int) -> dict[str, Any]:
        """Filter and sample one chunk of queries (searched by :meth:`search`); write its rows and marker."""
        assert self.found is not None and self.window is not None
        rows = self.rows_of(i)
        ok, stats = pre_drops(self.cols, self.own_pos, rows)
        t0 = time.perf_counter()
        at = np.array([self.q_row[r] - self.first for r in ok], dtype=np.int64)
        scores, ids, pos_score = self.found.scores[at], self.found.ids[at], self.pos_score[at]
        group_pos = [sorted(self.group[self.qnorm[r]]) for r in ok]
        src_negs, src_labels = zip(*(self._source_negatives(r) for r in ok), strict=False) if ok else ((), ())
        cand = ChunkCandidates(
            ids=ids,
            scores=scores,
            own_pos=[self.own_pos[r] for r in ok],
            group_pos=group_pos,
            group_pos_keys=[sorted({int(self.pool.keys[p]) for p in g}) for g in group_pos],
            query_key=np.array([self.keys(self.cols["query"][r]) for r in ok], dtype=np.int64),
            pos_score=pos_score,
            seeds=row_seeds(self.cfg.seed, [self.cols["id"][r] for r in ok]),
            source_negs=list(src_negs),
            source_neg_keys=[[self.keys(t) for t in negs] for negs in src_negs],
            query_label=self.row_label[ok] if ok else np.zeros(0, np.int64),
            source_neg_labels=[list(labs) for labs in src_labels],
        )
        picks, st = sample_negatives(cand, self.pool.keys, self.window, self.cfg, self.pool_label)
        stats = merge_stats(stats, {**st, "rows_in": 0})
        keep, negs, neg_labels = [], [], []
        wanted = sorted({x for pick in picks if pick is not None for x in pick if x >= 0})
        text_of = dict(zip(wanted, self.pool.texts(wanted), strict=True))  # one read of the pool file
        for j, (r, pick) in enumerate(zip(ok, picks, strict=True)):
            if pick is None:
                continue
            keep.append(r - rows.start)
            texts = [text_of[x] if x >= 0 else src_negs[j][-x - 1] for x in pick]
            labs = [int(self.pool_label[x]) if x >= 0 else src_labels[j][-x - 1] for x in pick]
            negs.append(texts)
            neg_labels.append([self.labels[x] if x >= 0 else "" for x in labs])
        chunk = self.table.slice(rows.start, len(rows))
        out = with_negatives(chunk, keep, negs, neg_labels)
        self.timing["sample_s"] = round(self.timing["sample_s"] + time.perf_counter() - t0, 3)
        return write_chunk(self.root, self.work, i, out, stats, self.found.lineage)


def _result(
    root: DataRoot, stage: str, recipe: str, m: dict[str, Any], cached: bool, t0: float
) -> StageResult:
    return folder_result(root, "mine", recipe, mined_dir(stage, recipe), m, cached, t0, "miner")


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
    executor: Executor | None = None,
) -> StageResult:
    """Mine one recipe's mixture; the result's manifest is the mined folder's (``cached`` = cache hit).

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
    use_corpus = cfg.pool.source == "corpus"
    corpus = corpus_lineage(root, cfg.pool) if use_corpus else None
    inputs = {
        "mixture": {
            "path": src,
            "input_fingerprint": m_in.get("input_fingerprint"),
            "files": m_in.get("files", []),
            "rows_out": m_in.get("rows_out"),
        },
        "corpus": corpus,
        "schema_version": SCHEMA_VERSION,
        "query_template": enc.embedder.query_template,  # None: bare queries (an un-instructed model)
    }
    input_fp = hash_obj(inputs)
    cfg_hash = cfg.config_hash()
    old = read_manifest(root, mined_dir(stage, recipe))
    if (
        not force
        and old is not None
        and old.get("miner", {}).get("fingerprint") == enc.fingerprint
        and old.get("miner", {}).get("precision") == enc.precision
        and old.get("config_hash") == cfg_hash
        and old.get("input_fingerprint") == input_fp
    ):
        log.info("mined %s/%s: unchanged model, config and inputs: cache hit", stage, recipe)
        return _result(root, stage, recipe, old, True, t_start)

    job_id = hash_obj(
        {"miner": enc.key, "config": cfg_hash, "inputs": input_fp, "chunk": cfg.chunk_queries}, 12
    )
    # the pool's texts and all vectors live in local files (a memory map each) in one scratch folder
    # that lasts until the chunks are written: host memory holds a batch of texts, a cache shard, a
    # search block and a pass's top-k, plus a few integers per pool text and the recipe's rows
    with tempfile.TemporaryDirectory(prefix="kalm-mine-", dir=cfg.search.scratch_dir) as scratch:
        work = f"{mined_work_dir(stage, recipe)}/{job_id}"
        job = _prepare(root, work, src, cfg, enc, use_corpus, stage, recipe, scratch)
        n = job.table.num_rows
        n_chunks, markers, pending = resume_state(root, work, n, cfg.chunk_queries, f"mined {stage}/{recipe}")
        enc_stats: dict[str, Any] = {"texts": 0, "unique": 0, "cache_hits": 0, "encoded": 0}
        enc_stats.update(corrupt_entries=0, corrupt_shards=0)
        if pending and job.window is not None:
            if store is None or not cfg.cache:
                where = embedding_cache_dir(enc.key) if cfg.cache else f"{job.work}/embeddings"
                store = EmbeddingStore(root, where, enc.dim)
            own = executor is None and cfg.executor.kind != "single"
            with make_executor(cfg.executor) if own else contextlib.nullcontext(executor) as ex:
                enc_stats = _encode(job, enc, store, pending, recipe, ex, scratch)
                bar = _bar(len(pending), f"mine {recipe}") if show_progress() else None
                for group in job.passes(pending):
                    job.search(group, ex)
                    for i in group:
                        markers[i] = job.mine_chunk(i)
                        if bar is not None:
                            bar.update(1)
                if bar is not None:
                    bar.close()
                job.pool_vecs = job.q_vecs = np.zeros((0, 0), np.float32)  # the files' last references
        elif pending:  # window is None: pool smaller than the window and small_pool: drop
            for i in pending:
                markers[i] = job.drop_chunk(i, "pool_smaller_than_window")
        pool_lineage = job.pool.lineage

    stats = new_stats()
    for i in range(n_chunks):
        stats = merge_stats(stats, markers[i]["stats"])
    index_lineage = next((markers[i].get("index") for i in range(n_chunks) if markers[i].get("index")), None)
    manifest = {
        "recipe": recipe,
        "stage": stage,
        "category": most_common(job.table.column("category").to_pylist(), ""),
        "task_type": most_common(job.table.column("task_type").to_pylist(), ""),
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
        "effective": job.window.lineage() if job.window is not None else None,
        "pool": {**pool_lineage, "corpus": corpus},
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg_hash,
        "inputs": inputs,
        "input_fingerprint": input_fp,
        "job": job_id,
        "encode": enc_stats,
        "chunks": {
            "total": n_chunks,
            "resumed": n_chunks - len(pending),
            "computed": len(pending),
            "chunk_queries": cfg.chunk_queries,
        },
        "schema_version": SCHEMA_VERSION,
    }
    out, work_root = mined_dir(stage, recipe), mined_work_dir(stage, recipe)
    publish(root, out, work_root, job.work, markers, n_chunks, manifest, job.timing, t_start)
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
    return _result(root, stage, recipe, manifest, False, t_start)


def _prepare(
    root: DataRoot,
    work: str,
    src: str,
    cfg: MineConfig,
    enc: Encoder,
    use_corpus: bool,
    stage: str,
    recipe: str,
    scratch: str,
) -> MineJob:
    """Read the mixture, build the pool (its texts into ``scratch``) and the per-row facts."""
    table = read_rows(root, src)
    names = ("id", "query", "pos", "neg", "instruction", "symmetric", "label", "neg_labels")
    cols = {c: table.column(c).to_pylist() for c in names}
    n = table.num_rows
    keys = Keys()
    symmetric = bool(most_common(cols["symmetric"], False))
    doc_instruction = most_common(cols["instruction"], None) if symmetric else None
    corpus = corpus_texts(root, cfg.pool) if use_corpus else None
    name = f"{cfg.pool.corpus} (field {cfg.pool.text_field!r})"
    pool = build_pool(cols, corpus, doc_instruction, enc, scratch, name)
    if n and not len(pool):
        raise KalmError(f"{src}: empty candidate pool (no non-empty positives or negatives to mine from)")
    window = effective_window(cfg.window, cfg.top_k, len(pool), cfg.small_pool) if n else None
    if window is not None and window.scaled:
        log.warning(
            "mined %s/%s: pool of %d texts is smaller than window %s: scaled to ranks [%d, %d), top-k %d",
            stage,
            recipe,
            len(pool),
            list(cfg.window),
            window.lo,
            window.hi,
            window.top_k,
        )
    own_pos: list[list[int]] = []
    group: dict[str, set[int]] = {}
    qnorm: list[str] = []
    flat = [p for pos in cols["pos"] for p in pos if isinstance(p, str) and p.strip()]
    flat_ids = pool.ids_of(flat).tolist()  # every such positive is in the pool (both pool sources add them)
    at = 0
    for q, pos in zip(cols["query"], cols["pos"], strict=True):
        k = sum(1 for p in pos if isinstance(p, str) and p.strip())
        ids = list(dict.fromkeys(flat_ids[at : at + k]))
        at += k
        own_pos.append(ids)
        nq = norm_key(q)
        qnorm.append(nq)
        group.setdefault(nq, set()).update(ids)
    labels, row_label, pool_label = pool_labels(cols, pool)
    if len(labels):
        log.info(
            "mined %s/%s: %d classes: no negative of a query's own class is taken", stage, recipe, len(labels)
        )
    return MineJob(
        root, work, cfg, table, cols, pool, keys, own_pos, group, qnorm, window, labels, row_label, pool_label
    )


def _encode(
    job: MineJob,
    enc: Encoder,
    store: EmbeddingStore,
    pending: list[int],
    recipe: str,
    executor: Executor | None,
    scratch: str,
) -> dict[str, Any]:
    """Embed the pool and the pending chunks' minable queries (through the cache) into ``scratch/vectors.npy``
    (a memmap: pool rows first, then the queries)."""
    todo = [r for i in pending for r in job.rows_of(i) if job.cols["query"][r].strip() and job.own_pos[r]]
    q_texts = [enc.format_query(job.cols["query"][r], job.cols["instruction"][r]) for r in todo]
    texts = Concat([job.pool.formatted, q_texts])
    job.vectors = f"{scratch}/vectors.npy"
    out = np.lib.format.open_memmap(job.vectors, mode="w+", dtype=np.float32, shape=(len(texts), enc.dim))
    vecs, enc_stats = embed_texts(
        enc,
        texts,
        store,
        batch_size=job.cfg.batch_size,
        shard_texts=job.cfg.cache_shard_texts,
        progress=show_progress(),
        desc=f"encode {recipe}",
        executor=executor,
        out=out,
    )
    out.flush()  # search workers read the file (other processes; other nodes on a shared folder)
    job.timing["encode_s"] = enc_stats["encode_s"]
    job.pool_vecs = vecs[: len(job.pool)]
    job.q_vecs = vecs[len(job.pool) :]
    job.q_row = {r: j for j, r in enumerate(todo)}
    return enc_stats


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
) -> list[StageResult]:
    """Mine every recipe with a mixture under ``mixtures/<stage>/`` (or ``recipes``), loading the model once.

    Also writes ``mined/<stage>/_manifest.json``: one summary line per recipe.
    """
    if stage not in STAGES:
        raise KalmError(f"invalid stage {stage!r} (allowed: {', '.join(STAGES)})")
    available = [n for n in root.list_dirs(mixture_root(stage)) if read_manifest(root, mixture_dir(stage, n))]
    names = list(dict.fromkeys(recipes)) if recipes else available
    missing = [n for n in names if n not in available]
    if missing:
        raise KalmError(
            f"no finished mixture for {', '.join(missing)} under {root.full_uri(mixture_root(stage))} "
            f"(available: {', '.join(available) or 'none'})"
        )
    if not names:
        raise KalmError(
            f"no mixtures under {root.full_uri(mixture_root(stage))}; build the {stage} mixtures first"
        )
    t0 = time.perf_counter()
    enc = encoder or load_encoder(model, root, cfg.max_seq_length, cfg.precision, cfg.devices)
    store = EmbeddingStore(root, embedding_cache_dir(enc.key), enc.dim) if cfg.cache else None
    # one pool of encode workers (each loads the model once) for every recipe
    with make_executor(cfg.executor) if cfg.executor.kind != "single" else contextlib.nullcontext() as ex:
        results = [
            run_mine_recipe(root, stage, n, model, cfg, force, encoder=enc, store=store, executor=ex)
            for n in names
        ]
    report = {
        "stage": stage,
        "miner": enc.lineage(),
        "config_hash": cfg.config_hash(),
        "recipes": {r.name: summary(r) for r in results},
        "rows_out": sum(r.rows or 0 for r in results),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    root.write_json(f"{mined_root(stage)}/{MANIFEST}", report)
    return results
