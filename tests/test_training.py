"""Training jobs: config validation, preflight errors, 2-process ZeRO-1/ZeRO-2 runs through the real
launchers, and exact resume after kill -9. Tiny random BERT (hidden 32) so every run takes seconds."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kalm.core.config import CONFIG_DIR
from kalm.core.errors import KalmError
from kalm.core.storage import DataRoot
from kalm.data.config import IngestConfig
from kalm.data.ingest import run_ingest_recipe
from kalm.data.mixtures import run_build_stage
from kalm.data.recipes import get_recipe
from kalm.training.config import load_train_config
from kalm.training.launch import TrainingFailed, launch_command, run_training
from kalm.training.train import preflight

ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from transformers import BertModel

    from kalm.training.model import Embedder
    from tests.conftest import tiny_bert_parts

    path = tmp_path_factory.mktemp("tiny") / "bert"
    tok, cfg = tiny_bert_parts(num_attention_heads=2, max_position_embeddings=128, hidden_dropout_prob=0.1)
    torch.manual_seed(0)
    Embedder(BertModel(cfg), tok, pooling="mean", max_length=48).save(path)
    return path


def _rows(n: int, tag: str, negs: int) -> list[dict]:
    words = [
        "amber",
        "basalt",
        "cinder",
        "dune",
        "ember",
        "fern",
        "granite",
        "heron",
        "iris",
        "jade",
        "kestrel",
        "lichen",
        "moss",
    ]
    out = []
    for i in range(n):
        w = [words[(i * 7 + k * 3) % len(words)] for k in range(5)]
        out.append(
            {
                "question": f"{tag} {i} {' '.join(w)}?",
                "answer": f"{tag} answer {i}: {' '.join(reversed(w))}",
                "negs": [f"{tag} unrelated {i}-{k} {words[k]}" for k in range(negs)],
            }
        )
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """Two finetune recipes (with negatives) and one pretrain recipe, ingested and mixed for real."""
    from tests.conftest import write_jsonl

    base = tmp_path_factory.mktemp("train")
    rec = base / "recipes"
    for name, stage, negs in (("tr_a", "finetune", 3), ("tr_b", "finetune", 2), ("tr_p", "pretrain", 0)):
        write_jsonl(rec / "raw" / f"{name}.jsonl", _rows(40, name, negs))
        (rec / f"{name}.yaml").write_text(
            f"name: {name}\ncategory: {name}\nstage: {stage}\ntask_type: retrieval\n"
            f"source: {{format: jsonl, path: raw/{name}.jsonl}}\n"
            "fields: {query: question, pos: answer, neg: negs}\n"
            "instruction: Retrieve the answer\n"
        )
    root = DataRoot.from_uri(str(base / "data"))
    cfg = IngestConfig(shard_rows=25, near_dedup={"enabled": False})
    for name in ("tr_a", "tr_b", "tr_p"):
        run_ingest_recipe(get_recipe(name, [rec]), root, cfg)
    run_build_stage("finetune", ["tr_a", "tr_b"], root, cfg)
    run_build_stage("pretrain", ["tr_p"], root, cfg)
    return root.uri


def train(config: Path, data_root: str, **kw) -> Path:
    """``kalm train`` as code: parse the config once, launch, return the final model folder."""
    return Path(run_training(load_train_config(config), DataRoot.from_uri(data_root), **kw).output)


def _config(tmp_path: Path, tiny_model: Path, **over) -> Path:
    cfg = {
        "stage": "finetune",
        "run_name": "t",
        "seed": 3,
        "model": {"path": str(tiny_model), "max_length": 48},
        "data": {"source": "mixtures", "group_size": 3},
        "per_device_batch": 4,
        "loss": {"temperature": 0.05, "matryoshka_dims": [32, 16], "matryoshka_weights": [1.0, 0.5]},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.2},
        "schedule": {"max_steps": 6, "checkpoint_every": 2},
        "precision": "fp32",
        "output_dir": str(tmp_path / "run"),
    }
    for k, v in over.items():
        cur = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            cur = cur.setdefault(p, {})
        cur[leaf] = v
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if p.name.startswith(("pre", "fine")))
)
def test_shipped_configs_load(name: str) -> None:
    cfg = load_train_config(CONFIG_DIR / name)
    assert cfg.stage in name
    if "qwen2" in name and cfg.stage == "finetune":
        assert cfg.data.group_size == 8 and cfg.loss["temperature"] == 0.01 and cfg.per_device_batch == 48
        assert cfg.loss["matryoshka_dims"] == [896, 512, 256, 128, 64]


def test_config_errors_before_launch(tmp_path: Path, tiny_model: Path, data_root: str) -> None:
    root = DataRoot.from_uri(data_root)
    bad = _config(tmp_path, tiny_model)
    bad.write_text(bad.read_text() + "learning_rate: 0.1\n")
    with pytest.raises(KalmError, match="unknown key 'learning_rate'"):
        load_train_config(bad)
    with pytest.raises(KalmError, match="unknown loss option"):
        load_train_config(_config(tmp_path, tiny_model, loss={"focal_gama": 1}))
    with pytest.raises(KalmError, match="64"):
        preflight(
            load_train_config(_config(tmp_path, tiny_model, **{"loss.matryoshka_dims": [64, 16]})), root
        )
    with pytest.raises(KalmError, match="model not found"):
        preflight(
            load_train_config(_config(tmp_path, tiny_model, **{"model.path": str(tmp_path / "nope")})), root
        )
    with pytest.raises(KalmError, match="needs hard negatives"):
        cfg = _config(tmp_path, tiny_model, stage="pretrain", **{"data.group_size": 4})
        preflight(load_train_config(cfg), root)
    with pytest.raises(KalmError, match="missing or incomplete"):
        preflight(load_train_config(_config(tmp_path, tiny_model, **{"data.recipes": ["ghost"]})), root)
    with pytest.raises(KalmError, match="distills a teacher's scores: train on data.source 'scored'"):
        preflight(load_train_config(_config(tmp_path, tiny_model, **{"loss.distill_alpha": 1.0})), root)


def test_launch_mistakes_are_one_line_and_relative_paths_work(
    tmp_path: Path, tiny_model: Path, data_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each mistake a worker would fail on is one line (exit 2, no traceback) before any process starts;
    a relative --config, output folder, model and DeepSpeed config resolve from the caller's directory."""
    from typer.testing import CliRunner

    from kalm.cli import app

    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copytree(tiny_model, work / "model")
    pickled = work / "pickled"
    shutil.copytree(tiny_model, pickled)
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    (work / "ds.json").write_text('{"zero_optimization": {"stage": 1}}')
    (work / "broken.json").write_text("{not json")
    monkeypatch.chdir(work)
    _config(
        work, Path("model"), **{"output_dir": "run", "schedule.max_steps": 2, "deepspeed.config": "ds.json"}
    )
    args = ["train", "--config", "train.yaml", "--data-root", data_root, "--launcher", "single"]
    cases = {
        "deepspeed.config=missing.json": "DeepSpeed config not found: missing.json",
        "deepspeed.config=broken.json": "is not valid JSON",
        f"model.path={pickled}": "has only pickle weights (pytorch_model.bin)",
        "data.group_size=2": "needs at least 2: set data.group_size >= 3",
    }
    for setting, msg in cases.items():
        res = CliRunner().invoke(app, [*args, "--set", setting], env=ENV)
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (
            setting,
            res.output,
        )
    res = CliRunner().invoke(app, [*args, "--nproc", "0"], env=ENV)
    assert res.exit_code == 2 and "nproc" in res.output and "Traceback" not in res.output
    assert not (work / "run").exists()  # nothing launched, nothing written
    res = CliRunner().invoke(app, args, env=ENV)
    assert res.exit_code == 0, res.output
    assert (work / "run" / "final" / "kalm_run.json").exists()
    resolved = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert resolved["deepspeed"]["config"] == str(work / "ds.json")
    assert resolved["model"]["path"] == str(work / "model") and resolved["output_dir"] == str(work / "run")


