"""Benchmark of the mining stage (issue #5): our miner against sentence-transformers' and FlagEmbedding's.

On the same corpus, model, window, threads and batch, in one run on CPU, each contender in a fresh
subprocess with the model loaded before the clock starts::

    .venv/bin/python bench/bench_mining.py            # defaults: a few minutes on 2 cores
    .venv/bin/python bench/bench_mining.py --quick    # smoke run (< 1 minute)
    .venv/bin/python bench/bench_mining.py --only ours,st --queries 1500 --corpus 3000

Contenders (wall time of one mining run, model already loaded; everything else inside the clock):

- ``ours``: ``kalm.mining.mine.run_mine_recipe`` as ``kalm mine`` runs it, default precision (``auto``:
  bf16 where the CPU has native bf16, else fp32; the line says which), on a fresh data root with an empty
  embedding cache (**cold**): read the mixture Parquet and the corpus, hash and look up every text in the
  cache, encode the misses (sorted by token count), write cache shards, FAISS ``IndexFlatIP``, search, filters
  (ranking consistency top-k, positives, query, duplicates), seeded sampling, chunk files + markers,
  publish Parquet + manifest. Then the same call again with ``force=True`` (**warm**): the mined output is
  redone, every embedding comes from the on-disk cache;
- ``ours-fp32``: the same, cold, with ``precision: fp32``: like for like with the peers' float32;
- ``st``: ``sentence_transformers.util.mine_hard_negatives`` (fp32) on a ``datasets.Dataset`` of
  (query, positive) built before the clock, ``corpus`` = the same corpus, ``range_min``/``range_max`` =
  the window, ``num_negatives`` = M, ``sampling_strategy="random"`` (ours samples uniformly too),
  ``query_prompt`` = what our miner puts before a query (none for all-MiniLM-L6-v2, which is mined on bare
  queries: it has no instructions of its own), so the model sees the very same query strings,
  ``use_faiss=True`` (exact ``IndexFlatIP``, as ours), ``output_format="n-tuple"``, ``verbose=False``,
  ``cache_folder`` set: the cold run also saves its two ``.npy`` embedding files, and the same call again
  (**warm**) loads them (ST's cache is keyed by a hash of the whole query list and of the whole corpus:
  any changed text re-encodes everything; ours is per text). Its result stays in memory (ours and
  FlagEmbedding's write files);
- ``fe``: FlagEmbedding's miner ``find_knn_neg`` (``FlagEmbedding.baai_general_embedding.finetune.hn_mine``,
  FlagEmbedding 1.2.11: the last release that ships its miner inside the pip package; 1.3+ moved it to a
  script outside the package). It reads a JSONL of {query, pos, neg}, ``candidate_pool`` = the same corpus
  plus the positives (it does not add them itself), ``range_for_sampling`` = the window, writes a JSONL.
  ``FlagModel`` with mean pooling (MiniLM's), fp32 (its CPU default), the query instruction prefix;
  its hard-coded ``batch_size=256`` and ``max_length=512`` are set to this run's batch and max length
  (a subclass of ``FlagModel`` that also records the embeddings for the overlap below). FlagEmbedding
  1.2.11's package ``__init__`` does not import under transformers 5 (``Optional`` is no longer
  re-exported by ``from transformers.trainer import *``); the child defines ``builtins.Optional`` first.
  FlagEmbedding is not a dependency of this project: install it outside the venv, e.g.
  ``.venv/bin/pip install --target /tmp/fe FlagEmbedding==1.2.11 peft --no-deps`` and pass
  ``--flagembedding /tmp/fe`` (the default); where it does not import, the run says so and skips it.

Window semantics (all 0-based): ours and FlagEmbedding sample from ranks ``[lo, hi)`` of the full
ranking and skip positives and the query inside it; sentence-transformers removes the positives from the
ranking first and then takes ``[range_min, range_max)``, so with one positive ranked above the window its
window sits one rank lower. Only ours drops rows whose positive ranks ``>= top_k`` (ranking consistency);
the peers keep every row, so ours writes fewer rows.

Encode throughput (texts/s): ``Encoder.encode`` (token lengths included) against
``SentenceTransformer.encode`` (``normalize_embeddings=True``) on the same formatted texts (queries with the
instruction, bare passages), same batch and max length, in one child, interleaved over ``--encode-repeats``
rounds (median). Ours at its default precision and at fp32, ST at fp32. The mining lines also show each
miner's encode rate inside its run (ours: ``embed_texts``, i.e. with hashing and cache writes; ST and
FlagEmbedding: their ``encode`` calls, timed by a wrapper).

Overlap: per query kept by both, each contender's candidate window (the texts its own ranking puts in the
window, by its own semantics, positives and the query left out) and its chosen negatives. Printed: the
Jaccard of the windows, the share of a peer's negatives that fall in our window (and ours in its window),
and the Jaccard of the negative sets next to what two independent uniform draws of M from a window of
the same size would give (both sample at random, so high negative overlap is not expected).

Corpus: Python standard-library docstrings read with ``ast`` (no imports): a query is a docstring's first
paragraph, its positive the rest of that docstring (at most 200 words); the corpus is paragraphs of other
docstrings. Task: retrieval (instruction on queries only). The mixture is written directly as the stage
writes it (Parquet with the row schema plus manifest), so every contender gets byte-identical texts.
No GPU was used: device ``cpu`` for every contender; ``--threads`` torch/OMP/FAISS threads for all.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGE, RECIPE = "finetune", "bench"
INSTRUCTION = "Given a summary of a Python API, retrieve the documentation that explains it"
CONTENDERS = ("ours", "ours-fp32", "st", "fe")
SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "pydoc_data",
    "__pycache__",
    "distutils",
}
MAX_POS_WORDS = 200
FE_SHIM = "import builtins, typing\nbuiltins.Optional = typing.Optional\n"
FE_MODULE = "FlagEmbedding.baai_general_embedding.finetune.hn_mine"


# ---------------------------------------------------------------------------------------------- data
def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def stdlib_docstrings() -> list[str]:
    """Every module, class and function docstring of the standard library's sources, in a fixed order."""
    from kalm.data.readers import module_docstrings

    lib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for f in sorted(lib.rglob("*.py")):
        if set(f.relative_to(lib).parts) & SKIP_DIRS or f.parent.name.startswith("config-"):
            continue
        try:
            docs += module_docstrings(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
    return docs


def make_corpus(n_queries: int, n_corpus: int, seed: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(query, positive) pairs and corpus passages; no corpus passage comes from a docstring of a pair."""
    docs = list(dict.fromkeys(stdlib_docstrings()))
    pairs: dict[str, tuple[int, str]] = {}
    used_pos: set[str] = set()
    for i, doc in enumerate(docs):
        parts = [p for p in (_clean(x) for x in doc.split("\n\n")) if p]
        if len(parts) < 2:
            continue
        query, body = parts[0], " ".join(" ".join(parts[1:]).split(" ")[:MAX_POS_WORDS])
        if not 4 <= len(query.split()) <= 40 or len(body.split()) < 12 or query in pairs or body in used_pos:
            continue
        pairs[query] = (i, body)
        used_pos.add(body)
    rng = random.Random(seed)
    chosen = rng.sample(sorted(pairs), min(n_queries, len(pairs)))
    taken = {pairs[q][0] for q in chosen}
    passages: dict[str, None] = {}
    for i, doc in enumerate(docs):
        if i in taken:
            continue
        for p in (_clean(x) for x in doc.split("\n\n")):
            if 12 <= len(p.split()) <= MAX_POS_WORDS and p not in used_pos and p not in pairs:
                passages[p] = None
    corpus = rng.sample(sorted(passages), min(n_corpus, len(passages)))
    return [(q, pairs[q][1]) for q in chosen], corpus


def build_inputs(work: Path, pairs: list[tuple[str, str]], corpus: list[str]) -> dict[str, Any]:
    """A data root holding the mixture ``mixtures/finetune/bench`` (as the stage writes it) + the corpus."""
    from kalm.core.hashing import hash_obj
    from kalm.core.layout import MANIFEST, mixture_dir
    from kalm.core.schema import row_id, rows_to_table
    from kalm.core.storage import DataRoot

    rows = [
        {
            "id": row_id(q, p),
            "query": q,
            "pos": [p],
            "neg": [],
            "instruction": INSTRUCTION,
            "symmetric": False,
            "category": "bench",
            "task_type": "retrieval",
            "recipe": RECIPE,
            "stage": STAGE,
            "lang": "en",
        }
        for q, p in pairs
    ]
    base = work / "base"
    root = DataRoot.from_uri(str(base))
    rel = mixture_dir(STAGE, RECIPE)
    root.write_parquet(f"{rel}/part-00000.parquet", rows_to_table(rows))
    root.write_json(
        f"{rel}/{MANIFEST}",
        {
            "recipe": RECIPE,
            "stage": STAGE,
            "rows_in": len(rows),
            "rows_out": len(rows),
            "drops": {},
            "files": [{"name": "part-00000.parquet", "rows": len(rows)}],
            "input_fingerprint": hash_obj(rows),
            "schema_version": 1,
        },
    )
    corpus_path = work / "corpus.jsonl"
    with corpus_path.open("w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in corpus)
    fe_input = work / "fe_input.jsonl"
    with fe_input.open("w") as f:
        f.writelines(json.dumps({"query": q, "pos": [p], "neg": []}) + "\n" for q, p in pairs)
    (work / "pairs.json").write_text(json.dumps(pairs))
    return {"base": str(base), "corpus_path": str(corpus_path), "fe_input": str(fe_input)}


# --------------------------------------------------------------------------------------------- child
def text_id(text: str) -> str:
    import hashlib

    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def rank(pool_vecs: Any, query_vecs: Any, k: int, threads: int) -> Any:
    """Exact inner-product ranking (FAISS ``IndexFlatIP``): ids (n, k)."""
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(pool_vecs.shape[1])
    index.add(np.ascontiguousarray(pool_vecs, dtype=np.float32))
    return index.search(np.ascontiguousarray(query_vecs, dtype=np.float32), min(k, len(pool_vecs)))[1]


def full_rank_window(
    ids: Sequence[int], pool: list[str], lo: int, hi: int, query: str, pos: str
) -> list[str]:
    """Ours and FlagEmbedding: ranks [lo, hi) of the full ranking, the positive and the query left out."""
    return [text_id(pool[i]) for i in ids[lo:hi] if i >= 0 and pool[i] != pos and pool[i] != query]


def prefix() -> str:
    """What our miner puts before a query, as a plain prefix: the string ST's ``query_prompt`` and
    FlagEmbedding prepend. Empty for all-MiniLM-L6-v2: a model without instructions of its own is mined on
    bare queries (``model.instructions: auto``), so the peers get bare queries too."""
    from kalm.training.config import resolve_model_path
    from kalm.training.instructions import DEFAULT_QUERY_TEMPLATE, format_query, prompt_prefix
    from kalm.training.model import uses_instructions

    if not uses_instructions(resolve_model_path("minilm", None)):
        return ""
    pre = prompt_prefix(INSTRUCTION, DEFAULT_QUERY_TEMPLATE)
    assert pre + "q?" == format_query("q?", INSTRUCTION, DEFAULT_QUERY_TEMPLATE)
    return pre


def child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    from kalm.core.layout import embedding_cache_dir, mined_dir
    from kalm.core.storage import DataRoot, read_rows
    from kalm.mining.cache import EmbeddingStore, embed_texts
    from kalm.mining.config import MineConfig, PoolSpec
    from kalm.mining.encode import load_encoder
    from kalm.mining.mine import run_mine_recipe

    lo, hi = spec["window"]
    data = Path(spec["work"]) / f"{spec['name']}-{spec['round']}"
    shutil.copytree(spec["base"], data)  # a fresh data root: mixture only, empty embedding cache
    root = DataRoot.from_uri(str(data))
    cfg = MineConfig(
        window=(lo, hi),
        num_negatives=spec["m"],
        top_k=spec["top_k"],
        precision=spec["precision"],
        max_seq_length=spec["max_length"],
        batch_size=spec["batch"],
        devices="cpu",
        pool=PoolSpec(source="corpus", corpus=spec["corpus_path"]),
    )
    enc = load_encoder("minilm", root, cfg.max_seq_length, cfg.precision, cfg.devices)
    t0 = time.perf_counter()
    cold = run_mine_recipe(root, STAGE, RECIPE, "minilm", cfg, encoder=enc).manifest
    cold_s = time.perf_counter() - t0
    warm_s, warm = None, None
    if spec["warm"]:
        t0 = time.perf_counter()
        warm = run_mine_recipe(root, STAGE, RECIPE, "minilm", cfg, force=True, encoder=enc).manifest
        warm_s = time.perf_counter() - t0
    # Untimed: our windows, from the cached vectors (the pool as build_pool makes it: corpus, then positives).
    pairs = [tuple(p) for p in json.loads((Path(spec["work"]) / "pairs.json").read_text())]
    corpus = [json.loads(line)["text"] for line in Path(spec["corpus_path"]).read_text().splitlines()]
    pool = list(dict.fromkeys([*corpus, *(p for _, p in pairs)]))
    queries = [enc.format_query(q, INSTRUCTION) for q, _ in pairs]
    store = EmbeddingStore(root, embedding_cache_dir(enc.key), enc.dim)
    vecs, st = embed_texts(enc, pool + queries, store, batch_size=cfg.batch_size)
    assert st["encoded"] == 0, st
    ids = rank(vecs[: len(pool)], vecs[len(pool) :], hi, spec["threads"])
    mined = read_rows(root, mined_dir(STAGE, RECIPE), columns=["query", "neg"]).to_pylist()
    negs = {r["query"]: r["neg"] for r in mined}
    result = {
        q: {"negs": [text_id(t) for t in negs[q]], "window": full_rank_window(ids[j], pool, lo, hi, q, p)}
        for j, (q, p) in enumerate(pairs)
        if q in negs
    }
    out_path = Path(spec["work"]) / f"{spec['name']}-{spec['round']}.json"
    out_path.write_text(json.dumps(result))
    shutil.rmtree(data, ignore_errors=True)
    return {
        "wall_s": cold_s,
        "warm_s": warm_s,
        "rows_out": cold["rows_out"],
        "rows_in": cold["rows_in"],
        "drops": cold["drops"],
        "precision": enc.precision,
        "timing": cold["timing"],
        "warm_timing": warm["timing"] if warm else None,
        "warm_cache_hits": warm["encode"]["cache_hits"] if warm else None,
        "encoded": cold["encode"]["encoded"],
        "encode_s": cold["encode"]["encode_s"],
        "pool": len(pool),
        "result": str(out_path),
    }


def child_st(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from kalm.training.config import resolve_model_path

    lo, hi = spec["window"]
    pairs = [tuple(p) for p in json.loads((Path(spec["work"]) / "pairs.json").read_text())]
    corpus = [json.loads(line)["text"] for line in Path(spec["corpus_path"]).read_text().splitlines()]
    model = SentenceTransformer(resolve_model_path("minilm"), device="cpu")
    model.max_seq_length = spec["max_length"]
    seen: list[tuple[list[str], str | None, Any]] = []
    spent = {"s": 0.0, "texts": 0}
    encode = model.encode

    def timed_encode(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = encode(inputs, *args, **kwargs)
        spent["s"] += time.perf_counter() - t
        spent["texts"] += len(inputs)
        seen.append((list(inputs), kwargs.get("prompt"), out))  # a reference, no copy
        return out

    model.encode = timed_encode  # type: ignore[method-assign]
    dataset = Dataset.from_dict({"query": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    cache = Path(spec["work"]) / f"st-cache-{spec['round']}"

    def run() -> Any:
        return mine_hard_negatives(
            dataset,
            model,
            anchor_column_name="query",
            positive_column_name="positive",
            corpus=corpus,
            range_min=lo,
            range_max=hi,
            num_negatives=spec["m"],
            sampling_strategy="random",
            query_prompt=prefix(),
            batch_size=spec["batch"],
            use_faiss=True,
            output_format="n-tuple",
            verbose=False,
            cache_folder=str(cache),
        )

    random.seed(0)
    t0 = time.perf_counter()
    mined = run()
    wall = time.perf_counter() - t0
    encode_s, encoded = spent["s"], spent["texts"]
    t0 = time.perf_counter()
    warm = run()  # embeddings from its cache_folder (.npy files keyed by the whole query / corpus lists)
    warm_s = time.perf_counter() - t0
    assert len(seen) == 2 and len(warm) == len(mined), "st: the second run did not use its embedding cache"
    # Untimed: ST's own windows, from the embeddings its encode calls returned (corpus first, then queries).
    (pool, _, pool_vecs), (q_texts, q_prompt, q_vecs) = seen[0], seen[1]
    assert q_prompt == prefix() and len(pool) == len(set(pool))
    ids = rank(np.asarray(pool_vecs), np.asarray(q_vecs), hi + 1, spec["threads"])
    qpos = dict(pairs)
    negs = {r["query"]: [r[f"negative_{i + 1}"] for i in range(spec["m"])] for r in mined}
    result = {}
    for j, q in enumerate(q_texts):
        if q not in negs:
            continue
        ranked = [i for i in ids[j] if i >= 0 and pool[i] != qpos[q]]  # positives out, then [lo, hi)
        result[q] = {
            "negs": [text_id(t) for t in negs[q]],
            "window": [text_id(pool[i]) for i in ranked[lo:hi]],
        }
    out_path = Path(spec["work"]) / f"{spec['name']}-{spec['round']}.json"
    out_path.write_text(json.dumps(result))
    return {
        "wall_s": wall,
        "rows_out": len(mined),
        "rows_in": len(pairs),
        "precision": "fp32",
        "warm_s": warm_s,
        "encode_s": encode_s,
        "encoded": encoded,
        "pool": len(pool),
        "result": str(out_path),
    }


def child_fe(spec: dict[str, Any]) -> dict[str, Any]:
    import importlib
    from importlib.metadata import version

    import numpy as np

    from kalm.training.config import resolve_model_path

    hn_mine = importlib.import_module(FE_MODULE)  # after the shim (see run_child)
    lo, hi = spec["window"]
    pairs = [tuple(p) for p in json.loads((Path(spec["work"]) / "pairs.json").read_text())]
    corpus = [json.loads(line)["text"] for line in Path(spec["corpus_path"]).read_text().splitlines()]
    candidate_pool = list(dict.fromkeys([*corpus, *(p for _, p in pairs)]))
    seen: list[tuple[list[str], Any]] = []
    spent = {"s": 0.0, "texts": 0}

    flag_model: Any = hn_mine.FlagModel

    class BenchFlagModel(flag_model):  # type: ignore[misc,valid-type]
        """This run's batch and max length (instead of the miner's hard-coded 256 / 512); records outputs."""

        def encode(self, sentences: Any, batch_size: int = 256, max_length: int = 512, **kw: Any) -> Any:
            t = time.perf_counter()
            out = super().encode(sentences, batch_size=spec["batch"], max_length=spec["max_length"], **kw)
            spent["s"] += time.perf_counter() - t
            spent["texts"] += len(sentences)
            seen.append((list(sentences), out))
            return out

    model = BenchFlagModel(
        resolve_model_path("minilm"),
        pooling_method="mean",
        normalize_embeddings=True,
        query_instruction_for_retrieval=prefix(),
        use_fp16=False,
    )
    out_file = Path(spec["work"]) / f"fe-output-{spec['round']}.jsonl"
    random.seed(0)
    t0 = time.perf_counter()
    hn_mine.find_knn_neg(
        model,
        input_file=spec["fe_input"],
        candidate_pool=candidate_pool,
        output_file=str(out_file),
        sample_range=[lo, hi],
        negative_number=spec["m"],
        use_gpu=False,
    )
    wall = time.perf_counter() - t0
    (pool, pool_vecs), (_, q_vecs) = seen[0], seen[1]
    ids = rank(np.asarray(pool_vecs), np.asarray(q_vecs), hi, spec["threads"])
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    result = {}
    for j, r in enumerate(rows):
        q, p = r["query"], r["pos"][0]
        result[q] = {
            "negs": [text_id(t) for t in r["neg"]],
            "window": full_rank_window(ids[j], pool, lo, hi, q, p),
        }
    out_path = Path(spec["work"]) / f"{spec['name']}-{spec['round']}.json"
    out_path.write_text(json.dumps(result))
    return {
        "wall_s": wall,
        "rows_out": len(rows),
        "rows_in": len(pairs),
        "precision": "fp32",
        "encode_s": spent["s"],
        "encoded": spent["texts"],
        "pool": len(pool),
        "version": version("FlagEmbedding"),
        "result": str(out_path),
    }


def child_encode(spec: dict[str, Any]) -> dict[str, Any]:
    """Texts/s of our Encoder (default precision, fp32) and SentenceTransformer.encode on the same texts."""
    from sentence_transformers import SentenceTransformer

    from kalm.mining.encode import load_encoder
    from kalm.training.config import resolve_model_path

    pairs = [tuple(p) for p in json.loads((Path(spec["work"]) / "pairs.json").read_text())]
    corpus = [json.loads(line)["text"] for line in Path(spec["corpus_path"]).read_text().splitlines()]
    pre = prefix()
    texts = [*(pre + q for q, _ in pairs), *(p for _, p in pairs), *corpus]
    texts = random.Random(1).sample(texts, min(spec["encode_texts"], len(texts)))
    auto = load_encoder("minilm", None, spec["max_length"], "auto", "cpu")
    fp32 = load_encoder("minilm", None, spec["max_length"], "fp32", "cpu")
    st = SentenceTransformer(resolve_model_path("minilm"), device="cpu")
    st.max_seq_length = spec["max_length"]
    b = spec["batch"]
    runs: dict[str, Callable[[list[str]], Any]] = {
        f"ours ({auto.precision})": lambda t: auto.encode(t, batch_size=b),
        "ours (fp32)": lambda t: fp32.encode(t, batch_size=b),
        "st (fp32)": lambda t: st.encode(t, batch_size=b, normalize_embeddings=True, show_progress_bar=False),
    }
    for fn in runs.values():
        fn(texts[:b])  # warm-up batch
    rates: dict[str, list[float]] = {n: [] for n in runs}
    for rnd in range(spec["encode_repeats"]):
        for name in list(runs) if rnd % 2 == 0 else list(runs)[::-1]:
            t0 = time.perf_counter()
            runs[name](texts)
            rates[name].append(len(texts) / (time.perf_counter() - t0))
    return {"texts": len(texts), "rates": rates}


def run_child(spec: dict[str, Any]) -> None:
    if spec["kind"] == "fe":  # the shim of the module docstring: FlagEmbedding 1.2.11 under transformers 5
        import builtins
        import typing

        builtins.Optional = typing.Optional  # type: ignore[attr-defined]
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    fn = {"ours": child_ours, "st": child_st, "fe": child_fe, "encode": child_encode}[spec["kind"]]
    print("RESULT " + json.dumps(fn(spec)), flush=True)


# -------------------------------------------------------------------------------------------- parent
def child_env(threads: int, extra_path: str | None = None) -> dict[str, str]:
    paths = [str(REPO), *([extra_path] if extra_path else []), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONHASHSEED": "0",
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "TRANSFORMERS_VERBOSITY": "error",
        "TQDM_DISABLE": "1",
    }


def spawn(spec: dict[str, Any], log: Path, extra_path: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = child_env(spec["threads"], extra_path)
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=f, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{spec['name']} failed (exit {proc.returncode}); stderr tail:\n{tail}")
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def flagembedding_status(path: str | None) -> tuple[bool, str]:
    """(importable, why not / version): FlagEmbedding's miner module, with the shim, from ``path``."""
    code = FE_SHIM + f"import importlib, importlib.metadata as m\nimportlib.import_module({FE_MODULE!r})\n"
    code += "print(m.version('FlagEmbedding'))"
    if path and not Path(path).is_dir():
        return False, f"{path} does not exist; install with: .venv/bin/pip install --target {path} " + (
            "FlagEmbedding==1.2.11 peft --no-deps"
        )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env(1, path), capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        return False, last[:200]
    return True, proc.stdout.strip()


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def overlap(ours: dict[str, Any], peer: dict[str, Any], m: int) -> dict[str, float]:
    common = [q for q in ours if q in peer]
    if not common:
        return {"queries": 0}
    win_j, neg_j, expect = [], [], []
    peer_in = ours_in = peer_n = ours_n = 0
    for q in common:
        wo, wp = set(ours[q]["window"]), set(peer[q]["window"])
        no, np_ = set(ours[q]["negs"]), set(peer[q]["negs"])
        win_j.append(jaccard(wo, wp))
        neg_j.append(jaccard(no, np_))
        peer_in += len(np_ & wo)
        peer_n += len(np_)
        ours_in += len(no & wp)
        ours_n += len(no)
        w = max(len(wo), m)
        shared = m * m / w  # expected |A & B| of two independent uniform M-subsets of a w-window
        expect.append(shared / (2 * m - shared))
    return {
        "queries": len(common),
        "window_jaccard": statistics.mean(win_j),
        "peer_negs_in_our_window": peer_in / max(peer_n, 1),
        "our_negs_in_peer_window": ours_in / max(ours_n, 1),
        "negs_jaccard": statistics.mean(neg_j),
        "negs_jaccard_random": statistics.mean(expect),
    }


def mining_line(name: str, r: dict[str, Any]) -> str:
    rate = r["encoded"] / r["encode_s"] if r["encode_s"] else float("nan")
    line = (
        f"  {name:10s} round {r['round']}: wall {r['wall_s']:7.2f} s  [{r['precision']}]  rows out "
        f"{r['rows_out']}/{r['rows_in']}  encode {r['encode_s']:.2f} s for {r['encoded']} texts "
        f"({rate:.1f} texts/s inside the run)  pool {r['pool']}  load {r['load']:.1f}"
    )
    if r.get("timing"):
        t = r["timing"]
        line += f"\n{'':14s}ours parts: search {t['search_s']:.2f} s, "
        line += f"sample {t['sample_s']:.2f} s; drops {r['drops']}"
    if r.get("warm_s") is not None:
        line += (
            f"\n  {name + '-warm':10s} round {r['round']}: wall {r['warm_s']:7.2f} s  (the same run again, "
            + (
                f"force re-mine, {r['warm_cache_hits']} of {r['encoded']} embeddings from the cache)"
                if name.startswith("ours")
                else "embeddings from its cache_folder)"
            )
        )
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=500, help="queries (one positive each)")
    ap.add_argument("--corpus", type=int, default=1500, help="corpus passages (the pool: these + positives)")
    ap.add_argument("--window", default="50,100", help="sampling ranks lo,hi (0-based, hi exclusive)")
    ap.add_argument("--negatives", type=int, default=7, help="M, negatives per query")
    ap.add_argument("--top-k", type=int, default=50, help="our ranking-consistency top-k")
    ap.add_argument("--batch", type=int, default=64, help="encode batch, every contender")
    ap.add_argument("--max-length", type=int, default=256, help="max_seq_length, every contender")
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch/OMP threads, every contender"
    )
    ap.add_argument("--repeats", type=int, default=1, help="interleaved mining runs per contender (median)")
    ap.add_argument("--encode-texts", type=int, default=800, help="texts of the encode-throughput test")
    ap.add_argument("--encode-repeats", type=int, default=2, help="interleaved rounds of the encode test")
    ap.add_argument("--only", default=",".join(CONTENDERS), help=f"comma list of {', '.join(CONTENDERS)}")
    ap.add_argument("--no-encode", action="store_true", help="skip the encode-throughput test")
    ap.add_argument(
        "--flagembedding",
        default=os.environ.get("KALM_BENCH_FLAGEMBEDDING", "/tmp/fe"),
        help="folder with FlagEmbedding 1.2.11 (pip --target); '' = import from the venv",
    )
    ap.add_argument("--seed", type=int, default=0, help="corpus sampling seed")
    ap.add_argument("--quick", action="store_true", help="smoke run: 80 queries, 250 passages, no fp32 run")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        sys.path.insert(0, str(REPO))
        run_child(json.loads(args.child))
        return
    names = [n for n in args.only.split(",") if n]
    if args.quick:
        args.queries, args.corpus, args.encode_texts, args.encode_repeats, args.repeats = 80, 250, 128, 1, 1
        names = [n for n in names if n != "ours-fp32"]
    bad = sorted(set(names) - set(CONTENDERS))
    lo, hi = (int(x) for x in args.window.split(","))
    if bad or len(set(names)) != len(names) or min(args.repeats, args.queries, args.batch) < 1:
        raise SystemExit(f"--only: distinct names from {', '.join(CONTENDERS)}; --repeats/--queries >= 1")
    if not 0 <= lo < hi or args.negatives > hi - lo:
        raise SystemExit(f"--window {args.window}: need 0 <= lo < hi and M <= hi - lo")
    for key, value in child_env(args.threads).items():
        if key != "PYTHONPATH":
            os.environ.setdefault(key, value)
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    fe_path = args.flagembedding or None
    if "fe" in names:
        ok, info = flagembedding_status(fe_path)
        if ok:
            print(f"FlagEmbedding: {info} from {fe_path or 'the venv'} (miner {FE_MODULE}.find_knn_neg)")
        else:
            print(f"FlagEmbedding: not installed here ({info}); skipped")
            names.remove("fe")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_mining_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        pairs, corpus = make_corpus(args.queries, args.corpus, args.seed)
        if len(corpus) + len(pairs) < hi:
            raise SystemExit(f"pool of {len(corpus) + len(pairs)} texts is smaller than the window end {hi}")
        inputs = build_inputs(work, pairs, corpus)
        print(
            f"bench_mining: all-MiniLM-L6-v2 (max_seq_length {args.max_length}), {len(pairs)} queries x 1 "
            f"positive, corpus {len(corpus)} passages (stdlib docstrings), window [{lo}, {hi}), M "
            f"{args.negatives}, top-k {args.top_k}, batch {args.batch}, {args.threads} threads, cpu "
            f"(no GPU), {args.repeats} interleaved repeat(s) (data: {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        base = {
            **inputs,
            "work": str(work),
            "window": [lo, hi],
            "m": args.negatives,
            "top_k": args.top_k,
            "batch": args.batch,
            "max_length": args.max_length,
            "threads": args.threads,
            "encode_texts": args.encode_texts,
            "encode_repeats": args.encode_repeats,
        }
        specs: dict[str, dict[str, Any]] = {
            "ours": {"kind": "ours", "precision": "auto", "warm": True},
            "ours-fp32": {"kind": "ours", "precision": "fp32", "warm": False},
            "st": {"kind": "st"},
            "fe": {"kind": "fe"},
        }
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for rnd in range(args.repeats):
            for name in names if rnd % 2 == 0 else names[::-1]:
                load = os.getloadavg()[0]
                spec = {**base, **specs[name], "name": name, "round": rnd}
                r = spawn(spec, work / f"{name}-{rnd}.log", fe_path if name == "fe" else None)
                r.update(round=rnd, load=load)
                runs[name].append(r)
                print(mining_line(name, r), flush=True)
        enc: dict[str, Any] | None = None
        if not args.no_encode:
            load = os.getloadavg()[0]
            enc = spawn({**base, "kind": "encode", "name": "encode", "round": 0}, work / "encode.log")
            print(f"  encode test: {enc['texts']} texts, load {load:.1f}", flush=True)

        print("\nsummary (median over repeats):")
        wall = {n: statistics.median(r["wall_s"] for r in rs) for n, rs in runs.items()}
        for n in ("ours", "st"):
            if n in runs:
                wall[f"{n}-warm"] = statistics.median(r["warm_s"] for r in runs[n])
        for n, w in wall.items():
            prec = runs[n.removesuffix("-warm")][0]["precision"]
            print(f"WALL {n:10s} {w:7.2f} s  [{prec}]")
        ours_prec = runs["ours"][0]["precision"] if "ours" in runs else "auto"
        for a, label, peers in (
            ("ours", f"cold cache, {ours_prec}", ("st", "fe")),
            ("ours-fp32", "cold cache, fp32", ("st", "fe")),
            ("ours-warm", "both warm caches", ("st-warm",)),
            ("ours-warm", "our warm cache, its cold run", ("st", "fe")),
        ):
            for b in peers:
                if a in wall and b in wall:
                    speed = wall[b] / wall[a]
                    verdict = "ok, goal >= 2.0" if speed >= 2.0 else "BELOW the 2.0 goal"
                    print(f"RATIO wall {b}/{a} ({label}): {speed:.2f}x ({verdict})")
        if enc is not None:
            rates = {n: statistics.median(v) for n, v in enc["rates"].items()}
            for n, v in rates.items():
                rounds = ", ".join(f"{x:.1f}" for x in enc["rates"][n])
                print(f"ENCODE {n:12s} {v:7.1f} texts/s  (rounds: {rounds})")
            st_rate = rates["st (fp32)"]
            for n, v in rates.items():
                if n.startswith("ours"):
                    verdict = "ok, goal >= 1.3" if v / st_rate >= 1.3 else "BELOW the 1.3 goal"
                    print(f"RATIO encode {n}/st (fp32): {v / st_rate:.2f}x ({verdict})")
        if "ours" in runs:
            ours_res = json.loads(Path(runs["ours"][0]["result"]).read_text())
            for peer in ("st", "fe", "ours-fp32"):
                if peer not in runs:
                    continue
                o = overlap(ours_res, json.loads(Path(runs[peer][0]["result"]).read_text()), args.negatives)
                if not o["queries"]:
                    print(f"OVERLAP ours vs {peer}: no common query")
                    continue
                print(
                    f"OVERLAP ours vs {peer} ({o['queries']} queries): window Jaccard "
                    f"{o['window_jaccard']:.3f}; "
                    f"{peer} negatives in our window {o['peer_negs_in_our_window']:.1%}, ours in its window "
                    f"{o['our_negs_in_peer_window']:.1%}; negative-set Jaccard {o['negs_jaccard']:.3f} "
                    f"(independent uniform draws: {o['negs_jaccard_random']:.3f})"
                )
        print(f"total {time.perf_counter() - t0:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
