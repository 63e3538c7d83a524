"""Benchmark of the training step (issue #4): our step against sentence-transformers' trainer.

Training samples/s and peak memory of ``kalm.training.train`` (``setup`` + ``train_step``, the code
``kalm train`` runs, under DeepSpeed ZeRO-1 in one process) against ``SentenceTransformerTrainer`` with
``MultipleNegativesRankingLoss`` and ``CachedMultipleNegativesRankingLoss``, on the same model
(all-MiniLM-L6-v2, the packaged ``minilm``), rows, batch, sequence length, optimizer settings, precision
(fp32) and threads, in one run on CPU::

    .venv/bin/python bench/bench_train.py                          # defaults: ~6-10 minutes on 2 cores
    .venv/bin/python bench/bench_train.py --quick                  # smoke run (tiny shapes, 1 repeat)
    .venv/bin/python bench/bench_train.py --only st-mnrl,ours-infonce --repeats 5   # just the headline pair
    .venv/bin/python bench/bench_train.py --profile                # + cProfile of every contender

Contenders (each run in a fresh subprocess, so ``ru_maxrss`` is that contender's own peak RSS):

- ``st-mnrl``: SentenceTransformerTrainer + MultipleNegativesRankingLoss (scale 20 = our τ 0.05);
- ``ours-infonce``: our step with plain InfoNCE (τ 0.05; no focal, no mixing, no Matryoshka): like for like;
- ``ours-full``: our fine-tuning loss (focal γ 0.5, hard-negative mixing k 2, Matryoshka 384/256/128/64):
  what the extra features cost;
- ``st-cmnrl``: the same trainer with CachedMultipleNegativesRankingLoss (``mini_batch_size`` = ``--chunk``);
- ``ours-gradcache``: plain InfoNCE with ``loss.gradcache_chunk_size`` = ``--chunk``, our CMNRL counterpart
  (``kalm.training.train.gradcache_step``: one DeepSpeed micro-step per chunk). The child counts the calls of
  ``GradCache.step``; zero calls means the step did not chunk (printed);
- ``ours-torch``: ``ours-infonce`` with ``deepspeed.initialize`` replaced by a plain-torch engine (same
  AdamW, scheduler and clipping), to separate DeepSpeed's cost from ours. Not what ``kalm train`` runs:
  ``ours-infonce`` is the headline; this one says how much of a gap the DeepSpeed engine explains.

Rows: windows of Python standard-library docstrings, every one longer than ``--max-length`` tokens, so every
sequence of both sides is exactly ``--max-length`` tokens and no side pads more than the other. Queries get
our instruction template; the ST anchors are the very same formatted strings. Ours reads a data root built for
real (ingest + stage mixtures); ST reads a ``datasets.Dataset`` (anchor, positive, negative_1..M) of the same
rows. Both use ``torch.optim.AdamW`` (not fused; lr 2e-5, weight decay 0.01 on matrices only, linear decay,
no warm-up), gradient clipping at 1.0, fp32, sdpa attention, dropout on (train mode), no data workers.

A step's time is the wall time between the ends of consecutive steps (next batch, tokenisation, forward, loss,
backward, optimizer step: everything the loop does); the first ``--warmup`` steps are left out. A run's
samples/s is the batch over its *median* step time (the mean is printed too): on a shared machine one step
slowed by another process would otherwise move the result. Contenders run interleaved (A B C, then C B A,
...) ``--repeats`` times; the summary gives medians over the repeats, their min-max, and the fastest single
step ("best"). Every run also reports how much of the machine's CPUs *other* processes took during its timed
steps (``/proc/stat`` busy time minus the child's own CPU time); above 10% a NOISE line says the ratios carry
that disturbance. Peak memory is the child's ``ru_maxrss`` (imports and model load included); "growth" is the
peak minus the peak before the first step (ours: after ``setup``, DeepSpeed's flat fp32 copies included; ST:
after the trainer is built, before ``train()``), i.e. mostly what the training steps themselves add.

Printed at the end, for each pair ours/peer: ``RATIO ... samples/s`` (the goal, >= 1.0; with the ratio's
range over the repeats), the ratio of the fastest steps, of peak RSS, of RSS growth and of CPU s/step.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = "Given a passage of Python documentation, retrieve passages that explain the same API"
# Run in this order (then reversed): each pair that is compared runs close together in time.
CONTENDERS = ("st-mnrl", "ours-infonce", "ours-torch", "ours-full", "st-cmnrl", "ours-gradcache")
# (ours, peer): the ratios printed at the end, when both ran.
PAIRS = (
    ("ours-infonce", "st-mnrl"),
    ("ours-full", "st-mnrl"),
    ("ours-torch", "st-mnrl"),
    ("ours-gradcache", "st-cmnrl"),
)
SPECS: dict[str, dict[str, Any]] = {
    "st-mnrl": {"kind": "st", "loss": "mnrl"},
    "st-cmnrl": {"kind": "st", "loss": "cmnrl"},
    "ours-infonce": {"kind": "ours", "loss": "plain"},
    "ours-full": {"kind": "ours", "loss": "full"},
    "ours-gradcache": {"kind": "ours", "loss": "gradcache"},
    "ours-torch": {"kind": "ours", "loss": "plain", "engine": "torch"},
}
LR, WEIGHT_DECAY, GRAD_CLIP = 2e-5, 0.01, 1.0
NOISY = 0.10  # share of the machine's CPUs other processes may take during timed steps before a NOISE line
PLAIN_LOSS: dict[str, Any] = {"temperature": 0.05, "focal_gamma": 0.0, "mix_k": 0, "matryoshka": False}
FULL_LOSS: dict[str, Any] = {
    "temperature": 0.05,  # = sentence-transformers' scale 20
    "focal_gamma": 0.5,
    "mix_k": 2,
    "matryoshka": True,
    "matryoshka_dims": [384, 256, 128, 64],
    "matryoshka_weights": [1.0, 0.3, 0.2, 0.1],
}
STDLIB_MODULES = [
    "argparse",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "hashlib",
    "heapq",
    "hmac",
    "http.client",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "selectors",
    "shlex",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "tokenize",
    "traceback",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
]


# ---------------------------------------------------------------------------------------------- data
def stdlib_words() -> list[str]:
    """Every docstring of the listed stdlib modules and their public members, as one word stream."""
    import importlib

    seen: set[int] = set()
    docs: list[str] = []
    for name in STDLIB_MODULES:
        mod = importlib.import_module(name)
        for obj in [mod, *(getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_"))]:
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and id(doc) not in seen and len(doc) > 80:
                seen.add(id(doc))
                docs.append(doc)
    return re.sub(r"\s+", " ", " ".join(docs)).split(" ")


def make_rows(
    n: int, negatives: int, query_words: int, doc_words: int, seed: int = 0
) -> list[dict[str, Any]]:
    """``n`` rows {question, answer, negs}: windows of the docstring stream at distinct random offsets."""
    words = stdlib_words()
    rng = random.Random(seed)
    need = n * (2 + negatives)
    span = len(words) - doc_words - 1
    offsets = rng.sample(range(span), need) if need <= span else [rng.randrange(span) for _ in range(need)]
    texts = [" ".join(words[o : o + doc_words]) for o in offsets]
    texts = [f"{t} [{i}]" for i, t in enumerate(texts)]  # distinct even where windows repeat
    rows = []
    for i in range(n):
        chunk = texts[i * (2 + negatives) : (i + 1) * (2 + negatives)]
        query = " ".join(chunk[0].split(" ")[:query_words]) + f" [{i}]?"
        rows.append({"question": query, "answer": chunk[1], "negs": chunk[2:]})
    return rows


def build_data_root(base: Path, rows: list[dict[str, Any]]) -> str:
    """One fine-tuning recipe, ingested and mixed for real (the path ``kalm.training.train`` reads)."""
    from kalm.core.storage import DataRoot
    from kalm.data.config import IngestConfig
    from kalm.data.ingest import run_ingest_recipe
    from kalm.data.mixtures import run_build_stage
    from kalm.data.recipes import get_recipe

    rec = base / "recipes"
    (rec / "raw").mkdir(parents=True, exist_ok=True)
    with (rec / "raw" / "bench.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (rec / "bench.yaml").write_text(
        "name: bench\ncategory: bench\nstage: finetune\ntask_type: retrieval\n"
        "source: {format: jsonl, path: raw/bench.jsonl}\n"
        "fields: {query: question, pos: answer, neg: negs}\n"
        f"instruction: {INSTRUCTION}\n"
    )
    root = DataRoot.from_uri(str(base / "data"))
    cfg = IngestConfig(near_dedup={"enabled": False})
    m = run_ingest_recipe(get_recipe("bench", [rec]), root, cfg).manifest
    if m["rows_out"] != len(rows):
        raise SystemExit(f"ingest kept {m['rows_out']} of {len(rows)} rows: {m.get('drops')}")
    run_build_stage("finetune", ["bench"], root, cfg)
    return root.uri


def st_columns(rows: list[dict[str, Any]], negatives: int) -> dict[str, list[str]]:
    """(anchor, positive, negative_1..M): anchors formatted exactly as our step formats queries."""
    from kalm.training.instructions import DEFAULT_QUERY_TEMPLATE, format_query

    cols: dict[str, list[str]] = {"anchor": [], "positive": []}
    for j in range(negatives):
        cols[f"negative_{j + 1}"] = []
    for r in rows:
        cols["anchor"].append(format_query(r["question"], INSTRUCTION, DEFAULT_QUERY_TEMPLATE))
        cols["positive"].append(r["answer"])
        for j in range(negatives):
            cols[f"negative_{j + 1}"].append(r["negs"][j])
    return cols


def min_tokens(model_path: str, texts: list[str]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return min(len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"])


# --------------------------------------------------------------------------------------------- child
def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def machine_busy_s() -> float | None:
    """CPU seconds every core of the machine has spent busy since boot (``/proc/stat``); None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


