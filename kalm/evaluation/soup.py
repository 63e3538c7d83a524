"""Model soup: average the weights of several fine-tuned checkpoints (METHOD.md stage 3; LM-Cocktail,
Wortsman et al. 2022 "Model soups").

Three methods, by short name in ``SOUP_METHODS``:

- ``uniform``: the plain mean of all checkpoints.
- ``weighted``: ``sum_i w_i * theta_i / sum_i w_i`` with given non-negative weights.
- ``greedy``: candidates ordered by their own dev score; each is added to the soup only if the soup's dev
  score does not drop (``>=``). Needs a ``dev_score(model_folder) -> float`` callable, e.g.
  :class:`kalm.evaluation.scoring.DevScorer`. Uniform and weighted soups take one too, optionally: then
  the record also holds each input's and the soup's dev score.

Checkpoints are sentence-transformers folders with safetensors weights. Before averaging, every checkpoint
must match the first one in architecture, module layout, weight files, tensor names, shapes and dtypes; the
first mismatch is a one-line KalmError. Floating-point tensors are averaged in float64 and cast back to their
dtype; integer and bool tensors (e.g. BERT's ``position_ids``) are copied from the first checkpoint.

Memory: a running sum, finer-grained than "one checkpoint at a time": for each tensor name, the checkpoints'
tensors are read one after another from memory-mapped files (``safe_open``) into one float64 accumulator. At
most one input tensor, one accumulator and the output shard being written are in memory, whatever the number
of checkpoints; a whole-model float64 accumulator (8 bytes per parameter) is never built.

>>> rec = run_soup("uniform", ["ckpt/seed1", "ckpt/seed2"], "out/soup")
>>> rec["weights"], sorted(os.listdir("out/soup"))[:3]
([0.5, 0.5], ['1_Pooling', 'config.json', 'config_sentence_transformers.json'])
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kalm.core.errors import KalmError
from kalm.core.fingerprint import model_fingerprint
from kalm.core.results import StageResult
from kalm.evaluation.checkpoints import (
    check_model_folder,
    first_difference,
    model_structure,
    read_json_file,
    weight_files,
)

log = logging.getLogger(__name__)

SOUP_RECORD = "soup.json"
SOUP_FORMAT_VERSION = 1
# safetensors dtype names that are averaged; every other dtype (I64, I32, BOOL, U8, ...) is copied.
FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Never copied from the first checkpoint: stale weights in other formats would shadow the soup's
# safetensors in some loaders, and trainer state does not describe the soup.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
_SKIP_NAMES = frozenset(
    {SOUP_RECORD, "kalm_run.json", "README.md", "trainer_state.json", "training_args.bin"}
)

# dev_score(model folder) -> a number, higher is better. An optional ``key`` attribute (a str naming the
# tasks, data and settings it scores on) lets an unchanged greedy soup be reused on a rerun.
DevScore = Callable[[Path], float]


@dataclass(frozen=True)
class TensorInfo:
    """Header of one stored tensor: safetensors dtype name and shape, e.g. ``TensorInfo("F32", (384,))``."""

    dtype: str
    shape: tuple[int, ...]


Layout = dict[str, dict[str, TensorInfo]]  # weight file -> tensor name -> header


def read_layout(folder: Path) -> Layout:
    """Tensor headers of every safetensors file of a folder, without loading any tensor data."""
    files = weight_files(folder)
    if not files:
        extra = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = f" (found {', '.join(sorted(extra))}: re-save it with safetensors)" if extra else ""
        raise KalmError(f"{folder} has no *.safetensors weights{hint}")
    layout: Layout = {}
    for rel in files:
        try:
            with safe_open(str(folder / rel), framework="pt") as f:
                layout[rel] = {
                    k: TensorInfo(f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                    for k in sorted(f.keys())
                }
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise KalmError(f"{folder / rel}: unreadable safetensors file ({err})") from None
    return layout


def _first_mismatch(a: Layout, b: Layout) -> str | None:
    """Describe the first difference between two layouts (files, keys, shapes, dtypes), or None."""
    if sorted(a) != sorted(b):
        return f"weight files {sorted(b)} != {sorted(a)}"
    for rel in sorted(a):
        ka, kb = a[rel], b[rel]
        # a non-float buffer one save wrote and another did not (position_ids) is copied from the first
        missing = sorted(k for k in set(ka) - set(kb) if ka[k].dtype in FLOAT_DTYPES)
        extra = sorted(k for k in set(kb) - set(ka) if kb[k].dtype in FLOAT_DTYPES)
        if missing:
            return f"tensor '{missing[0]}' of {rel} is missing"
        if extra:
            return f"unexpected tensor '{extra[0]}' in {rel}"
        for key in sorted(set(ka) & set(kb)):
            if ka[key].shape != kb[key].shape:
                return f"tensor '{key}' has shape {list(kb[key].shape)} != {list(ka[key].shape)}"
            if ka[key].dtype != kb[key].dtype:
                return f"tensor '{key}' has dtype {kb[key].dtype} != {ka[key].dtype}"
    return None


def check_compatible(checkpoints: Sequence[str | Path]) -> tuple[list[Path], Layout]:
    """Validate that all checkpoints can be averaged; return their paths and the shared layout.

    Raises a one-line KalmError naming the first checkpoint that differs from the first one and how:
    architecture, module layout, backbone or module config, prompts, vocabulary (``model_structure``),
    weight files, a missing/extra tensor, a shape or a dtype.
    """
    if not checkpoints:
        raise KalmError("a soup needs at least one checkpoint")
    paths = [check_model_folder(c) for c in checkpoints]
    ref, ref_struct, ref_layout = paths[0], model_structure(paths[0]), read_layout(paths[0])
    for p in paths[1:]:
        struct = model_structure(p)
        for key in ("architectures", "model_type", "modules"):
            if struct[key] != ref_struct[key]:
                raise KalmError(
                    f"checkpoints do not match: {p} has {key} {struct[key]} but {ref} has {ref_struct[key]}"
                )
        for key in ("backbone_config", "module_configs", "prompts", "vocab"):
            if key == "prompts" and not (ref_struct[key] and struct[key]):
                continue  # a base model without prompts merges with a trained one: the soup keeps the first's
            diff = first_difference(ref_struct[key], struct[key])
            if diff:
                raise KalmError(f"checkpoints do not match: in {p} (vs {ref}), {key} {diff}")
        problem = _first_mismatch(ref_layout, read_layout(p))
        if problem:
            raise KalmError(f"checkpoints do not match: in {p} (vs {ref}), {problem}")
    return paths, ref_layout


def _copy_non_weight_files(src: Path, dst: Path) -> None:
    """The first checkpoint's configs, tokenizer, pooling and other module folders, without weights."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n.endswith(_SKIP_SUFFIXES) or n in _SKIP_NAMES or n.startswith(".")}

    shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)