def test_launch_commands(tmp_path: Path) -> None:
    single = launch_command("c.yaml", "d", launcher="auto", nproc=1)
    assert single[1:3] == ["-m", "kalm.training.train"] and "--set" not in single
    assert single[3:] == ["--config", "c.yaml", "--data-root", "d"]
    ds = launch_command("c.yaml", "d", launcher="auto", nproc=2)
    assert ds[0].endswith("deepspeed") and "--num_gpus" in ds and "--module" in ds
    hf = tmp_path / "hostfile"
    hf.write_text("worker-1 slots=8\nworker-2 slots=8\n")
    multi = launch_command("c.yaml", "d", launcher="deepspeed", hostfile=str(hf))
    assert "--hostfile" in multi and "--num_gpus" not in multi
    tr = launch_command("c.yaml", "d", launcher="torchrun", nproc=2)
    assert "torch.distributed.run" in tr and "--nproc_per_node" in tr


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(str(final / "model.safetensors"))


@pytest.mark.parametrize("zero, launcher", [(1, "torchrun"), (2, "deepspeed")])
def test_two_process_zero(tmp_path: Path, tiny_model: Path, data_root: str, zero: int, launcher: str) -> None:
    cfg = _config(tmp_path, tiny_model, **{"deepspeed.zero_stage": zero, "schedule.max_steps": 3})
    final = train(cfg, data_root, nproc=2, launcher=launcher, env=ENV)
    run = json.loads((final / "kalm_run.json").read_text())
    assert run["world_size"] == 2 and run["steps"] == 3
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] > 0 for m in metrics)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    if importlib.util.find_spec("tensorboard"):  # rank 0's TensorBoard events: the same steps
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tmp_path / "run" / "tb"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    # the model changed and loads in sentence-transformers
    from sentence_transformers import SentenceTransformer

    before, after = _weights(tiny_model), _weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    emb = SentenceTransformer(str(final), device="cpu").encode(["hello world"])
    assert emb.shape == (1, 32)