class StepClock:
    """Wall and process-CPU time at the end of every step; the first ``warmup`` steps are left out.

    Also the machine's busy CPU time, so that the CPU the *other* processes took during the timed steps
    (machine busy time minus this process's own) can be reported: a shared machine shows up there.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.wall = [time.perf_counter()]
        self.cpu = [time.process_time()]
        self.busy = [machine_busy_s()]

    def restart(self) -> None:
        self.wall[0], self.cpu[0], self.busy[0] = time.perf_counter(), time.process_time(), machine_busy_s()

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.busy.append(machine_busy_s())

    def stats(self, batch: int) -> dict[str, Any]:
        import torch

        wall, cpu = self.wall[self.warmup :], self.cpu[self.warmup :]
        step_s = [b - a for a, b in zip(wall, wall[1:], strict=False)]
        cpu_s = [b - a for a, b in zip(cpu, cpu[1:], strict=False)]
        span = wall[-1] - wall[0]
        first, last = self.busy[self.warmup], self.busy[-1]
        others = None
        if first is not None and last is not None and span > 0:
            own = cpu[-1] - cpu[0]
            others = max(0.0, (last - first - own) / (span * (os.cpu_count() or 1)))
        return {
            "steps": len(step_s),
            # The median step, not the mean: one step slowed by another process does not move it.
            "samples_per_s": batch / statistics.median(step_s),
            "mean_samples_per_s": batch * len(step_s) / sum(step_s),
            "step_s": step_s,
            "cpu_s_per_step": statistics.median(cpu_s),
            "others_cpu": others,
            "threads": torch.get_num_threads(),
        }


class TorchEngine:
    """Plain-torch stand-in for the DeepSpeed engine: just what ``train_step`` calls (for ``ours-torch``)."""

    def __init__(self, model: Any, optimizer: Any, lr_scheduler: Any, config: dict[str, Any]) -> None:
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.clip = float(config.get("gradient_clipping", 0.0))
        self.norm: Any = None

    def __call__(self, **features: Any) -> Any:
        return self.module(**features)

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: Any) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        if self.clip > 0:
            self.norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> Any:
        return self.norm

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]


def use_torch_engine() -> None:
    """Make ``deepspeed.initialize`` (``kalm.training.train.setup`` calls it) return a TorchEngine."""
    import deepspeed

    def initialize(*, model: Any, optimizer: Any, lr_scheduler: Any, config: dict[str, Any], **_: Any) -> Any:
        return TorchEngine(model, optimizer, lr_scheduler, config), optimizer, None, lr_scheduler

    deepspeed.initialize = initialize


def count_gradcache_steps() -> dict[str, int]:
    """Count ``GradCache.step`` calls (the chunked forward/backward); behaviour unchanged."""
    from kalm.training.losses import GradCache

    calls = {"n": 0}
    original = GradCache.step

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return original(self, *args, **kwargs)

    setattr(GradCache, "step", step)  # noqa: B010  (mypy: no assigning to a method)
    return calls


def optimizer_desc(optimizer: Any) -> str:
    """Class, the kernel choice (fused/foreach: None = torch's default, single-tensor on CPU), lr, decay."""
    d = optimizer.defaults
    decays = sorted({g["weight_decay"] for g in optimizer.param_groups})
    return (
        f"{type(optimizer).__name__} fused={d.get('fused')} foreach={d.get('foreach')} lr={d['lr']:g} "
        f"wd={'/'.join(f'{w:g}' for w in decays)}"
    )


def start_profile(spec: dict[str, Any]) -> Any:
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def stop_profile(profiler: Any, spec: dict[str, Any]) -> None:
    profiler.disable()
    profiler.dump_stats(str(Path(spec["work"]) / f"{spec['name']}-{spec['round']}.prof"))


def child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import yaml

    from kalm.core.storage import DataRoot
    from kalm.training.config import load_train_config
    from kalm.training.train import preflight, setup, train_step

    work = Path(spec["work"]) / f"{spec['name']}-{spec['round']}"
    work.mkdir(parents=True, exist_ok=True)
    loss = {**(FULL_LOSS if spec["loss"] == "full" else PLAIN_LOSS)}
    if spec["loss"] == "gradcache":
        loss["gradcache_chunk_size"] = spec["chunk"]
    cfg_path = work / "train.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "stage": "finetune",
                "run_name": "bench",
                "seed": 0,
                "model": {"path": "minilm", "max_length": spec["max_length"], "attn_implementation": "sdpa"},
                "data": {"source": "mixtures", "group_size": spec["negatives"] + 1},
                "per_device_batch": spec["batch"],
                "loss": loss,
                "optim": {
                    "lr": LR,
                    "warmup_ratio": 0.0,
                    "schedule": "linear",
                    "weight_decay": WEIGHT_DECAY,
                    "grad_clip": GRAD_CLIP,
                },
                "schedule": {"max_steps": spec["warmup"] + spec["steps"], "checkpoint_every": 10**6},
                "precision": "fp32",
                "deepspeed": {"config": f"deepspeed/zero{spec['zero']}.json"},
                "output_dir": str(work / "run"),
            }
        )
    )
    if spec.get("engine") == "torch":
        use_torch_engine()
    gradcache_calls = count_gradcache_steps()
    cfg = load_train_config(cfg_path)
    root = DataRoot.from_uri(spec["root"])
    preflight(cfg, root)
    t = setup(cfg, root, work / "run")
    t.engine.train()
    setup_mb = peak_mb()
    clock = StepClock(spec["warmup"])
    profiler = None
    m: dict[str, Any] = {}
    for i in range(spec["warmup"] + spec["steps"]):
        if spec["profile"] and i == spec["warmup"]:
            profiler = start_profile(spec)
        m = train_step(t)
        clock.tick()
    if profiler is not None:
        stop_profile(profiler, spec)
    loss_cfg: dict[str, Any] = getattr(t.loss_fn, "config", dict)()
    inner = getattr(t.engine, "optimizer", None)
    inner = getattr(inner, "optimizer", inner)  # DeepSpeed's ZeRO wrapper holds the torch optimizer
    return {
        **clock.stats(spec["batch"]),
        "setup_peak_mb": setup_mb,
        "loss": loss_cfg.get("name", type(t.loss_fn).__name__),
        "last_loss": m.get("loss"),
        "gradcache_steps": gradcache_calls["n"],
        "attn": str(getattr(t.model.model.config, "_attn_implementation", "?")),
        "max_seq_length": t.model.max_length,
        "optimizer": optimizer_desc(inner) if inner else "?",
        "engine": type(t.engine).__name__
        + (f" ZeRO-{spec['zero']}" if spec.get("engine") != "torch" else ""),
    }


