"""mteb tasks over local Parquet/JSONL files: they run fully offline, through ``mteb.evaluate`` like any
mteb task (mteb's metrics, mteb's JSON results).

Each :class:`~kalm.evaluation.config.LocalTaskSpec` becomes a subclass of the matching mteb abstract task
(``AbsTaskRetrieval``, ``AbsTaskSTS``, ``AbsTaskClassification``, ``AbsTaskClustering``,
``AbsTaskPairClassification``; reranking is retrieval with per-query candidates) with a complete
``TaskMetadata`` whose dataset revision is a hash of the data, and a ``load_data`` that fills
``self.dataset``. The data is read and checked when the task is built, so an empty file or a missing
column fails before any model is loaded.

Two builders make demo tasks from data we really have offline:

- :func:`holdout_task_specs`: a retrieval task per recipe from the rows the data stage held out
  (``<data root>/holdout/<recipe>/``): queries = ``query``, corpus = every ``pos`` and ``neg`` text,
  relevant = the row's positives.
- :func:`build_stdlib_docstring_task`: classification of docstring summaries from this Python's standard
  library *packages* (``email/``, ``asyncio/``, ...) by package: real labels, made offline. The demo
  training recipes read only the top-level ``{stdlib}/*.py`` modules, and any text also found there is
  dropped, so no evaluation text is training data. (No STS task: similarity scores cannot be made honestly.)

>>> spec = LocalTaskSpec(name="FaqRetrieval", type="retrieval", path="faq.parquet")
>>> task = make_local_task(spec)          # reads and checks faq.parquet
>>> mteb.evaluate(encoder, [task], cache=None)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import sysconfig
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Dataset, DatasetDict
from mteb.abstasks.abstask import AbsTask
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

from kalm.core.errors import KalmError
from kalm.core.layout import MANIFEST, eval_data_dir, holdout_dir, holdout_root
from kalm.core.storage import DataRoot, read_table
from kalm.data.readers import module_docstrings
from kalm.evaluation.config import LocalTaskSpec

log = logging.getLogger(__name__)

MAIN_SCORE = {
    "retrieval": "ndcg_at_10",
    "reranking": "map_at_1000",
    "sts": "cosine_spearman",
    "classification": "accuracy",
    "clustering": "v_measure",
    "pair_classification": "max_ap",
}
BASE_CLASS: dict[str, type[AbsTask]] = {
    "retrieval": AbsTaskRetrieval,
    "reranking": AbsTaskRetrieval,
    "sts": AbsTaskSTS,
    "classification": AbsTaskClassification,
    "clustering": AbsTaskClustering,
    "pair_classification": AbsTaskPairClassification,
}
REQUIRED_COLUMNS = {
    "retrieval": ("query", "pos"),
    "reranking": ("query", "pos", "neg"),
    "sts": ("sentence1", "sentence2", "score"),
    "classification": ("text", "label"),  # + optional "split" (train/test); without it, cross-validation
    "clustering": ("text", "label"),
    "pair_classification": ("sentence1", "sentence2", "label"),
}
# How a local task is scored from its data; part of the task's revision, so a change re-scores stored results.
# 2: classification trains on the whole train split (1: mteb's 8 texts per label); 3: a classification table
# without a split column is scored by repeated k-fold cross-validation.
PROTOCOL = 3
CV_FOLDS = 5  # classification tables without a split column: k-fold cross-validation,
CV_REPEATS = 5  # repeated with this many fold assignments (seeds) and averaged over all folds


class RepeatedCVClassification(AbsTaskClassification):
    """mteb's cross-validated classification (``is_cross_validation``), repeated ``cv_repeats`` times with
    other fold assignments, every fold of every repeat averaged (``scores_per_experiment`` holds them all).

    One k-fold split of a few hundred texts still moves the paired difference of two similar models by about
    a point between fold seeds (measured on ManPageSectionClassification: sd 0.8-1.1 for one split, 0.3-0.4
    for five). Texts are encoded once: the encoder memoises embeddings per text (``KalmEncoder``)."""

    cv_repeats: int = CV_REPEATS

    def evaluate(self, model: Any, split: str = "test", subsets_to_run: Any = None, **kwargs: Any) -> Any:
        seed = self.seed
        runs = []
        try:
            for r in range(self.cv_repeats):
                self.seed = seed + r
                runs.append(super().evaluate(model, split, subsets_to_run, **kwargs))
        finally:
            self.seed = seed
        merged: dict[str, Any] = {}
        for subset in runs[0]:
            folds = [f for run in runs for f in run[subset]["scores_per_experiment"]]
            merged[subset] = self._calculate_avg_scores(folds)
            self._add_main_score(merged[subset])
        return merged

    def _calculate_scores(self, y_test: Any, y_pred: Any) -> Any:
        # mteb takes a test set with two labels for a binary task and computes average precision with
        # positive label 1; a fold of a multi-class task can hold two other labels, and that raises
        try:
            return super()._calculate_scores(y_test, y_pred)
        except ValueError:
            from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

            kw: dict[str, Any] = {"zero_division": 0}
            return {
                "accuracy": accuracy_score(y_test, y_pred),
                "f1": f1_score(y_test, y_pred, average="macro", **kw),
                "f1_weighted": f1_score(y_test, y_pred, average="weighted", **kw),
                "precision": precision_score(y_test, y_pred, average="macro", **kw),
                "precision_weighted": precision_score(y_test, y_pred, average="weighted", **kw),
                "recall": recall_score(y_test, y_pred, average="macro", **kw),
                "recall_weighted": recall_score(y_test, y_pred, average="weighted", **kw),
                "ap": None,
                "ap_weighted": None,
            }


def table_revision(table: pa.Table) -> str:
    """12 hex digits of the table's content: the task's ``dataset.revision`` (new data, new revision)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:12]