@pytest.mark.slow
def test_resume_skips_a_checkpoint_cut_short_by_a_kill(
    tmp_path: Path, tiny_model: Path, data_root: str
) -> None:
    """DeepSpeed's ``latest`` may name a checkpoint a kill -9 cut short (seen when the kill lands while it
    saves): resume then takes the newest COMPLETE one and reaches the same weights."""
    from kalm.training.checkpoints import CHECKPOINT_DONE

    cfg = _config(tmp_path, tiny_model, **{"schedule.max_steps": 6, "schedule.checkpoint_every": 2})
    final = train(cfg, data_root, launcher="single", env=ENV)
    want = _weights(final)
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    assert sorted(p.parent.name for p in ckpt.glob(f"*/{CHECKPOINT_DONE}")) == [
        "step00000004",
        "step00000006",
    ]
    # as if killed while saving step 6: its marker never written, a file half there; `latest` names it
    (ckpt / "step00000006" / CHECKPOINT_DONE).unlink()
    for f in (ckpt / "step00000006").glob("*model_states.pt"):
        f.write_bytes(f.read_bytes()[:100])
    assert (ckpt / "latest").read_text().strip() == "step00000006"
    shutil.rmtree(run / "final")
    (run / "_manifest.json").unlink()
    resumed = train(cfg, data_root, launcher="single", env=ENV)
    got = _weights(resumed)
    for k in want:
        torch.testing.assert_close(want[k], got[k], rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 5-6 redone from the step-4 checkpoint, logged once


class _Planted:
    """A pickle that runs code when loaded (writes a file named by ``sentinel``)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.sentinel}",))


def test_planted_checkpoint_is_refused_and_never_runs(
    tmp_path: Path, tiny_model: Path, data_root: str
) -> None:
    """A checkpoint file replaced by another pickle: refused in one line before any process starts (its
    checksum differs); with its checksum forged too, the worker's weights-only load refuses it. The
    planted code never runs either way."""
    import pickle

    from kalm.training.checkpoints import CHECKPOINT_DONE, checkpoint_files

    cfg = _config(tmp_path, tiny_model, **{"schedule.max_steps": 4, "schedule.checkpoint_every": 2})
    train(cfg, data_root, launcher="single", env=ENV)
    run = tmp_path / "run"
    shutil.rmtree(run / "final")  # so that the next run resumes from the step-4 checkpoint
    (run / "_manifest.json").unlink()
    tag = run / "checkpoints" / "step00000004"
    sentinel = tmp_path / "planted-code-ran"
    (tag / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps({"module": _Planted(sentinel)}))
    with pytest.raises(
        KalmError, match=r"step00000004 is not what this job wrote \(changed or missing: mp_rank"
    ):
        train(cfg, data_root, launcher="single", env=ENV)
    marker = json.loads((tag / CHECKPOINT_DONE).read_text())
    (tag / CHECKPOINT_DONE).write_text(json.dumps({**marker, "files": checkpoint_files(tag)}))  # forged
    with pytest.raises(
        TrainingFailed, match="refusing to load .*mp_rank_00_model_states.pt: not a plain checkpoint"
    ):
        train(cfg, data_root, launcher="single", env=ENV)
    assert not sentinel.exists()


@pytest.mark.slow
def test_exact_resume_after_kill(tmp_path: Path, tiny_model: Path, data_root: str) -> None:
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full_dir.mkdir()
    killed_dir.mkdir()
    steps = 24  # long enough that a loaded machine still kills it mid-run (after the step-4 checkpoint)
    over = {
        "schedule.max_steps": steps,
        "schedule.checkpoint_every": 2,
        "loss.mix_k": 2,
        "loss.focal_gamma": 0.5,
    }
    cfg_full = _config(full_dir, tiny_model, **over)
    cfg_killed = _config(killed_dir, tiny_model, **over)
    env = {**os.environ, **ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    uninterrupted = train(cfg_full, data_root, launcher="single", env=ENV)

    cmd = launch_command(str(cfg_killed), data_root, launcher="single")
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = killed_dir / "run" / "checkpoints"
    deadline = time.time() + 240
    # old checkpoints are pruned (keep_checkpoints), so wait for any step >= 4 rather than step 4 itself
    while time.time() < deadline and not any(
        int(d.name[4:]) >= 4 for d in ckpt.glob("step*") if d.name[4:].isdigit()
    ):  # (the kill may still land while a later checkpoint is being saved: resume must cope)
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9, mid-run
    proc.wait()
    assert not (killed_dir / "run" / "final").exists(), "the job finished before it could be killed"
    resumed = train(cfg_killed, data_root, launcher="single", env=ENV)
    a, b = _weights(uninterrupted), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    ma = [json.loads(x) for x in (full_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (killed_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in mb] == list(range(1, steps + 1))
    assert [round(m["loss"], 5) for m in ma] == [round(m["loss"], 5) for m in mb]
    assert [m["source"] for m in ma] == [m["source"] for m in mb]  # the same batch order
    if importlib.util.find_spec("tensorboard"):  # the resumed run's events: each step once
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(killed_dir / "run" / "tb"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, steps + 1))
    # an unchanged rerun is a cache hit: no process is launched, the final model is untouched
    stamp = (uninterrupted / "model.safetensors").stat().st_mtime_ns
    again = run_training(
        load_train_config(cfg_full), DataRoot.from_uri(data_root), launcher="single", env=ENV
    )
    assert again.cached and Path(again.output) == uninterrupted
    assert (uninterrupted / "model.safetensors").stat().st_mtime_ns == stamp
    # a changed config under the same run name never deletes the finished model: refused in one line...
    cfg_full.write_text(cfg_full.read_text().replace("seed: 3", "seed: 4"))
    digest = hashlib.sha256((uninterrupted / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(KalmError, match="holds a finished model of another config.*--overwrite"):
        train(cfg_full, data_root, launcher="single", env=ENV)
    # ...and with --overwrite, a new job that fails puts the old model back
    with pytest.raises(TrainingFailed):
        train(
            cfg_full, data_root, launcher="single", env={**ENV, "DS_ACCELERATOR": "no-such"}, overwrite=True
        )
    assert hashlib.sha256((uninterrupted / "model.safetensors").read_bytes()).hexdigest() == digest
    assert not (full_dir / "run" / ".previous").exists()
    cfg_full.write_text(cfg_full.read_text().replace("seed: 4", "seed: 3"))
    assert run_training(load_train_config(cfg_full), DataRoot.from_uri(data_root), launcher="single").cached
    # a new job that finishes replaces it, starting fresh instead of resuming the old checkpoints
    cfg_full.write_text(cfg_full.read_text().replace("seed: 3", "seed: 4"))
    reseeded = train(cfg_full, data_root, launcher="single", env=ENV, overwrite=True)
    assert not torch.equal(
        _weights(reseeded)["embeddings.word_embeddings.weight"], a["embeddings.word_embeddings.weight"]
    )
    assert not (full_dir / "run" / ".previous").exists()


@pytest.mark.slow
@pytest.mark.parametrize("zero,nproc", [(1, 1), (2, 2)])
def test_gradcache_job_equals_the_full_batch_job(
    tmp_path: Path, tiny_model: Path, data_root: str, zero: int, nproc: int
) -> None:
    """loss.gradcache_chunk_size: chunked embedding + one DeepSpeed micro-step per chunk gives the same
    losses and weights as the full-batch step (dropout off, so both see the same network)."""
    import shutil

    model = tmp_path / "nodrop"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(cfg))
    over = {"schedule.max_steps": 3, "schedule.checkpoint_every": 3, "deepspeed.zero_stage": zero}
    runs = {}
    for name, extra in (("full", {}), ("cached", {"loss.gradcache_chunk_size": 3})):
        (tmp_path / name).mkdir()
        path = _config(tmp_path / name, model, **over, **extra)
        runs[name] = train(path, data_root, nproc=nproc, launcher="torchrun", env=ENV)
    metrics = {
        name: [json.loads(x) for x in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        for name in runs
    }
    # per rank: 4 queries, 4 positives, 8 negatives in chunks of 3 -> 2 + 2 + 3 backward passes per step
    assert [m["backward_passes"] for m in metrics["cached"]] == [7, 7, 7]
    assert [m["backward_passes"] for m in metrics["full"]] == [1, 1, 1]
    for a, b in zip(metrics["full"], metrics["cached"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and a["source"] == b["source"]
        # Adam hides a constant gradient scale in the weights; the norm does not
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    wa, wb = _weights(runs["full"]), _weights(runs["cached"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=2e-5)


def test_set_values_reach_the_worker_typed_and_null_stays_null(
    tmp_path: Path, tiny_model: Path, data_root: str
) -> None:
    """``kalm train --set``: values are YAML-typed and validated once; the worker reads one resolved config
    file, so ``null`` arrives as None (not the string 'None'), ints as ints, floats as floats, lists as
    lists. Before, ``--set data.recipes=null`` passed the parent's check and failed in every worker."""
    from typer.testing import CliRunner

    from kalm.cli import app

    cfg = _config(tmp_path, tiny_model, **{"data.recipes": ["tr_a"], "schedule.max_steps": 6})
    sets = [
        "data.recipes=null",  # every finetune recipe again
        "schedule.max_steps=2",
        "schedule.checkpoint_every=2",
        "loss.temperature=0.07",
        "loss.matryoshka_dims=[32, 8]",
        "launch.launcher=single",
    ]
    args = ["train", "--config", str(cfg), "--data-root", data_root]
    res = CliRunner().invoke(app, [*args, *(x for s in sets for x in ("--set", s))], env=ENV)
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    # what the worker parsed: the run's manifest (the model folder's kalm_run.json holds relative paths)
    worker = json.loads((run / "_manifest.json").read_text())["config"]
    for seen in (resolved, worker):
        assert seen["data"]["recipes"] is None
        assert seen["schedule"]["max_steps"] == 2 and isinstance(seen["schedule"]["max_steps"], int)
        assert seen["loss"]["temperature"] == 0.07 and seen["loss"]["matryoshka_dims"] == [32, 8]
        assert seen["model"]["path"] == str(tiny_model) and seen["output_dir"] == str(run)
    assert json.loads((run / "final" / "kalm_run.json").read_text())["sources"] == ["tr_a", "tr_b"]
    # a mistake in a value or a key path is one line, before any process starts
    bad = CliRunner().invoke(app, [*args, "--set", "schedule.max_steps=many"], env=ENV)
    assert bad.exit_code == 2 and "max_steps" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(app, [*args, "--set", "stage.x=1"], env=ENV)
    assert bad.exit_code == 2 and "not a mapping" in bad.output
    # a changed value under the same run name: refused in one line, the finished model kept
    other = [*args, *(x for s in sets for x in ("--set", s)), "--set", "loss.temperature=0.08"]
    bad = CliRunner().invoke(app, other, env=ENV)
    assert bad.exit_code == 2 and "--overwrite" in bad.output and "Traceback" not in bad.output
    assert (run / "final" / "kalm_run.json").exists()


def test_instructions_follow_the_initial_models_convention(
    tmp_path: Path, tiny_model: Path, data_root: str
) -> None:
    """``model.instructions: auto``: a sentence-transformers model saved without a query template (trained
    on bare texts, as all-MiniLM-L6-v2) trains on bare texts and is saved without a template, so evaluation
    and mining score it on plain texts; a folder with a template and a raw transformers backbone (a decoder
    becoming an embedder) train with instructions. ``false`` with a ``query_template`` is a config error."""
    from types import SimpleNamespace

    from transformers import AutoModel, AutoTokenizer

    from kalm.evaluation.instructions import model_query_template
    from kalm.mining.encode import load_encoder
    from kalm.training.instructions import DEFAULT_QUERY_TEMPLATE
    from kalm.training.model import Embedder, uses_instructions
    from kalm.training.sampler import Batch
    from kalm.training.train import format_batch

    bare = tmp_path / "bare"
    plain = Embedder.from_pretrained(tiny_model)
    plain.query_template = None
    plain.save(bare)
    raw = tmp_path / "raw"  # a plain transformers folder: no modules.json
    AutoModel.from_pretrained(tiny_model).save_pretrained(raw)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(raw)
    assert uses_instructions(tiny_model) and uses_instructions(raw) and not uses_instructions(bare)
    assert uses_instructions(bare, True) and not uses_instructions(tiny_model, False)
    prompted = tmp_path / "prompted"  # a model that ships prompts of its own (e5-style) is instructed
    shutil.copytree(bare, prompted)
    st_cfg = json.loads((prompted / "config_sentence_transformers.json").read_text())
    st_cfg["prompts"] = {"query": "query: ", "document": ""}
    (prompted / "config_sentence_transformers.json").write_text(json.dumps(st_cfg))
    assert uses_instructions(prompted)
    assert Embedder.from_pretrained(bare).query_template == DEFAULT_QUERY_TEMPLATE  # to add instructions
    assert Embedder.from_pretrained(bare, untemplated="plain").query_template is None

    # what the loss sees: bare queries and symmetric documents for an un-instructed model
    batch = Batch(["q?"], [["p", "n"]], ["Retrieve"], [True], ["tr_a"], 0)
    q, docs = format_batch(SimpleNamespace(model=SimpleNamespace(query_template=None)), batch)
    assert q == ["q?"] and docs == [["p", "n"]]
    instructed = SimpleNamespace(model=SimpleNamespace(query_template=DEFAULT_QUERY_TEMPLATE))
    q, docs = format_batch(instructed, batch)
    assert q[0].startswith("Instruct: Retrieve") and docs[0][0].startswith("Instruct: Retrieve")

    steps = {"schedule.max_steps": 2, "schedule.checkpoint_every": 2, "launch.launcher": "single"}
    final = train(_config(tmp_path, bare, **steps), data_root)
    assert model_query_template(final) is None  # scored on plain texts
    assert load_encoder(str(final)).format_query("q?", "Retrieve") == "q?"  # mined on plain texts
    final = train(
        _config(tmp_path, bare, output_dir=str(tmp_path / "run2"), **steps, **{"model.instructions": True}),
        data_root,
    )
    assert model_query_template(final) == DEFAULT_QUERY_TEMPLATE
    assert load_encoder(str(final)).format_query("q?", "R") == "Instruct: R \n Query: q?"
    both = {"model.instructions": False, "model.query_template": "{instruction}: {query}"}
    with pytest.raises(KalmError, match="query_template is set but model.instructions is false"):
        load_train_config(_config(tmp_path, bare, **both))


def test_dev_evaluation_during_training_keeps_the_best_model(
    tmp_path: Path, tiny_model: Path, data_root: str
) -> None:
    """dev.every 1: a dev MRR@10 in every step's metrics, the best step's model in <run>/best/ with its
    score, and with dev.final best that model is final/ (fingerprint equal), recorded in kalm_run.json."""
    from kalm.core.fingerprint import model_fingerprint
    from tests.conftest import write_jsonl

    dev = tmp_path / "dev.jsonl"
    write_jsonl(dev, [{"query": r["question"], "pos": [r["answer"]]} for r in _rows(12, "dev", 0)])
    cfg = _config(
        tmp_path,
        tiny_model,
        **{"schedule.max_steps": 4, "dev.every": 1, "dev.path": str(dev), "dev.final": "best"},
    )
    final = train(cfg, data_root, launcher="single", env=ENV)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scores = [m["dev_mrr10"] for m in metrics]
    assert len(scores) == 4 and all(0 < s <= 1 for s in scores)
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert (
        best["score"] == max(scores) and best["step"] == scores.index(max(scores)) + 1 and best["rows"] == 12
    )
    assert model_fingerprint(final) == model_fingerprint(tmp_path / "run" / "best")
    run = json.loads((final / "kalm_run.json").read_text())
    assert run["dev"]["step"] == best["step"] and run["dev"]["final"] == "best"
