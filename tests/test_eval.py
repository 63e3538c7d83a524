"""Evaluation through mteb, offline: local retrieval/STS/classification tasks with MiniLM, instructions,
Matryoshka dims, stored and reused results, comparisons (local and S3), the device queue, the offline check,
name resolution and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm.core.config import CONFIG_DIR
from kalm.core.errors import KalmError
from kalm.core.schema import ROW_SCHEMA, row_id
from kalm.core.storage import DataRoot
from kalm.evaluation.config import EvalConfig, LocalTaskSpec, load_eval_config, load_local_tasks
from kalm.evaluation.instructions import load_instructions
from kalm.evaluation.mteb_tasks import check_offline, resolve_tasks
from kalm.evaluation.results import run_eval
from kalm.training.instructions import DEFAULT_QUERY_TEMPLATE
from tests.evalkit import MODEL_DIM, QA, minilm, raw_minilm


@pytest.fixture(scope="module")
def stdlib_spec(tmp_path_factory: pytest.TempPathFactory) -> LocalTaskSpec:
    """The stdlib docstring classification task over 3 real stdlib packages x 12 docstrings (the demo parses
    every package: ~3 s; three are enough here)."""
    import shutil
    import sysconfig

    from kalm.evaluation.local_tasks import build_stdlib_docstring_task

    lib = tmp_path_factory.mktemp("stdlib")
    for pkg in ("email", "json", "logging"):
        shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / pkg, lib / pkg)
    root = DataRoot.from_uri(str(tmp_path_factory.mktemp("stdlib_root")))
    return build_stdlib_docstring_task(root, per_label=12, stdlib=lib)


def test_local_retrieval_and_sts_through_mteb(evaluated: dict[str, Any]) -> None:
    res, root = evaluated["res"], evaluated["root"]
    out = root / "eval" / res.fingerprint
    assert res.output == str(out)
    for dim in (384, 128):
        for task in ("TinyQARetrieval", "TinySTS"):
            mteb_json = json.loads((out / f"results/d{dim}/{task}.json").read_text())
            assert mteb_json["task_name"] == task and "main_score" in mteb_json["scores"]["test"][0]
    assert res.score("TinyQARetrieval") > 0.9  # MiniLM finds these answers easily
    assert 0.5 < res.score("TinySTS") <= 1.0
    assert {(r["task"], r["dim"]) for r in res.rows} == {
        (t, d) for t in ("TinyQARetrieval", "TinySTS") for d in (384, 128)
    }
    table = pq.read_table(out / "summary.parquet")
    assert table.num_rows == 4 and set(table.column("fingerprint").to_pylist()) == {res.fingerprint}
    assert {"model", "model_path", "fingerprint", "task", "task_type", "dim", "main_score"} <= set(
        table.column_names
    )
    md = (out / "summary.md").read_text()
    assert "| TinyQARetrieval | Retrieval | ndcg_at_10 |" in md and "d128" in md
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["dims"] == [384, 128] and manifest["instructions"]["version"] == "kalm-eval-v2"
    by_task = {r["task"]: r for r in res.rows}
    assert by_task["TinySTS"]["instruction"] is None  # KaLM policy: STS without instruction
    assert by_task["TinyQARetrieval"]["instruction_source"] == "override"


def test_results_are_in_mtebs_own_layout_too(evaluated: dict[str, Any]) -> None:
    """mteb's ResultCache over <root>/eval/mteb finds every result: the full dim under the model's name,
    each Matryoshka dim as its own model (-d128), revision = the model fingerprint, same scores."""
    from mteb.cache import ResultCache

    res, root = evaluated["res"], evaluated["root"]
    cache = ResultCache(root / "eval" / "mteb")
    name = json.loads((root / "eval" / "mteb" / "results").glob("*/*/model_meta.json").__next__().read_text())
    base = name["name"].removesuffix("-d128")
    models = set(cache.get_models(include_remote=False))
    as_path = base.replace("/", "__")
    assert models == {(as_path, res.fingerprint), (f"{as_path}-d128", res.fingerprint)}
    got = cache.load_results(models=[base, f"{base}-d128"], include_remote=False, validate_and_filter=False)
    scores = {(m.model_name, t.task_name): t.get_score() for m in got.model_results for t in m.task_results}
    ours = {(base if r["dim"] == 384 else f"{base}-d128", r["task"]): r["main_score"] for r in res.rows}
    assert scores.keys() == ours.keys() and all(
        abs(scores[k] - ours[k]) < 1e-6 for k in ours
    )  # JSON: 6 digits


def test_rerun_reuses_stored_results(evaluated: dict[str, Any]) -> None:
    res = run_eval(minilm(), [], evaluated["specs"], dims=[128], data_root=str(evaluated["root"]))
    assert res.reused == 4 and res.new == 0
    assert {r["main_score"] for r in res.rows} == {r["main_score"] for r in evaluated["res"].rows}


def test_a_changed_input_rescores_only_what_it_touches(
    evaluated: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from kalm.evaluation import results, scoring

    root = tmp_path / "root"
    shutil.copytree(evaluated["root"], root)  # the shared fixture's results stay as they are
    qa, sts = evaluated["specs"]
    qa = qa.model_copy(update={"instruction": "Find the answer"})
    boom = sts.model_copy(update={"name": "Boom"})
    real = scoring.evaluate_task_dims

    def crash_on_boom(encoder: Any, rt: Any, *args: Any) -> list[dict[str, Any]]:
        if rt.name == "Boom":
            raise RuntimeError("worker lost")
        return real(encoder, rt, *args)

    monkeypatch.setattr(scoring, "evaluate_task_dims", crash_on_boom)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_eval(minilm(), [], [qa, sts, boom], dims=[128], data_root=str(root))
    monkeypatch.setattr(scoring, "evaluate_task_dims", real)
    # the new instruction re-scored the retrieval task only (STS was reused), and each finished task was
    # stored at once: the crash in the last task lost nothing
    res = run_eval(minilm(), [], [qa, sts], dims=[128], data_root=str(root))
    assert (res.new, res.reused) == (0, 4)
    assert {r["task"] for r in res.rows if r["instruction"] == "Find the answer"} == {"TinyQARetrieval"}
    assert [r["evaluated_at"] for r in res.rows if r["task"] == "TinySTS"] == [
        r["evaluated_at"] for r in evaluated["res"].rows if r["task"] == "TinySTS"
    ]

    # the reuse key covers the model, data revision, dim, instruction and its version, template, mteb
    (rt,) = resolve_tasks([], [sts])
    key = results.result_key("f" * 16, rt, 384, None, "v1", DEFAULT_QUERY_TEMPLATE, None)
    variants = [
        results.result_key("e" * 16, rt, 384, None, "v1", DEFAULT_QUERY_TEMPLATE, None),
        results.result_key("f" * 16, rt, 128, None, "v1", DEFAULT_QUERY_TEMPLATE, None),
        results.result_key("f" * 16, rt, 384, "x", "v1", DEFAULT_QUERY_TEMPLATE, None),
        results.result_key("f" * 16, rt, 384, None, "v2", DEFAULT_QUERY_TEMPLATE, None),
        results.result_key("f" * 16, rt, 384, None, "v1", "{instruction}: {query}", None),
        results.result_key("f" * 16, rt, 384, None, "v1", DEFAULT_QUERY_TEMPLATE, 128),
    ]
    monkeypatch.setattr(results, "mteb_version", lambda: "0.0.1")
    variants.append(results.result_key("f" * 16, rt, 384, None, "v1", DEFAULT_QUERY_TEMPLATE, None))
    assert len({key, *variants}) == 8


def test_encoder_applies_instructions_and_matryoshka(tmp_path: Path) -> None:
    import shutil

    from kalm.evaluation.encoder import KalmEncoder
    from kalm.evaluation.instructions import format_query

    ins = load_instructions().with_overrides({"Mine": "Find the answer"})
    enc = KalmEncoder(minilm(), instructions=ins)
    seen: list[list[str]] = []
    original = enc._embed

    def spy(texts: list[str]) -> np.ndarray:
        seen.append(texts)
        return original(texts)

    enc._embed = spy  # type: ignore[method-assign]

    from mteb.types import PromptType

    class Meta:
        def __init__(self, name: str, type_: str) -> None:
            self.name, self.type = name, type_

    def run(text: str, task: str, task_type: str, prompt_type: PromptType | None = None) -> np.ndarray:
        meta = Meta(task, task_type)
        return enc.encode([{"text": [text]}], task_metadata=meta, hf_split="test", hf_subset="default",
                          prompt_type=prompt_type)  # fmt: skip

    q = run("what is a soup?", "Mine", "Retrieval", PromptType.query)
    run("A soup is a liquid food.", "Mine", "Retrieval", PromptType.document)
    run("two cats", "STSBenchmark", "STS")
    run("I lost my card", "Banking77Classification", "Classification")
    assert seen == [
        ["Instruct: Find the answer \n Query: what is a soup?"],
        ["A soup is a liquid food."],
        ["two cats"],
        ["Instruct: Given a online banking query, find the corresponding intents \n Query: I lost my card"],
    ]
    assert q.shape == (1, MODEL_DIM)
    enc.set_dim(128)
    short = run("what is a soup?", "Mine", "Retrieval", PromptType.query)
    assert short.shape == (1, 128) and np.isclose(np.linalg.norm(short), 1.0)
    assert np.allclose(short[0], q[0, :128] / np.linalg.norm(q[0, :128]), atol=1e-6)
    with pytest.raises(KalmError, match="dim 500 is not in 1..384"):
        enc.set_dim(500)
    assert format_query("x", None) == "x"

    # a model folder carrying its own template (kalm.training.model.Embedder writes prompts.query_template)
    from kalm.evaluation.instructions import model_query_template

    own = tmp_path / "own"
    shutil.copytree(minilm(), own)
    cfg = json.loads((own / "config_sentence_transformers.json").read_text())
    cfg["prompts"] = {"query_template": "<instruct>{instruction}<query>{query}"}
    (own / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    assert model_query_template(own) == "<instruct>{instruction}<query>{query}"
    cfg["prompts"] = {"query_template": "{query} only"}
    (own / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    with pytest.raises(KalmError, match=r"prompts.query_template: query template must contain"):
        model_query_template(own)


def test_evaluation_formats_queries_with_the_training_code() -> None:
    """One template grammar: evaluation re-uses training's constant, formatter and validator."""
    import kalm.evaluation.instructions as ev
    import kalm.training.instructions as tr

    assert ev.format_query is tr.format_query and ev.validate_template is tr.validate_template
    assert ev.DEFAULT_QUERY_TEMPLATE is tr.DEFAULT_QUERY_TEMPLATE
    assert load_instructions().file.template == tr.DEFAULT_QUERY_TEMPLATE