def _check_columns(spec: LocalTaskSpec, table: pa.Table) -> None:
    missing = [c for c in REQUIRED_COLUMNS[spec.type] if c not in table.column_names]
    if spec.type == "reranking" and missing == ["neg"]:
        missing = []  # candidates are then the positives only; allowed, if not very informative
    if missing:
        raise KalmError(
            f"local task {spec.name!r} ({spec.type}): {spec.path} lacks column(s) {missing} "
            f"(has {table.column_names})"
        )
    if table.num_rows == 0:
        raise KalmError(f"local task {spec.name!r}: {spec.path} has no rows")


# -- per-type datasets -----------------------------------------------------------------------------
def _texts(values: Any) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        return [values]
    return [v for v in values if isinstance(v, str) and v.strip()]


def retrieval_split(rows: list[dict[str, Any]], with_candidates: bool) -> RetrievalSplitData:
    """Rows ``{query, pos: [..], neg: [..]}`` -> mteb's retrieval split (queries, corpus, qrels, candidates).

    Identical query texts are merged (their positives pooled); identical documents share one id.

    >>> s = retrieval_split([{"query": "q", "pos": ["a"], "neg": ["b"]}], with_candidates=False)
    >>> s["relevant_docs"]
    {'q0': {'d0': 1}}
    """
    doc_ids: dict[str, str] = {}
    query_ids: dict[str, str] = {}
    relevant: dict[str, dict[str, int]] = defaultdict(dict)
    candidates: dict[str, list[str]] = defaultdict(list)

    def doc_id(text: str) -> str:
        return doc_ids.setdefault(text, f"d{len(doc_ids)}")

    for row in rows:
        query = row.get("query")
        positives = _texts(row.get("pos"))
        if not isinstance(query, str) or not query.strip() or not positives:
            continue
        qid = query_ids.setdefault(query, f"q{len(query_ids)}")
        for text in positives:
            relevant[qid][doc_id(text)] = 1
        for text in _texts(row.get("neg")):
            doc_id(text)
            if with_candidates:
                candidates[qid].append(doc_ids[text])
        if with_candidates:
            candidates[qid][:0] = [doc_ids[t] for t in positives]
    if not relevant:
        raise KalmError("no row has both a query and a positive")
    split = RetrievalSplitData(
        queries=Dataset.from_dict({"id": list(query_ids.values()), "text": list(query_ids)}),
        corpus=Dataset.from_dict({"id": list(doc_ids.values()), "text": list(doc_ids)}),
        relevant_docs=dict(relevant),
        top_ranked={q: list(dict.fromkeys(c)) for q, c in candidates.items()} if with_candidates else None,
    )
    return split


