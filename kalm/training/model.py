"""Any ``transformers`` backbone as a sentence embedder: encoders as they are, decoders made bidirectional.

METHOD.md [paper]: the causal mask is removed (every token attends to every non-pad token), embeddings are
the mean of the last hidden states over non-pad tokens, L2-normalised; similarity is cosine.

>>> emb = Embedder.from_pretrained(path)                      # an ST folder, an HF folder or a hub id
>>> vecs = emb.encode(["what is bm25?"], instruction="Given a query, retrieve passages")   # (1, D) float32
>>> emb.save("out/model")                                     # SentenceTransformer("out/model") agrees

Decoders: ``is_causal=False`` goes on the config (in transformers 5 the mask builders read it, for eager and
sdpa alike, and it survives ``save_pretrained``), and the ``is_causal`` flag of every attention module is
cleared too, because fast kernels (sdpa without a mask, flash-attn) take that flag instead of a mask.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kalm.core.errors import KalmError
from kalm.training.instructions import (
    DEFAULT_QUERY_TEMPLATE,
    default_prompt_table,
    format_query,
    validate_template,
)
from kalm.training.pooling import POOLINGS, normalize, truncate

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512  # METHOD.md [paper: code]: max length 512 in the authors' fine-tuning script
QUERY_TEMPLATE_PROMPT = "query_template"  # where folders written before 2026-12-04 kept the raw template
# The raw template now sits beside ``prompts`` (a top-level key sentence-transformers keeps and ignores):
# ``prompts`` holds only concrete prefixes, so ``encode(prompt_name=...)`` reproduces our format.
TEMPLATE_KEY = "kalm_query_template"


def saved_prompts(folder: str | os.PathLike[str]) -> dict[str, str]:
    """The non-empty prompts of a saved folder's ``config_sentence_transformers.json``."""
    prompts = _read_json(Path(folder) / "config_sentence_transformers.json").get("prompts") or {}
    return {k: v for k, v in prompts.items() if isinstance(v, str) and v}


def read_query_template(st_config: dict[str, Any]) -> str | None:
    """The raw query template of a folder's ``config_sentence_transformers.json`` (either location)."""
    prompts = st_config.get("prompts") or {}
    return st_config.get(TEMPLATE_KEY) or prompts.get(QUERY_TEMPLATE_PROMPT) or None