def average_into(
    checkpoints: Sequence[Path], weights: Sequence[float], layout: Layout, out: Path
) -> dict[str, Any]:
    """Write ``sum_i w_i * theta_i / sum_i w_i`` of compatible checkpoints as a model folder at ``out``.

    ``weights``: one non-negative number per checkpoint, not all zero (zero-weight checkpoints are never
    read). ``out`` must not exist; it is built in a sibling temporary folder and renamed into place.
    Returns counts of averaged and copied tensors, and copied (non-float) tensors that differed.

    Exactness: float32 inputs summed in float64 are exact, so one checkpoint, or N identical ones, gives
    back the checkpoint bit for bit.
    """
    if len(weights) != len(checkpoints):
        raise KalmError(f"got {len(weights)} weights for {len(checkpoints)} checkpoints")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise KalmError(f"soup weights must be non-negative and not all zero, got {list(weights)}")
    used = [(c, float(w)) for c, w in zip(checkpoints, weights, strict=True) if w > 0]
    total = sum(w for _, w in used)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    averaged = copied = 0
    differing: list[str] = []
    try:
        _copy_non_weight_files(checkpoints[0], tmp)
        for rel, tensors in layout.items():
            with contextlib.ExitStack() as stack:
                handles = [stack.enter_context(safe_open(str(c / rel), framework="pt")) for c, _ in used]
                first = stack.enter_context(safe_open(str(checkpoints[0] / rel), framework="pt"))
                result: dict[str, torch.Tensor] = {}
                for key, info in tensors.items():
                    if info.dtype in FLOAT_DTYPES:
                        acc: torch.Tensor | None = None
                        for h, (_, w) in zip(handles, used, strict=True):
                            t = h.get_tensor(key).to(torch.float64)
                            acc = t.mul_(w) if acc is None else acc.add_(t, alpha=w)
                        assert acc is not None  # `used` is never empty (checked above)
                        result[key] = acc.div_(total).to(FLOAT_DTYPES[info.dtype]).contiguous()
                        averaged += 1
                    else:
                        # integer/bool buffers (position ids, masks) are not parameters: copy, never average
                        result[key] = first.get_tensor(key)
                        if any(
                            key in h.keys()  # noqa: SIM118 (a safetensors handle, not a dict)
                            and not torch.equal(h.get_tensor(key), result[key])
                            for h in handles
                        ):
                            differing.append(key)
                        copied += 1
                metadata = first.metadata() or {"format": "pt"}
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            save_file(result, str(tmp / rel), metadata=metadata)
            del result
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if differing:
        log.warning("non-float tensors differ between checkpoints, copied from the first: %s", differing)
    return {"tensors_averaged": averaged, "tensors_copied": copied, "copied_but_differing": differing}


