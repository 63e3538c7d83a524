"""Sentence-transformers model folders: validation, their safetensors weight files and structure.

Their content fingerprint is :func:`kalm.core.fingerprint.model_fingerprint`.

A model folder is what ``SentenceTransformer.save`` (or ``kalm.training.model.Embedder.save``) writes:
``modules.json``, ``config_sentence_transformers.json``, the backbone's ``config.json`` and tokenizer files,
and ``*.safetensors`` weights (one file, or shards plus ``*.safetensors.index.json``).

>>> check_model_folder("does/not/exist")
Traceback (most recent call last):
kalm.core.errors.KalmError: model folder not found: does/not/exist
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kalm.core.errors import KalmError
from kalm.core.fingerprint import file_sha256


def check_model_folder(path: str | Path) -> Path:
    """``path`` as a Path; a one-line KalmError unless it is a sentence-transformers folder."""
    if "://" in str(path):
        raise KalmError(f"model folders must be local paths, got {path} (copy the model to local disk first)")
    p = Path(path)
    if not p.exists():
        raise KalmError(f"model folder not found: {p}")
    if not p.is_dir():
        raise KalmError(f"not a folder: {p} (expected a sentence-transformers model folder)")
    if not (p / "modules.json").is_file():
        raise KalmError(f"{p} is not a sentence-transformers model folder: it has no modules.json")
    return p


def weight_files(folder: str | Path) -> list[str]:
    """Relative POSIX paths of the ``*.safetensors`` files of a model folder, sorted.

    e.g. ``["model.safetensors"]``, or ``["2_Dense/model.safetensors", "model.safetensors"]``.
    """
    root = Path(folder)
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.safetensors")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def read_json_file(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when the file is missing, a one-line KalmError when broken."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KalmError(f"{path}: invalid JSON ({err})") from None
    return data if isinstance(data, dict) else {}


# Backbone config keys that may differ between checkpoints of one model without changing what it computes.
VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "torch_dtype", "dtype", "use_cache", "gradient_checkpointing"}
)
# What sentence-transformers assumes for Pooling keys an older version did not write.
POOLING_DEFAULTS = {
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": True,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
    "pooling_mode_weightedmean_tokens": False,
    "pooling_mode_lasttoken": False,
    "include_prompt": True,
}
# Tokenizer files that hold the vocabulary: checkpoints with different ones cannot be averaged.
VOCAB_FILES = (
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _modules(root: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((root / "modules.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KalmError(f"{root / 'modules.json'}: invalid JSON ({err})") from None
    if not isinstance(data, list):
        raise KalmError(f"{root / 'modules.json'}: expected a list of modules")
    return [m for m in data if isinstance(m, dict)]


def model_structure(folder: str | Path) -> dict[str, Any]:
    """What must agree between checkpoints before averaging, beyond the weights' names, shapes and dtypes.

    - ``architectures``, ``model_type``: the backbone's class.
    - ``modules``: the sentence-transformers module layout, by class name only (``...models.Transformer`` and
      ``...base.modules.transformer.Transformer`` are the same module saved by different library versions).
    - ``backbone_config``: the backbone's ``config.json`` without private and volatile keys (so a causal and
      a bidirectional checkpoint, ``is_causal``, never mix); ``module_configs``: every other module's
      ``config.json`` (pooling mode, Dense, Normalize) and the ``sentence_bert_config.json`` files.
    - ``prompts``: ``config_sentence_transformers.json`` prompts (the query template travels with them).
    - ``vocab``: sha256 of the vocabulary files (``VOCAB_FILES``).

    The soup copies the first checkpoint's configs and tokenizer, so any difference here would be silently
    dropped: it is an error instead.

    >>> model_structure(minilm_path)["modules"]  # doctest: +SKIP
    [('', 'Transformer'), ('1_Pooling', 'Pooling'), ('2_Normalize', 'Normalize')]
    """
    root = Path(folder)
    modules_raw = _modules(root)
    modules = [(str(m.get("path", "")), str(m.get("type", "")).rsplit(".", 1)[-1]) for m in modules_raw]
    cfg = _backbone_config(root)
    module_configs: dict[str, Any] = {}
    for path, kind in modules:
        if kind == "Pooling":
            pooling = {**POOLING_DEFAULTS, **read_json_file(root / path / "config.json")}
            module_configs[f"{path}/config.json"] = pooling
        elif kind != "Transformer":
            module_configs[f"{path}/config.json"] = read_json_file(root / path / "config.json")
        else:
            # max_seq_length is how long inputs may be at inference, not part of the weights: the soup
            # keeps the first checkpoint's
            bert = read_json_file(root / path / "sentence_bert_config.json")
            bert.pop("max_seq_length", None)
            module_configs[f"{path}/sentence_bert_config.json".lstrip("/")] = bert
    return {
        "architectures": cfg.get("architectures"),
        "model_type": cfg.get("model_type"),
        "modules": modules,
        "backbone_config": {
            k: v for k, v in cfg.items() if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS
        },
        "module_configs": module_configs,
        "prompts": _prompts(read_json_file(root / "config_sentence_transformers.json")),
        "vocab": _vocab_digest(root),
    }


def _prompts(st_config: dict[str, Any]) -> dict[str, Any]:
    """The prompts, with the raw template under ``query_template`` wherever the folder keeps it."""
    from kalm.training.model import read_query_template

    prompts = dict(st_config.get("prompts") or {})
    template = read_query_template(st_config)
    return {**prompts, "query_template": template} if template else prompts


def _vocab_digest(root: Path) -> str | dict[str, str]:
    """The vocabulary's digest: of the token -> id map the tokenizer loads (so ``vocab.txt`` and the same
    vocabulary inside ``tokenizer.json`` agree), else of the vocabulary files."""
    try:
        from transformers import AutoTokenizer

        vocab = AutoTokenizer.from_pretrained(str(root), local_files_only=True).get_vocab()
    except Exception:  # no loadable tokenizer: compare the files
        return {f: file_sha256(root / f)[:16] for f in VOCAB_FILES if (root / f).is_file()}
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _backbone_config(root: Path) -> dict[str, Any]:
    """The backbone's config.json with every default filled in by its transformers config class, so two
    saves of one model by different library versions (one writing ``add_cross_attention: false``, the
    other leaving it out) compare equal; the raw file when transformers cannot read it."""
    raw = read_json_file(root / "config.json")
    try:
        from transformers import AutoConfig

        full: dict[str, Any] = AutoConfig.from_pretrained(str(root), local_files_only=True).to_dict()
    except Exception:  # an unknown model_type or a broken file: compare what is written
        return raw
    return {**full, "architectures": raw.get("architectures"), "model_type": raw.get("model_type")}


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The first place two JSON-like values differ, as ``key.sub: B != A``; None when equal.

    >>> first_difference({"x": {"y": 1, "z": 2}}, {"x": {"y": 1, "z": 3}})
    'x.z: 3 != 2'
    """
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            sub = f"{where}.{k}" if where else str(k)
            if k not in a or k not in b:
                theirs = repr(b[k]) if k in b else "missing"
                ours = repr(a[k]) if k in a else "missing"
                return f"{sub}: {theirs} != {ours}"
            diff = first_difference(a[k], b[k], sub)
            if diff:
                return diff
        return None
    return None if a == b else f"{where or 'value'}: {b!r} != {a!r}"