# Our pooling name -> the legacy sentence-transformers flag; the legacy format loads in ST 2.x to 6.x.
_ST_POOLING_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
_ST_ALL_FLAGS = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the positions of its unpadded self.

    attention_mask (B, T) -> (B, T) int64; pads get 0 (left) or repeat the last position (right).

    >>> position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])).tolist()
    [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def has_causal_attention(model: nn.Module) -> bool:
    """True when some attention module still declares itself causal (decoder LLMs; BERT says False)."""
    return any(getattr(m, "is_causal", None) is True for m in model.modules())


def make_bidirectional(model: PreTrainedModel) -> int:
    """Turn a decoder's causal mask off for real; returns how many attention modules were changed.

    ``config.is_causal = False`` is what the transformers 5 mask builders read (eager and sdpa); the module
    flags are what sdpa-without-mask and flash-attn read. Patching only the flags leaves eager causal.
    """
    configs = [model.config]
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        configs.append(text_config)
    for cfg in configs:
        cfg.is_causal = False
    changed = 0
    for module in model.modules():
        if getattr(module, "is_causal", None) is True:
            setattr(module, "is_causal", False)  # noqa: B010  (mypy: not a declared Module attribute)
            changed += 1
    return changed


def _resolve_dir(path_or_id: str | os.PathLike[str]) -> Path:
    """A local folder as is; a hub id through the local cache (honours ``HF_HUB_OFFLINE``)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_id)))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def declared_max_length(path_or_id: str | os.PathLike[str]) -> int | None:
    """The input length a model folder declares for inference (sentence-transformers config, or the
    tokenizer's ``model_max_length`` when it is a real number), without loading the model."""
    layout = _read_st_layout(_resolve_dir(path_or_id))
    if layout["max_length"]:
        return int(layout["max_length"])
    tok = _read_json(Path(layout["model_dir"]) / "tokenizer_config.json").get("model_max_length")
    return int(tok) if isinstance(tok, int | float) and 0 < tok <= 100_000 else None


def _read_st_layout(root: Path) -> dict[str, Any]:
    """What a sentence-transformers folder says: transformer subfolder, pooling, max length, query template.

    Returns ``{"model_dir", "pooling", "max_length", "template", "prompts", "is_st"}``; a plain
    transformers folder gives ``model_dir=root``, Nones, no prompts and ``is_st=False``.
    """
    layout: dict[str, Any] = {
        "model_dir": root,
        "pooling": None,
        "max_length": None,
        "template": None,
        "prompts": {},
        "is_st": False,
    }
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return layout
    layout["is_st"] = True
    for entry in json.loads(modules_file.read_text(encoding="utf-8")):
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        sub = root / entry.get("path", "")
        if kind == "Transformer":
            layout["model_dir"] = sub
            layout["max_length"] = _read_json(sub / "sentence_bert_config.json").get("max_seq_length")
        elif kind == "Pooling":
            cfg = _read_json(sub / "config.json")
            mode = cfg.get("pooling_mode")  # ST >= 6 writes one string; older versions write flags
            if mode is None:
                on = [name for name, flag in _ST_POOLING_FLAGS.items() if cfg.get(flag)]
                mode = on[0] if len(on) == 1 else None
            if mode not in POOLINGS:
                raise ValueError(f"{sub}: pooling {cfg} is not one of ours ({', '.join(POOLINGS)})")
            layout["pooling"] = mode
    st_config = _read_json(root / "config_sentence_transformers.json")
    layout["template"] = read_query_template(st_config)
    layout["prompts"] = st_config.get("prompts") or {}
    return layout


def uses_instructions(path_or_id: str | os.PathLike[str], setting: bool | str = "auto") -> bool:
    """Whether training from this model puts instructions on queries (``model.instructions``).

    ``"auto"``: the model's own convention. A sentence-transformers folder with a query template keeps it;
    a plain transformers backbone (no ``modules.json``: a decoder LLM about to become an embedder, as in
    KaLM) learns instructions from the start, and so does one that ships prompts of its own (trained with
    them); a sentence-transformers model with neither was trained on bare texts and stays bare: teaching
    it a few instructions in a short fine-tune cost the demo 7.5 points of held-out classification after
    pre-training alone (docs/model_and_losses.md).
    """
    return _uses_instructions(_read_st_layout(_resolve_dir(path_or_id)), setting)


def is_sentence_embedder(path_or_id: str | os.PathLike[str]) -> bool:
    """Whether a model already is a sentence embedder (a sentence-transformers folder with ``modules.json``)
    rather than a plain transformers backbone, read from its files without loading it. A hub id is decided
    from its ``modules.json`` alone (cached, or fetched when online); ValueError when that cannot be told."""
    if Path(path_or_id).is_dir():
        return bool(_read_st_layout(Path(path_or_id))["is_st"])
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        hf_hub_download(str(path_or_id), "modules.json")
    except LocalEntryNotFoundError as err:  # offline and not cached (a subclass of the next one)
        raise ValueError(f"cannot tell whether {path_or_id} is a sentence embedder offline ({err})") from None
    except EntryNotFoundError:  # the repo has no modules.json: a plain backbone
        return False
    except Exception as err:  # offline and not cached, unknown repo, no network
        raise ValueError(f"cannot tell whether {path_or_id} is a sentence embedder ({err})") from None
    return True


def _uses_instructions(layout: dict[str, Any], setting: bool | str) -> bool:
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"instructions must be true, false or 'auto', got {setting!r}")
    # a model that ships prompts of its own (e5-style "query: ", per-task instructions) was trained with
    # them: an instructed model, only not in our template
    own_prompts = any(str(v).strip() for v in layout["prompts"].values())
    return layout["template"] is not None or not layout["is_st"] or own_prompts


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def assert_bidirectional(model: PreTrainedModel) -> None:
    """Fail loudly when attention is still causal: the first token's state must change when only the last
    token does. (transformers < 5.2 ignores ``config.is_causal`` and would silently train causally.)"""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 8:
        return
    param = next(model.parameters())
    ids = torch.tensor([[3, 4, 5], [3, 4, 6]], device=param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
    finally:
        model.train(was_training)
    first = out.last_hidden_state[:, 0].float()
    if torch.allclose(first[0], first[1], rtol=0, atol=1e-6):
        import transformers

        raise KalmError(
            f"attention is still causal after making {type(model).__name__} bidirectional (transformers "
            f"{transformers.__version__}: kalm needs >= 5.2, whose mask builders read config.is_causal)"
        )


class Embedder(nn.Module):
    """A backbone plus pooling plus L2 normalisation. ``forward`` maps token ids to (B, D) unit vectors.

    Build it with :meth:`from_pretrained`; ``model`` and ``tokenizer`` are the plain transformers objects.
    ``is_decoder`` is True when the backbone was causal and has been made bidirectional.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pooling: str = "mean",
        max_length: int = DEFAULT_MAX_LENGTH,
        query_template: str | None = DEFAULT_QUERY_TEMPLATE,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r} (allowed: {', '.join(POOLINGS)})")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = int(max_length)
        # None: an un-instructed model (texts always bare, no template saved; scored on plain texts)
        self.query_template = None if query_template is None else validate_template(query_template)
        self.is_decoder = getattr(model.config, "is_causal", None) is False or has_causal_attention(model)
        if self.is_decoder:
            changed = make_bidirectional(model)
            log.info("bidirectional attention: config.is_causal=False, %d attention modules cleared", changed)
            assert_bidirectional(model)
        if tokenizer.pad_token is None:
            # Decoder tokenizers often lack a pad token; any id works because pads are masked out everywhere.
            fallback = tokenizer.eos_token or tokenizer.unk_token
            if fallback is None:
                raise ValueError("tokenizer has no pad, eos or unk token to pad with")
            tokenizer.pad_token = fallback
        forward_params = inspect.signature(model.forward).parameters
        self._pass_position_ids = "position_ids" in forward_params
        self._pass_use_cache = "use_cache" in forward_params

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str],
        *,
        attn_implementation: str | None = None,
        torch_dtype: torch.dtype | None = None,
        pooling: str | None = None,
        max_length: int | None = None,
        query_template: str | None = None,
        padding_side: str = "right",
        device: str | torch.device | None = None,
        untemplated: Literal["default", "plain"] = "default",
        instructions: bool | str | None = None,
    ) -> Embedder:
        """Load an encoder or a decoder; weights from safetensors only (never pickles).

        ``pooling``, ``max_length`` and ``query_template`` default to what a sentence-transformers folder
        saved (max length: ``sentence_bert_config.json``, or the tokenizer's ``model_max_length`` in ST >= 6
        folders), else to mean pooling, 512 tokens and :data:`DEFAULT_QUERY_TEMPLATE`. ``padding_side`` is the
        tokenizer's; embeddings do not depend on it (position ids are computed from the mask).
        ``untemplated="plain"`` keeps a folder without its own template un-instructed (``query_template``
        None: texts stay bare), as evaluation scores such a model; "default" gives it the default template
        (what a training run that adds instructions starts from). ``instructions`` (a training run's
        ``model.instructions``: true, false or "auto", see :func:`uses_instructions`) decides that from the
        folder instead; when it says no, the model is un-instructed whatever template the folder carries.
        """
        layout = _read_st_layout(_resolve_dir(path_or_id))
        model_dir: Path = layout["model_dir"]
        kwargs: dict[str, Any] = {"use_safetensors": True}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        model = AutoModel.from_pretrained(model_dir, config=AutoConfig.from_pretrained(model_dir), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tokenizer.padding_side = padding_side
        # sentence-transformers >= 6 keeps max_seq_length in the tokenizer's model_max_length.
        st6_length = (
            layout["is_st"] and layout["max_length"] is None and tokenizer.model_max_length <= 100_000
        )
        if max_length is None and st6_length:
            max_length = int(tokenizer.model_max_length)
        if instructions is not None and not _uses_instructions(layout, instructions):
            template = None
        else:
            plain = untemplated == "plain" and instructions is None
            template = query_template or layout["template"] or (None if plain else DEFAULT_QUERY_TEMPLATE)
        embedder = cls(
            model,
            tokenizer,
            pooling=pooling or layout["pooling"] or "mean",
            max_length=max_length or layout["max_length"] or DEFAULT_MAX_LENGTH,
            query_template=template,
        )
        if device is not None:
            embedder.to(device)
        return embedder

    # -- properties -------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embedding_dim(self) -> int:
        """The model width D (also the largest Matryoshka dim)."""
        return int(self.model.config.get_text_config().hidden_size)

    # -- forward ---------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Pad to the longest text, cut at ``max_length`` -> {"input_ids", "attention_mask"}, (B, T) each."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def token_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Last hidden states. input_ids, attention_mask (B, T) -> (B, T, H)."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._pass_position_ids:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        if self._pass_use_cache:
            kwargs["use_cache"] = False
        return self.model(**kwargs).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask (B, T) -> (B, D) float32 unit vectors."""
        hidden = self.token_states(input_ids, attention_mask)
        return normalize(POOLINGS[self.pooling](hidden, attention_mask))

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        instruction: str | None = None,
        dim: int | None = None,
    ) -> np.ndarray:
        """Embed texts in length-sorted batches -> (len(texts), dim or D) float32, rows in input order.

        ``instruction`` fills the query template (pass it for queries, and for documents of symmetric
        tasks); ``dim`` truncates Matryoshka-style and renormalises.
        """
        width = dim or self.embedding_dim
        if not texts:
            return np.zeros((0, width), dtype=np.float32)
        formatted = [format_query(t, instruction, self.query_template) for t in texts]
        # Longest first: similar lengths share a batch (less padding), and an OOM shows up at once.
        order = sorted(range(len(formatted)), key=lambda i: -len(formatted[i]))
        out = np.empty((len(formatted), width), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                vecs = self(**self.tokenize([formatted[i] for i in idx]))
                if dim is not None:
                    vecs = truncate(vecs, dim)
                out[idx] = vecs.float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    # -- training switches ------------------------------------------------------------------------------

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward (non-reentrant: replays dropout RNG, needs no input grads)."""
        kwargs = {"use_reentrant": False}
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # -- persistence ------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], prompts: dict[str, str] | None = None) -> Path:
        """Write a sentence-transformers folder (legacy module names, readable by ST 2.x to 6.x and mteb).

        Layout: transformer files at the root (``config.json`` with ``is_causal: false`` for decoders,
        ``model.safetensors``, tokenizer files, ``sentence_bert_config.json``), ``1_Pooling/config.json``,
        ``2_Normalize/``, ``modules.json`` and ``config_sentence_transformers.json``: the raw query
        template under ``kalm_query_template`` and, in ``prompts``, concrete prefixes only (``prompts``, or
        for a model with a template the pinned evaluation instructions as a table,
        :func:`kalm.training.instructions.st_prompt_table`: ``SciFact-query``, ``Clustering``, ``query``,
        ...), so plain ``SentenceTransformer.encode(prompt_name=...)`` and mteb format queries as we do;
        ``default_prompt_name`` stays unset. Written to a temporary sibling, then renamed, so a crash never
        leaves a half-written model at ``path``.
        """
        if prompts is None and self.query_template:
            prompts = default_prompt_table(self.query_template)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            self._write_st_folder(tmp, prompts or {})
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old)
            else:
                tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved embedder to %s (pooling=%s, decoder=%s)", target, self.pooling, self.is_decoder)
        return target

    def _write_st_folder(self, root: Path, prompts: dict[str, str]) -> None:
        def dump(rel: str, obj: Any) -> None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

        self.model.save_pretrained(root)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # every call passes its own; the last call's must not change the file
            backend.no_truncation()
            backend.no_padding()
        self.tokenizer.save_pretrained(root)
        dump("sentence_bert_config.json", {"max_seq_length": self.max_length, "do_lower_case": False})
        pooling_cfg: dict[str, Any] = {"word_embedding_dimension": self.embedding_dim}
        pooling_cfg.update({flag: flag == _ST_POOLING_FLAGS[self.pooling] for flag in _ST_ALL_FLAGS})
        pooling_cfg["include_prompt"] = True  # the instruction tokens are pooled too (our choice)
        dump("1_Pooling/config.json", pooling_cfg)
        (root / "2_Normalize").mkdir(exist_ok=True)
        modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
        dump(
            "modules.json",
            [
                {"idx": i, "name": str(i), "path": sub, "type": f"sentence_transformers.models.{kind}"}
                for i, (sub, kind) in enumerate(modules)
            ],
        )
        dump(
            "config_sentence_transformers.json",
            {
                "__version__": {
                    "sentence_transformers": _package_version("sentence-transformers"),
                    "transformers": _package_version("transformers"),
                    "pytorch": torch.__version__,
                },
                "prompts": prompts,
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
                **({TEMPLATE_KEY: self.query_template} if self.query_template else {}),
            },
        )