class SoupMethod(Protocol):
    def __call__(
        self,
        checkpoints: list[Path],
        layout: Layout,
        out: Path,
        *,
        weights: Sequence[float] | None = None,
        dev_score: DevScore | None = None,
    ) -> dict[str, Any]: ...


def uniform_soup(
    checkpoints: list[Path],
    layout: Layout,
    out: Path,
    *,
    weights: Sequence[float] | None = None,
    dev_score: DevScore | None = None,
) -> dict[str, Any]:
    """The mean of all checkpoints; ``weights`` must be None."""
    if weights is not None:
        raise KalmError("the uniform soup takes no weights (use --method weighted)")
    n = len(checkpoints)
    stats = average_into(checkpoints, [1.0] * n, layout, out)
    return {"weights": [1.0 / n] * n, **stats, **_dev_record(checkpoints, out, dev_score)}


def weighted_soup(
    checkpoints: list[Path],
    layout: Layout,
    out: Path,
    *,
    weights: Sequence[float] | None = None,
    dev_score: DevScore | None = None,
) -> dict[str, Any]:
    """``sum_i w_i theta_i / sum_i w_i``; weights are normalised to sum to 1 in the record."""
    if weights is None:
        raise KalmError("the weighted soup needs one weight per checkpoint (--weight W, repeated)")
    stats = average_into(checkpoints, list(weights), layout, out)
    total = float(sum(weights))
    return {
        "weights": [float(w) / total for w in weights],
        "raw_weights": list(map(float, weights)),
        **stats,
        **_dev_record(checkpoints, out, dev_score),
    }


def _dev_record(checkpoints: list[Path], out: Path, dev_score: DevScore | None) -> dict[str, Any]:
    """Each input's and the soup's dev score, when a dev score is given (uniform and weighted soups)."""
    if dev_score is None:
        return {}
    return {"dev_scores": [float(dev_score(c)) for c in checkpoints], "soup_dev_score": float(dev_score(out))}