def _label_ids(labels: list[Any]) -> tuple[list[int], list[str]]:
    names = sorted({str(x) for x in labels})
    index = {n: i for i, n in enumerate(names)}
    return [index[str(x)] for x in labels], names


def build_dataset(spec: LocalTaskSpec, table: pa.Table) -> tuple[Any, dict[str, Any]]:
    """The ``self.dataset`` value for ``spec`` plus class attributes its mteb task needs.

    Raises a one-line KalmError when the data cannot make a meaningful task (no pairs, one label, ...).
    """
    where = f"local task {spec.name!r} ({spec.path})"
    cols = table.to_pydict()
    n = table.num_rows
    if spec.type in ("retrieval", "reranking"):
        rows = table.to_pylist()
        try:
            split = retrieval_split(rows, with_candidates=spec.type == "reranking")
        except KalmError as err:
            raise KalmError(f"{where}: {err}") from None
        return {"default": {"test": split}}, {}
    if spec.type == "sts":
        scores = [float(s) for s in cols["score"]]
        if min(scores) == max(scores):
            raise KalmError(f"{where}: every score is {scores[0]}; STS needs varying scores")
        ds = Dataset.from_dict(
            {"sentence1": cols["sentence1"], "sentence2": cols["sentence2"], "score": scores}
        )
        return DatasetDict({"test": ds}), {"min_score": min(scores), "max_score": max(scores)}
    if spec.type == "pair_classification":
        labels = [int(x) for x in cols["label"]]
        if n < 2 or set(labels) != {0, 1}:
            raise KalmError(f"{where}: needs at least 2 pairs with labels 0 and 1, got labels {set(labels)}")
        ds = Dataset.from_dict(
            {"sentence1": cols["sentence1"], "sentence2": cols["sentence2"], "labels": labels}
        )
        return DatasetDict({"test": ds}), {}
    if spec.type == "clustering":
        ids, names = _label_ids(cols["label"])
        if len(names) < 2:
            raise KalmError(f"{where}: clustering needs at least 2 labels, got {names}")
        ds = Dataset.from_dict({"sentences": cols["text"], "labels": ids})
        # embed every document and bootstrap clusters of the whole set: local sets are small
        attrs = {"max_fraction_of_documents_to_embed": None, "max_documents_per_cluster": n}
        return DatasetDict({"test": ds}), attrs
    # classification
    ids, names = _label_ids(cols["label"])
    if len(names) < 2:
        raise KalmError(f"{where}: classification needs at least 2 labels, got {names}")
    if "split" not in cols:
        # No split given: k-fold cross-validation over every row (mteb's own protocol for small sets), so
        # each text is a test text once. A single half split of a few hundred texts moves by whole points
        # when two or three test texts flip, more than the regressions the task is there to show.
        counts = Counter(ids)
        folds = min(CV_FOLDS, min(counts.values()))
        if folds < 2:
            raise KalmError(f"{where}: cross-validation needs at least 2 texts per label, got {dict(counts)}")
        ds = Dataset.from_dict({"text": cols["text"], "label": ids})
        attrs = {
            "is_cross_validation": True,
            "n_splits": folds,
            "train_split": "test",  # mteb cross-validates the split it evaluates
            "samples_per_label": max(counts.values()),  # each fold's classifier learns from all its texts
        }
        return DatasetDict({"test": ds}), attrs
    by_split: dict[str, dict[str, list[Any]]] = {
        "train": {"text": [], "label": []},
        "test": {"text": [], "label": []},
    }
    for text, label, split in zip(cols["text"], ids, cols["split"], strict=True):
        if split not in by_split:
            raise KalmError(f"{where}: split must be 'train' or 'test', got {split!r}")
        by_split[split]["text"].append(text)
        by_split[split]["label"].append(label)
    for split_name, part in by_split.items():
        if len(set(part["label"])) < 2:
            raise KalmError(f"{where}: the {split_name} split needs at least 2 labels")
    # the classifier learns from the WHOLE train split: mteb's default of 8 texts per label turns a local set
    # of a few hundred texts into a few-shot probe whose score moves by points with small embedding changes
    attrs = {"samples_per_label": max(Counter(by_split["train"]["label"]).values())}
    return DatasetDict({k: Dataset.from_dict(v) for k, v in by_split.items()}), attrs