def test_offline_check_names_every_uncached_task_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_eval_specs: list[LocalTaskSpec]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(KalmError) as err:
        run_eval(minilm(), ["STSBenchmark", "SciFact"], tiny_eval_specs, data_root=str(tmp_path / "d"))
    msg = str(err.value)
    assert "\n" not in msg and "2 MTEB task(s)" in msg
    assert "STSBenchmark (mteb/stsbenchmark-sts@" in msg and "SciFact (mteb/scifact@" in msg
    assert not (tmp_path / "d" / "eval").exists()  # failed before any work

    # a hub snapshot of the pinned revision counts as cached
    sts = resolve_tasks(["STSBenchmark"])[0].task.metadata.dataset
    (tmp_path / "hf/hub/datasets--mteb--stsbenchmark-sts/snapshots" / sts["revision"]).mkdir(parents=True)
    with pytest.raises(KalmError, match=r"1 MTEB task\(s\).*: SciFact \(") as err2:
        check_offline(resolve_tasks(["STSBenchmark", "SciFact"]))
    assert "STSBenchmark" not in str(err2.value).split(": ", 1)[1]
    check_offline(resolve_tasks(["STSBenchmark"]))  # no error: cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    check_offline(resolve_tasks(["SciFact"]))  # online: nothing to check up front


