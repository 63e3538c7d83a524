"""The GPU check script (bench/gpu_check.py) runs on a lent GPU machine only, so its code would rot
unseen: its ``--smoke`` mode runs every part at tiny shapes on the CPU here, with the same kalm APIs
(bidirectional Embedder, one fine-tuning step, tiled torch top-k search, the mining Encoder vs
sentence-transformers). A part that needs what this machine lacks (flash-attn, faiss-gpu) must say so as a
skip, never as a figure or a failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU machine runs bench/gpu_check.sh itself"
)


def test_gpu_check_smoke_runs_every_part_on_cpu(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu"
    for part in ("bidirectional", "step", "search", "encode"):
        assert "failed" not in report[part], (part, report[part])
    bidir = report["bidirectional"]
    assert bidir["sdpa"]["ok"] and bidir["sdpa"]["first_token_moves_with_last"]
    assert bidir["flash_attention_2"].get("skipped") or bidir["flash_attention_2"].get("ok")
    assert report["step"]["tokens_per_s"] > 0
    assert report["search"]["torch_s"] > 0 and "skipped" in report["search"]["faiss_gpu"]
    assert report["encode"]["ours_texts_per_s"] > 0 and report["encode"]["st_fp32_texts_per_s"] > 0


def test_gpu_check_refuses_a_full_run_without_a_gpu(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode != 0
    assert (
        out.stderr.strip().splitlines()[-1]
        == "error: no CUDA device (run with --smoke for the CPU self-check)"
    )
    assert not (tmp_path / "gpu_check.json").exists()