def child_st(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        import accelerate  # noqa: F401  (SentenceTransformerTrainer needs it)
    except ImportError:
        raise SystemExit("st contenders need `accelerate`: pip install accelerate") from None
    import datasets
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from transformers import TrainerCallback

    from kalm.training.config import resolve_model_path

    work = Path(spec["work"]) / f"{spec['name']}-{spec['round']}"
    work.mkdir(parents=True, exist_ok=True)
    model = SentenceTransformer(
        resolve_model_path("minilm"), device="cpu", model_kwargs={"attn_implementation": "sdpa"}
    )
    model.max_seq_length = spec["max_length"]
    train = datasets.Dataset.from_dict(json.loads(Path(spec["st_data"]).read_text()))
    loss: Any
    if spec["loss"] == "cmnrl":
        loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=spec["chunk"])
    else:
        loss = MultipleNegativesRankingLoss(model, scale=20.0)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "out"),
        per_device_train_batch_size=spec["batch"],
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=LR,
        warmup_steps=0,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=GRAD_CLIP,
        lr_scheduler_type="linear",
        optim="adamw_torch",  # torch.optim.AdamW, not fused: the optimizer our step uses on CPU
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    clock = StepClock(spec["warmup"])
    prof: list[Any] = []

    class StepTimes(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            clock.restart()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.tick()
            if spec["profile"] and len(clock.wall) - 1 == spec["warmup"]:
                prof.append(start_profile(spec))

    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train, loss=loss, callbacks=[StepTimes()]
    )
    setup_mb = peak_mb()
    trainer.train()
    if prof:
        stop_profile(prof[0], spec)
    ran = len(clock.wall) - 1
    if ran != spec["warmup"] + spec["steps"]:
        raise SystemExit(f"expected {spec['warmup'] + spec['steps']} steps, the trainer ran {ran}")
    auto_model: Any = model[0].auto_model
    optimizer: Any = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    return {
        **clock.stats(spec["batch"]),
        "setup_peak_mb": setup_mb,
        "loss": type(loss).__name__,
        "max_seq_length": model.max_seq_length,
        "attn": str(getattr(auto_model.config, "_attn_implementation", "?")),
        "optimizer": optimizer_desc(optimizer),
        "engine": "SentenceTransformerTrainer",
    }