def greedy_soup(
    checkpoints: list[Path],
    layout: Layout,
    out: Path,
    *,
    weights: Sequence[float] | None = None,
    dev_score: DevScore | None = None,
) -> dict[str, Any]:
    """Greedy soup (Wortsman et al. 2022): best candidate first, then add each if the dev score does not drop.

    Candidates are ranked by their own dev score (ties keep input order). The running soup is always the
    uniform mean of the accepted ingredients. Each trial soup is built in a temporary sibling folder and
    scored; the last accepted one becomes ``out``. Cost: N + (N - 1) dev evaluations.
    """
    if dev_score is None:
        raise KalmError("the greedy soup needs a dev score (configured evaluation tasks)")
    if weights is not None:
        raise KalmError("the greedy soup takes no weights: it chooses them")
    solo = [float(dev_score(c)) for c in checkpoints]
    for c, s in zip(checkpoints, solo, strict=True):
        log.info("greedy soup: candidate %s dev score %.5f", c, s)
    order = sorted(range(len(checkpoints)), key=lambda i: -solo[i])  # stable: ties keep input order
    chosen = [order[0]]
    best = solo[order[0]]
    steps: list[dict[str, Any]] = [
        {"candidate": str(checkpoints[order[0]]), "soup_score": best, "accepted": True}
    ]
    work = out.parent / f".{out.name}.greedy-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    accepted_dir: Path | None = None
    stats: dict[str, Any] = {}
    try:
        for i in order[1:]:
            trial = work / f"trial-{len(steps)}"
            trial_set = chosen + [i]
            trial_stats = average_into(
                [checkpoints[j] for j in trial_set], [1.0] * len(trial_set), layout, trial
            )
            score = float(dev_score(trial))
            accepted = score >= best
            steps.append({"candidate": str(checkpoints[i]), "soup_score": score, "accepted": accepted})
            log.info(
                "greedy soup: + %s -> %.5f (%s, best %.5f)",
                checkpoints[i],
                score,
                "kept" if accepted else "dropped",
                best,
            )
            if accepted:
                chosen, best, stats = trial_set, score, trial_stats
                if accepted_dir is not None:
                    shutil.rmtree(accepted_dir)
                accepted_dir = trial
            else:
                shutil.rmtree(trial)
        if accepted_dir is not None:
            accepted_dir.rename(out)
        else:  # nothing joined the best candidate: the soup is that checkpoint (an exact copy)
            stats = average_into([checkpoints[chosen[0]]], [1.0], layout, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    w = [1.0 / len(chosen) if i in chosen else 0.0 for i in range(len(checkpoints))]
    return {"weights": w, "dev_scores": solo, "greedy_steps": steps, "soup_dev_score": best, **stats}


SOUP_METHODS: dict[str, SoupMethod] = {
    "uniform": uniform_soup,
    "weighted": weighted_soup,
    "greedy": greedy_soup,
}


def _check_out(out: Path, inputs: Sequence[Path]) -> None:
    """``out`` is deleted and rebuilt: it must be neither an input nor inside or around one."""
    o = out.resolve()
    for p in inputs:
        r = p.resolve()
        if o == r or o in r.parents or r in o.parents:
            raise KalmError(f"the soup's --out {out} overlaps its input {p}: choose another folder")


def run_soup(
    method: str,
    checkpoints: Sequence[str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    dev_score: DevScore | None = None,
    force: bool = False,
    base: str | Path | None = None,
    base_weight: float = 0.0,
) -> StageResult:
    """Build a soup at ``out`` (a sentence-transformers folder) plus ``out/soup.json`` (the manifest).

    ``base``/``base_weight``: then interpolate the soup with the model training started from,
    ``(1 - w)·soup + w·base`` (LM-Cocktail, WiSE-FT: a fine-tuned embedder merged with its general-purpose
    base keeps most of the in-domain gain and much of the base's out-of-domain quality). The soup's configs,
    prompts and tokenizer are the fine-tuned checkpoints'; the base must match their weights' layout.

    The record holds the method, the inputs (paths and fingerprints), the weights (normalised; 0 for greedy
    rejects), dev scores where a dev score was given (always for greedy), tensor counts and the soup's own
    fingerprint. A rerun with the same method, inputs, weights and (greedy) dev key finds the record and
    returns it without work (``cached``); ``force`` rebuilds. An existing ``out`` that is not such a soup is
    never overwritten.

    >>> run_soup("uniform", ["ckpt/a", "ckpt/b"], "out/soup").cached  # doctest: +SKIP
    False
    """
    if method not in SOUP_METHODS:
        raise KalmError(f"unknown soup method {method!r} (allowed: {', '.join(SOUP_METHODS)})")
    out_p = Path(out)
    if "://" in str(out):
        raise KalmError(f"the soup's output must be a local folder, got {out}")
    t0 = time.perf_counter()
    if not 0.0 <= base_weight < 1.0:
        raise KalmError(f"base_weight must be in [0, 1), got {base_weight}")
    if base_weight > 0 and base is None:
        raise KalmError("base_weight > 0 needs a base model (--base)")
    paths, layout = check_compatible(checkpoints)
    base_p = Path(base) if base is not None and base_weight > 0 else None
    if base_p is not None:
        check_compatible([paths[0], base_p])
    _check_out(out_p, paths + ([base_p] if base_p is not None else []))
    # paths relative to the soup folder (a tree moved or copied elsewhere keeps them true); the
    # fingerprints are what identify the inputs
    inputs = [{"path": _rel(p, out_p), "fingerprint": model_fingerprint(p)} for p in paths]
    base_rec = (
        {"path": _rel(base_p, out_p), "fingerprint": model_fingerprint(base_p), "weight": base_weight}
        if base_p is not None
        else None
    )
    dev_key = getattr(dev_score, "key", None) if dev_score is not None else None
    if out_p.exists():
        prev = read_json_file(out_p / SOUP_RECORD)
        same = (
            prev.get("method") == method
            and prev.get("inputs") == inputs
            and (method != "weighted" or prev.get("raw_weights") == [float(w) for w in weights or []])
            # greedy: the same choice needs the same dev tasks; an unkeyed dev score is never trusted
            and (method != "greedy" or (dev_key is not None and prev.get("dev_key") == dev_key))
            and prev.get("base") == base_rec
            and prev.get("fingerprint") == _fingerprint_or_none(out_p)
        )
        if same and not force:
            log.info("soup %s is up to date (%s of %d checkpoints)", out_p, method, len(paths))
            return _result(out_p, prev, True, t0)
        if not prev and any(out_p.iterdir()):
            raise KalmError(f"output folder {out_p} exists and is not a soup: choose another --out")
        shutil.rmtree(out_p)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    log.info("soup %s of %d checkpoints -> %s", method, len(paths), out_p)
    result = SOUP_METHODS[method](paths, layout, out_p, weights=weights, dev_score=dev_score)
    if base_p is not None:
        merged = out_p.parent / f".{out_p.name}.base-{uuid.uuid4().hex[:8]}"
        average_into([out_p, base_p], [1.0 - base_weight, base_weight], layout, merged)
        shutil.rmtree(out_p)
        merged.rename(out_p)
        log.info("soup merged with its base %s (weight %.2f)", base_p, base_weight)
    record = {
        "format_version": SOUP_FORMAT_VERSION,
        "method": method,
        "inputs": inputs,
        "base": base_rec,
        **result,
        "dev_key": dev_key,
        "fingerprint": model_fingerprint(out_p),
        "seconds": round(time.perf_counter() - t0, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out_p / SOUP_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    _write_soup_card(out_p, record, paths[0])
    return _result(out_p, record, False, t0)


def _rel(path: Path, out: Path) -> str:
    """``path`` relative to the soup folder ``out`` (POSIX separators)."""
    return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()


def soup_input_path(out: str | Path, recorded: str) -> Path:
    """A path a soup record holds, made absolute again (records before this format held absolute ones)."""
    p = Path(recorded)
    return p if p.is_absolute() else (Path(out) / p).resolve()


def _write_soup_card(out: Path, record: dict[str, Any], first: Path) -> None:
    """The soup's model card: its first checkpoint's training facts plus the soup's inputs and weights."""
    from kalm.core.modelcard import soup_card, write_card
    from kalm.training.model import saved_prompts

    run = read_json_file(first / "kalm_run.json")
    # a training run's checkpoint lies at <data root>/runs/<stage>/<run>/final: paths relative to the root
    root = first.resolve().parents[3] if run.get("run_name") and len(first.resolve().parents) > 3 else None
    absolute = {
        **record,
        "inputs": [{**i, "path": str(soup_input_path(out, i["path"]))} for i in record.get("inputs") or []],
        "base": {**record["base"], "path": str(soup_input_path(out, record["base"]["path"]))}
        if record.get("base")
        else None,
    }
    write_card(out, soup_card(absolute, run, root, saved_prompts(out)))


def _result(out: Path, record: dict[str, Any], cached: bool, t0: float) -> StageResult:
    return StageResult(
        stage="soup",
        name=out.name,
        outputs=[str(out)],
        cached=cached,
        seconds=round(time.perf_counter() - t0, 3),
        lineage={
            "method": record.get("method"),
            "inputs": record.get("inputs"),
            "weights": record.get("weights"),
            "base": record.get("base"),
            "fingerprint": record.get("fingerprint"),
        },
        manifest=record,
    )


def _fingerprint_or_none(folder: Path) -> str | None:
    """The folder's fingerprint, or None when it is not a loadable model folder (a half-deleted soup)."""
    try:
        return model_fingerprint(folder)
    except KalmError:
        return None