def make_local_task(spec: LocalTaskSpec, table: pa.Table | None = None) -> AbsTask:
    """An mteb task instance for ``spec``; its data is read and checked now (KalmError when unusable)."""
    table = read_table(spec.path, "local task data") if table is None else table
    _check_columns(spec, table)
    dataset, attrs = build_dataset(spec, table)
    metadata = TaskMetadata(
        name=spec.name,
        description=spec.description or f"Local {spec.type} task over {spec.path}",
        type=spec.mteb_type,  # type: ignore[arg-type]
        category="t2t",
        reference=None,
        eval_splits=["test"],
        eval_langs=[spec.lang],
        main_score=MAIN_SCORE[spec.type],
        dataset={"path": spec.path, "revision": f"{table_revision(table)}-p{PROTOCOL}"},
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=[],
        sample_creation=None,
        bibtex_citation="",
        modalities=["text"],
    )

    def load_data(self: AbsTask, num_proc: int | None = None, **kwargs: Any) -> None:
        # mteb may filter a split in place (queries without positives); hand out a fresh structure each time
        self.dataset = build_dataset(spec, table)[0]
        self.data_loaded = True

    base = RepeatedCVClassification if attrs.get("is_cross_validation") else BASE_CLASS[spec.type]
    cls = type(
        re.sub(r"\W", "_", spec.name),
        (base,),
        {"metadata": metadata, "load_data": load_data, "__module__": __name__, **attrs},
    )
    task: AbsTask = cls()
    task.dataset = dataset
    task.data_loaded = True
    return task


# -- demo builders ---------------------------------------------------------------------------------
def holdout_task_specs(root: DataRoot, recipes: list[str] | None = None) -> list[LocalTaskSpec]:
    """A retrieval task per recipe whose held-out rows the data stage published (``holdout/<recipe>/``).

    The instruction is the rows' own (the recipe's training instruction), on the query side only.
    """
    specs = []
    for name in root.list_dirs(holdout_root()):
        if (recipes and name not in recipes) or not root.exists(f"{holdout_dir(name)}/{MANIFEST}"):
            continue
        path = root.full_uri(holdout_dir(name))
        table = read_table(path, "local task data")
        instructions = table.column("instruction").to_pylist() if "instruction" in table.column_names else []
        common = Counter(i for i in instructions if i).most_common(1)
        specs.append(
            LocalTaskSpec(
                name=f"Holdout_{name}",
                type="retrieval",
                path=path,
                instruction=common[0][0] if common else "",
                description=f"Retrieval over the rows held out from recipe {name} by the data stage",
            )
        )
    return specs


# Packages without docstrings worth classifying, generated code, or tests.
_SKIP_PACKAGES = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "encodings",
        "turtledemo",
        "pydoc_data",
        "site-packages",
        "ensurepip",
    }
)


def _docstring_summaries(files: list[Path]) -> set[str]:
    """First paragraphs (whitespace collapsed, >= 25 characters) of every docstring in ``files``."""
    found: set[str] = set()
    for f in files:
        try:
            src = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, ValueError):
            continue
        for doc in module_docstrings(src):
            text = " ".join(doc.strip().split("\n\n")[0].split())
            if len(text) >= 25:
                found.add(text)
    return found