def run_child(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    out = child_ours(spec) if spec["kind"] == "ours" else child_st(spec)
    out["peak_mb"] = peak_mb()
    print("RESULT " + json.dumps(out), flush=True)


# -------------------------------------------------------------------------------------------- parent
def spawn(spec: dict[str, Any], log: Path) -> dict[str, Any]:
    threads = str(spec["threads"])
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",  # same tokenizer threading on both sides
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    env.pop("RANK", None)  # our child becomes a world of one, as `kalm train` does without a launcher
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=f, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{spec['name']} failed (exit {proc.returncode}); stderr tail:\n{tail}")
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def fmt_others(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def run_line(name: str, r: dict[str, Any]) -> str:
    steps = " ".join(f"{s:.2f}" for s in r["step_s"])
    note = ""
    if name == "ours-gradcache" and not r["gradcache_steps"]:
        note = "  NOT CHUNKED: GradCache.step never ran"
    return (
        f"  {name:15s} round {r['round']}: {r['samples_per_s']:6.2f} samples/s "
        f"(mean {r['mean_samples_per_s']:.2f})  peak {r['peak_mb']:6.0f} MB "
        f"(before step 1: {r['setup_peak_mb']:.0f})  step s [{steps}]  cpu s/step {r['cpu_s_per_step']:.2f}  "
        f"other processes {fmt_others(r['others_cpu'])} of the CPUs{note}"
    )


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one contender; the best single step; the worst disturbance."""
    others = [r["others_cpu"] for r in runs if r["others_cpu"] is not None]
    return {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in runs),
        "best_samples_per_s": max(r["batch"] / min(r["step_s"]) for r in runs),
        "peak_mb": statistics.median(r["peak_mb"] for r in runs),
        "growth_mb": statistics.median(r["peak_mb"] - r["setup_peak_mb"] for r in runs),
        "cpu_s_per_step": statistics.median(r["cpu_s_per_step"] for r in runs),
        "spread": (min(r["samples_per_s"] for r in runs), max(r["samples_per_s"] for r in runs)),
        "others_max": max(others) if others else None,
    }


def print_ratios(a: str, b: str, sa: dict[str, Any], sb: dict[str, Any], like_for_like: bool) -> None:
    """ours/peer: samples/s (goal >= 1.0), best step, peak RSS, RSS growth, CPU s/step."""
    speed = sa["samples_per_s"] / sb["samples_per_s"]
    lo, hi = sa["spread"][0] / sb["spread"][1], sa["spread"][1] / sb["spread"][0]
    if not like_for_like:
        verdict = "n/a: NOT like for like, our step did not chunk (see above)"
    elif speed >= 1.0:
        verdict = "ok, goal >= 1.0"
    elif hi >= 1.0:
        verdict = "below 1.0, but within the repeat-to-repeat spread"
    else:
        verdict = "BELOW the 1.0 goal"
    caveat = "" if like_for_like else " (NOT like for like)"
    print(f"RATIO {a}/{b} samples/s: {speed:.2f}x (repeats {lo:.2f}-{hi:.2f}; {verdict})")
    best = sa["best_samples_per_s"] / sb["best_samples_per_s"]
    print(f"RATIO {a}/{b} samples/s of the fastest step: {best:.2f}x{caveat}")
    print(f"RATIO {a}/{b} peak RSS: {sa['peak_mb'] / sb['peak_mb']:.2f}x{caveat}")
    print(f"RATIO {a}/{b} RSS growth in training: {sa['growth_mb'] / sb['growth_mb']:.2f}x{caveat}")
    print(f"RATIO {a}/{b} CPU s/step: {sa['cpu_s_per_step'] / sb['cpu_s_per_step']:.2f}x{caveat}")


def print_profile(path: Path, top: int) -> None:
    import pstats

    print(f"\n--- cProfile of the timed steps: {path.name} (top {top} by cumulative time) ---")
    pstats.Stats(str(path), stream=sys.stdout).sort_stats("cumulative").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per contender (median)")
    ap.add_argument("--batch", type=int, default=32, help="queries per step")
    ap.add_argument("--negatives", type=int, default=2, help="hard negatives per query (>= 2: mixing)")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per sequence (every text reaches it)")
    ap.add_argument("--chunk", type=int, default=16, help="CMNRL mini_batch_size = our gradcache_chunk_size")
    ap.add_argument("--zero", type=int, choices=(1, 2), default=1, help="DeepSpeed ZeRO stage of our step")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, every contender")
    ap.add_argument(
        "--only",
        default="all",
        help=f"comma list of {', '.join(CONTENDERS)}, or 'all' (the default)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 1+2 steps, batch 4, 32 tokens")
    ap.add_argument("--profile", action="store_true", help="cProfile the timed steps and print the top")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        run_child(json.loads(args.child))
        return
    if args.quick:
        args.repeats, args.steps, args.warmup, args.batch, args.max_length, args.chunk = 1, 2, 1, 4, 32, 4
    names = list(CONTENDERS) if args.only == "all" else [n for n in args.only.split(",") if n]
    bad = sorted(set(names) - set(CONTENDERS))
    if bad or len(set(names)) != len(names) or min(args.steps, args.repeats, args.batch) < 1:
        raise SystemExit(
            f"--only: distinct names from {', '.join(CONTENDERS)}; --steps/--repeats/--batch >= 1"
        )
    if "ours-full" in names and args.negatives < 2:
        raise SystemExit("ours-full mixes hard negatives: it needs --negatives >= 2")
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, str(REPO))
    from kalm.training.config import resolve_model_path

    model = resolve_model_path("minilm")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        # One row per query of every step of a run: no row is seen twice within a run.
        n_rows = args.batch * (args.warmup + args.steps)
        # ~1.3 tokens per word in these docstrings: 1.2 x max_length words always overflow max_length.
        doc_words = max(24, int(args.max_length * 1.2))
        rows = make_rows(n_rows, args.negatives, query_words=doc_words, doc_words=doc_words)
        root = build_data_root(work, rows)
        cols = st_columns(rows, args.negatives)
        st_data = work / "st_columns.json"
        st_data.write_text(json.dumps(cols))
        shortest = min_tokens(model, [t for c in cols.values() for t in c])
        if shortest < args.max_length:
            raise SystemExit(f"a text has only {shortest} tokens (< --max-length {args.max_length})")
        print(
            f"bench_train: all-MiniLM-L6-v2, batch {args.batch} x (query + 1 positive + {args.negatives} "
            f"negatives), {args.max_length} tokens each (shortest text {shortest} before truncation), fp32, "
            f"{args.threads} threads, {args.warmup} warm-up + {args.steps} timed steps x {args.repeats} "
            f"interleaved repeats, chunk {args.chunk}, ours under DeepSpeed ZeRO-{args.zero} "
            f"(data built in {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        base = {
            "work": str(work),
            "root": root,
            "st_data": str(st_data),
            "steps": args.steps,
            "warmup": args.warmup,
            "batch": args.batch,
            "negatives": args.negatives,
            "max_length": args.max_length,
            "chunk": args.chunk,
            "zero": args.zero,
            "threads": args.threads,
            "profile": args.profile,
        }
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for rnd in range(args.repeats):
            # A B C, then C B A: a load drift over the run hits every contender alike.
            for name in names if rnd % 2 == 0 else names[::-1]:
                r = spawn({**base, **SPECS[name], "name": name, "round": rnd}, work / f"{name}-{rnd}.log")
                r.update(round=rnd, batch=args.batch)
                runs[name].append(r)
                print(run_line(name, r), flush=True)
        print(
            "\nmedians over the repeats of each run's median step (samples/s: min-max over the repeats; "
            "best: the fastest single step):"
        )
        summary = {n: summarize(rs) for n, rs in runs.items()}
        for n, s in summary.items():
            r = runs[n][0]
            print(
                f"{n:15s} {s['samples_per_s']:6.2f} samples/s ({s['spread'][0]:.2f}-{s['spread'][1]:.2f}, "
                f"best {s['best_samples_per_s']:.2f})  peak RSS {s['peak_mb']:6.0f} MB "
                f"(growth in training {s['growth_mb']:5.0f})  cpu s/step {s['cpu_s_per_step']:.2f}  "
                f"[{r['engine']}, {r['loss']}, attn {r['attn']}, max {r['max_seq_length']} tokens, "
                f"{r['optimizer']}, {r['threads']} threads]"
            )
        for a, b in PAIRS:
            if a in summary and b in summary:
                chunked = a != "ours-gradcache" or any(r["gradcache_steps"] for r in runs[a])
                print_ratios(a, b, summary[a], summary[b], like_for_like=chunked)
        if "ours-gradcache" in runs and not any(r["gradcache_steps"] for r in runs["ours-gradcache"]):
            print(
                "NOTE ours-gradcache: GradCache.step was never called: train_step calls loss_fn(q, p, n), "
                "which for GradCache is the plain loss on full-batch embeddings (no chunking)."
            )
        disturbed = {n: s["others_max"] for n, s in summary.items() if (s["others_max"] or 0) > NOISY}
        if disturbed:
            worst = ", ".join(f"{n} {fmt_others(x)}" for n, x in disturbed.items())
            print(
                f"NOISE: other processes used more than {NOISY:.0%} of the CPUs during the timed steps of "
                f"some runs (worst: {worst}); medians damp that, but only a quiet machine makes a few "
                "percent trustworthy."
            )
        print(f"total {time.perf_counter() - t0:.0f} s")
        if args.profile:
            for prof in sorted(work.glob("*.prof")):
                print_profile(prof, 30)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