def test_names_resolve_and_unknown_names_list_close_matches(tiny_eval_specs: list[LocalTaskSpec]) -> None:
    tasks = resolve_tasks(["STSBenchmark", "MTEB(eng, v1)"], tiny_eval_specs)
    names = [t.name for t in tasks]
    assert names[0] == "STSBenchmark" and names.count("STSBenchmark") == 1 and "SciFact" in names
    assert names[-2:] == ["TinyQARetrieval", "TinySTS"] and len(names) == 58
    with pytest.raises(
        KalmError, match=r"unknown task or benchmark 'STSBenchmarkk'; close matches: STSBenchmark"
    ):
        resolve_tasks(["STSBenchmarkk"])
    with pytest.raises(KalmError, match=r"close matches: MTEB\(eng, v1\)"):
        resolve_tasks(["MTEB(eng,v1)"])
    with pytest.raises(KalmError, match="local task name 'TinySTS' is declared twice"):
        resolve_tasks([], [tiny_eval_specs[1], tiny_eval_specs[1]])


def test_task_selection_from_the_config_and_the_command_line(
    tiny_eval_specs: list[LocalTaskSpec], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --tasks: the config's mteb and local tasks. --tasks: only those; a name may pick a local task."""
    from kalm.evaluation.mteb_tasks import select_tasks

    cfg = EvalConfig(tasks=["STSBenchmark"], local_tasks=tiny_eval_specs, stdlib_task=True)
    root = str(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache, whatever this machine has
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(KalmError, match=r"offline .* STSBenchmark \(mteb/stsbenchmark-sts@"):
        select_tasks(cfg, root)
    assert not (tmp_path / "eval_data").exists()  # failed before building the stdlib task
    cfg = cfg.model_copy(update={"stdlib_task": False})
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: nothing to check up front
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert select_tasks(cfg, root) == (["STSBenchmark"], tiny_eval_specs)
    assert select_tasks(cfg, root, ["SciFact"]) == (["SciFact"], [])
    assert select_tasks(cfg, root, ["SciFact", "TinySTS"]) == (["SciFact"], [tiny_eval_specs[1]])
    assert select_tasks(cfg, root, None, []) == (["STSBenchmark"], [])
    with pytest.raises(KalmError, match="unknown task or benchmark 'TinySTSS'; close matches: TinySTS"):
        select_tasks(cfg, root, ["TinySTSS"])


def test_bad_inputs_give_one_line_errors(tmp_path: Path, tiny_eval_specs: list[LocalTaskSpec]) -> None:
    with pytest.raises(KalmError, match="model folder not found"):
        run_eval(tmp_path / "missing", [], tiny_eval_specs)
    with pytest.raises(KalmError, match="model folders must be local paths, got s3://bucket/model"):
        run_eval("s3://bucket/model", [], tiny_eval_specs)
    with pytest.raises(KalmError, match="no tasks to evaluate"):
        run_eval(minilm(), [], [])
    pq.write_table(pa.table({"query": pa.array([], pa.string()), "pos": pa.array([], pa.list_(pa.string()))}),
                   tmp_path / "empty.parquet")  # fmt: skip
    with pytest.raises(KalmError, match="local task 'Empty': .*empty.parquet has no rows"):
        run_eval(
            minilm(),
            [],
            [LocalTaskSpec(name="Empty", type="retrieval", path=str(tmp_path / "empty.parquet"))],
        )
    with pytest.raises(KalmError, match=r"lacks column\(s\) \['sentence1', 'sentence2', 'score'\]"):
        run_eval(minilm(), [], [LocalTaskSpec(name="Bad", type="sts", path=tiny_eval_specs[0].path)])
    with pytest.raises(KalmError, match="local task data not found"):
        run_eval(minilm(), [], [LocalTaskSpec(name="Gone", type="sts", path=str(tmp_path / "gone.jsonl"))])
    with pytest.raises(KalmError, match=r"dims \[512\] exceed the model's embedding dimension 384"):
        run_eval(minilm(), [], tiny_eval_specs, dims=[512], data_root=str(tmp_path / "d"))
    with pytest.raises(KalmError, match="'STSBenchmark' is also an mteb task"):
        run_eval(minilm(), [], [tiny_eval_specs[1].model_copy(update={"name": "STSBenchmark"})])


def test_configs_load_and_reject_unknown_keys(tmp_path: Path) -> None:
    cfg = load_eval_config()
    assert cfg.dims == [256, 128] and cfg.batch_size == 32 and Path(cfg.instructions).is_file()
    (tmp_path / "eval.yaml").write_text("tasks: []\ndimz: [64]\n")
    with pytest.raises(
        KalmError,
        match=r"unknown key 'dimz' \(allowed: tasks, local_tasks, holdout_tasks, stdlib_task, general",
    ):
        load_eval_config(tmp_path / "eval.yaml")
    (tmp_path / "local.yaml").write_text("local_tasks:\n  - {name: X, type: sts, path: x.jsonl, instr: hi}\n")
    with pytest.raises(KalmError, match="unknown key 'local_tasks.0.instr'"):
        load_local_tasks(tmp_path / "local.yaml")
    (tmp_path / "local.yaml").write_text("local_tasks:\n  - {name: X, type: sts, path: x.jsonl}\n")
    assert load_local_tasks(tmp_path / "local.yaml")[0].path == str(tmp_path / "x.jsonl")  # relative to file


def test_pinned_instructions_follow_the_policy_and_name_real_tasks() -> None:
    import mteb

    from kalm.evaluation.mteb_tasks import mteb_names

    ins = load_instructions()
    known, _ = mteb_names()
    assert set(ins.file.tasks) <= known
    for name, instruction in ins.file.tasks.items():
        task_type = mteb.get_task(name).metadata.type
        if task_type in ("STS", "PairClassification", "Summarization"):
            assert instruction is None, name
        else:
            assert instruction, name
    assert ins.lookup("SprintDuplicateQuestions", "PairClassification") == (None, "task")
    assert ins.lookup("SomeNewRetrieval", "Retrieval")[1] == "task_type"


def test_holdout_rows_and_stdlib_docstrings_make_tasks(tmp_path: Path, stdlib_spec: LocalTaskSpec) -> None:
    from kalm.evaluation.local_tasks import holdout_task_specs, make_local_task

    root = DataRoot.from_uri(str(tmp_path / "root"))
    rows = [
        {"id": row_id(q, p), "query": q, "pos": [p], "neg": [n], "instruction": "Retrieve the answer",
         "symmetric": False, "category": "qa", "task_type": "retrieval", "recipe": "qa", "stage": "finetune",
         "lang": "en"}
        for q, p, n in QA
    ]  # fmt: skip
    root.write_parquet("holdout/qa/part-00000.parquet", pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    root.write_json("holdout/qa/_manifest.json", {"rows_out": len(rows)})
    root.write_parquet("holdout/unfinished/part-00000.parquet", pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    specs = holdout_task_specs(root)
    assert [s.name for s in specs] == ["Holdout_qa"] and specs[0].instruction == "Retrieve the answer"
    task = make_local_task(specs[0])
    split = task.dataset["default"]["test"]
    assert len(split["queries"]) == 12 and len(split["corpus"]) == 24
    assert all(len(v) == 1 for v in split["relevant_docs"].values())

    table = pq.read_table(stdlib_spec.path)
    assert table.num_rows == 36 and len(set(table.column("label").to_pylist())) == 3
    assert table.column("split").to_pylist().count("train") == 18
    task = make_local_task(stdlib_spec)
    assert set(task.dataset) == {"train", "test"}


def test_stdlib_task_is_decontaminated_and_built_once(tmp_path: Path) -> None:
    """Texts of top-level modules (what the demo trains on) and texts shared by packages are dropped."""
    from kalm.evaluation.local_tasks import build_stdlib_docstring_task, stdlib_docstrings

    lib = tmp_path / "lib"

    def module(path: str, *docs: str) -> None:
        f = lib / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(f"def f{i}():\n    {json.dumps(d)}\n" for i, d in enumerate(docs)))

    trained = "Return the thing that the top-level module also documents."
    module("toplevel.py", trained)
    shared = "Shared text found in both packages."
    module("alpha/__init__.py", trained, "Parse an alpha header into its many fields.", shared)
    module("alpha/tests/test_x.py", "A test docstring that must never be used.")
    module("beta/__init__.py", "Render a beta document to a string of text.", shared)
    module("beta/sub/mod.py", "Open a beta connection to the remote server.")
    assert stdlib_docstrings(lib) == {
        "alpha": ["Parse an alpha header into its many fields."],
        "beta": [
            "Open a beta connection to the remote server.",
            "Render a beta document to a string of text.",
        ],
    }
    root = DataRoot.from_uri(str(tmp_path / "root"))
    spec = build_stdlib_docstring_task(root, per_label=1, stdlib=lib)
    assert pq.read_table(spec.path).num_rows == 2
    module("gamma/__init__.py", "A new package appears after the first build.")
    assert build_stdlib_docstring_task(root, per_label=1, stdlib=lib) == spec
    assert pq.read_table(spec.path).num_rows == 2  # same parameters: the stored task is reused
    build_stdlib_docstring_task(root, per_label=1, stdlib=lib, force=True)
    assert pq.read_table(spec.path).num_rows == 3


def test_classification_task_runs_through_mteb(tmp_path: Path, stdlib_spec: LocalTaskSpec) -> None:
    res = run_eval(minilm(), [], [stdlib_spec], data_root=str(tmp_path / "root"))
    (row,) = res.rows
    assert row["task_type"] == "Classification" and row["metric"] == "accuracy"
    assert row["main_score"] > 1 / 3  # better than chance over 3 packages
    assert row["instruction"].startswith("Classify the Python standard library package")


def test_local_classification_learns_from_the_whole_train_split(stdlib_spec: LocalTaskSpec) -> None:
    """mteb's default probe sees 8 texts per label: on a local set of a few hundred texts its score moves by
    points with small embedding changes. Local tasks train the classifier on every train text instead, and
    that protocol is part of the task's revision (stored scores of the old protocol are not reused)."""
    from collections import Counter

    from kalm.evaluation.local_tasks import PROTOCOL, make_local_task

    task = make_local_task(stdlib_spec)
    train = Counter(task.dataset["train"]["label"])
    assert task.samples_per_label == max(train.values())
    assert task.metadata.dataset["revision"].endswith(f"-p{PROTOCOL}")


def test_classification_without_a_split_is_repeated_cross_validation(
    tmp_path: Path, stdlib_spec: LocalTaskSpec
) -> None:
    """A classification table without a split column (the held-out suite's) is scored by k-fold
    cross-validation repeated with CV_REPEATS fold seeds: every text is a test text once per repeat, the score
    is the mean over all folds, equal to sklearn's logistic regression on the same folds; texts are encoded
    once. The held-out suite's classification task writes no split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold

    from kalm.evaluation.encoder import KalmEncoder
    from kalm.evaluation.heldout import classification
    from kalm.evaluation.local_tasks import CV_FOLDS, CV_REPEATS, make_local_task

    # a multiple of the fold count: mteb reuses the first fold's training order for every fold, so with
    # uneven folds a later fold's last training text would be left out (a one-text quirk, not ours)
    table = pq.read_table(stdlib_spec.path).drop_columns(["split"])
    table = table.slice(0, table.num_rows - table.num_rows % CV_FOLDS)
    path = tmp_path / "cv.parquet"
    pq.write_table(table, path)
    spec = stdlib_spec.model_copy(update={"name": "CvTask", "path": str(path)})
    task = make_local_task(spec)
    assert task.is_cross_validation and task.n_splits == CV_FOLDS and task.cv_repeats == CV_REPEATS
    enc = KalmEncoder(raw_minilm(), instructions=load_instructions(load_eval_config().instructions))
    calls: list[int] = []
    encode = enc.model.encode
    enc.model.encode = lambda texts, **kw: calls.append(len(texts)) or encode(texts, **kw)  # type: ignore[method-assign]
    scores = task.evaluate(enc, "test", encode_kwargs={"batch_size": 32})["default"]
    assert len(scores["scores_per_experiment"]) == CV_FOLDS * CV_REPEATS
    # every text is embedded once, whatever the number of repeats
    assert sum(calls) == len(set(table.column("text").to_pylist()))
    texts, labels = table.column("text").to_pylist(), table.column("label").to_pylist()
    x = enc.encode([{"text": texts}], task_metadata=task.metadata, hf_split="test", hf_subset="default")
    names = sorted(set(labels))
    y = np.array([names.index(v) for v in labels])
    want = []
    for r in range(CV_REPEATS):
        for tr, te in KFold(CV_FOLDS, shuffle=True, random_state=task.seed + r).split(x):
            clf = LogisticRegression(max_iter=100, random_state=task.seed + r).fit(x[tr], y[tr])
            want.append(float((clf.predict(x[te]) == y[te]).mean()))
    assert scores["main_score"] == pytest.approx(float(np.mean(want)), abs=1e-9)
    assert set(classification([("a", "x"), ("b", "y")]) or {}) == {"text", "label"}


def test_a_model_without_a_template_is_scored_on_plain_texts(
    tmp_path: Path, tiny_eval_specs: list[LocalTaskSpec]
) -> None:
    """A base model never trained with instructions gets none (untemplated_models: plain): a comparison
    scores every model as it is meant to be used. ``template`` restores the file's template for it."""
    import yaml

    res = run_eval(raw_minilm(), [], tiny_eval_specs[:1], data_root=str(tmp_path / "a"))
    (row,) = res.rows
    assert (
        row["instruction"] is None and row["instruction_source"].startswith("plain") and row["template"] == ""
    )
    data = yaml.safe_load(Path(load_eval_config().instructions).read_text())
    data["untemplated_models"] = "template"
    ins = tmp_path / "ins.yaml"
    ins.write_text(yaml.safe_dump(data))
    spec = tiny_eval_specs[0].model_copy(update={"instruction": "Find the answer"})
    res = run_eval(raw_minilm(), [], [spec], data_root=str(tmp_path / "b"), instructions=ins)
    (row,) = res.rows
    assert row["instruction"] == "Find the answer" and row["template"].startswith("Instruct:")


def test_the_qwen2_pipeline_scores_the_papers_mteb_benchmarks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/pipeline_qwen2.yaml evaluates MTEB v1 English and Chinese (the paper's tables), besides the
    local suites; offline with an empty cache the stage stops up front in one line naming every task."""
    from kalm.pipeline.config import load_pipeline_config

    pc = load_pipeline_config(Path(CONFIG_DIR) / "pipeline_qwen2.yaml")
    cfg = load_eval_config(Path(CONFIG_DIR) / pc.eval.config)
    assert cfg.tasks == ["MTEB(eng, v1)", "MTEB(cmn, v1)"] and cfg.general_suite and cfg.holdout_tasks
    tasks = resolve_tasks(cfg.tasks)
    assert len(tasks) >= 80 and {"SciFact", "STSBenchmark", "T2Retrieval", "CLSClusteringS2S"} <= {
        t.name for t in tasks
    }
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(
        KalmError, match=r"the data of \d+ MTEB task\(s\) is not in the Hugging Face cache"
    ) as e:
        check_offline(tasks)
    assert "\n" not in str(e.value) and "T2Retrieval" in str(e.value)