def stdlib_docstrings(stdlib: str | Path | None = None) -> dict[str, list[str]]:
    """Docstring summaries (first paragraph, whitespace collapsed) of the stdlib's packages, per package.

    Module, class and function docstrings of ``<stdlib>/<package>/**/*.py``, skipping test folders. Dropped:
    texts shorter than 25 characters, texts found in several packages, and texts that also occur in a
    top-level module ``<stdlib>/*.py``: the demo's training recipes (code_docstring, api_docs) read those, so
    an evaluation text must never be one of them.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    seen_in_training = _docstring_summaries(sorted(root.glob("*.py")))
    found: dict[str, set[str]] = {}
    for pkg in sorted(p for p in root.iterdir() if (p / "__init__.py").is_file()):
        if pkg.name in _SKIP_PACKAGES or pkg.name.startswith(("_", ".")):
            continue
        files = [
            f
            for f in sorted(pkg.rglob("*.py"))
            if not any(part.startswith("test") for part in f.relative_to(pkg).parts)
        ]
        found[pkg.name] = _docstring_summaries(files) - seen_in_training
    owners = Counter(t for texts in found.values() for t in texts)
    return {pkg: sorted(t for t in texts if owners[t] == 1) for pkg, texts in found.items() if texts}


def build_stdlib_docstring_task(
    out: DataRoot,
    rel: str = eval_data_dir("stdlib_docstrings"),
    *,
    per_label: int = 40,
    max_labels: int | None = None,
    stdlib: str | Path | None = None,
    force: bool = False,
) -> LocalTaskSpec:
    """Write a classification task "which stdlib package is this docstring from?" and return its spec.

    Per package with at least ``per_label`` usable docstrings: ``per_label`` of them chosen by a stable
    hash, half ``train`` and half ``test``. ``max_labels`` keeps the largest packages only (tests use 3).
    Written to ``<out>/<rel>/data.parquet`` (columns text, label, split) plus a manifest of its parameters:
    a later call with the same parameters (and the same Python) reuses the file unless ``force``.
    """
    stdlib_dir = str(Path(stdlib or sysconfig.get_paths()["stdlib"]).resolve())
    params = {
        "per_label": per_label,
        "max_labels": max_labels,
        "stdlib": stdlib_dir,
        "python": sys.version.split()[0],
    }
    spec = LocalTaskSpec(
        name="StdlibDocstringPackageClassification",
        type="classification",
        path=out.full_uri(f"{rel}/data.parquet"),
        instruction="Classify the Python standard library package a docstring comes from",
        description="Docstring summaries of Python stdlib packages, labelled by package (local, offline)",
    )
    manifest = f"{rel}/{MANIFEST}"
    if not force and out.exists(manifest) and out.read_json(manifest).get("params") == params:
        return spec
    by_pkg = stdlib_docstrings(stdlib_dir)

    def key(t: str) -> str:
        return hashlib.blake2b(t.encode(), digest_size=8).hexdigest()

    eligible = sorted(
        (p for p, texts in by_pkg.items() if len(texts) >= per_label), key=lambda p: (-len(by_pkg[p]), p)
    )
    if max_labels:
        eligible = eligible[:max_labels]
    if len(eligible) < 2:
        raise KalmError(f"fewer than 2 stdlib packages have {per_label} docstrings: lower per_label")
    rows: dict[str, list[str]] = {"text": [], "label": [], "split": []}
    for pkg in sorted(eligible):
        chosen = sorted(by_pkg[pkg], key=key)[:per_label]
        for i, text in enumerate(chosen):
            rows["text"].append(text)
            rows["label"].append(pkg)
            rows["split"].append("train" if i % 2 == 0 else "test")
    table = pa.table(
        rows, schema=pa.schema([("text", pa.string()), ("label", pa.string()), ("split", pa.string())])
    )
    out.write_parquet(f"{rel}/data.parquet", table)
    out.write_json(manifest, {"params": params, "rows": table.num_rows, "labels": eligible})
    log.info("stdlib docstring task: %d texts, %d packages -> %s", table.num_rows, len(eligible), rel)
    return spec
