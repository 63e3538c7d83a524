#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a lent GPU machine: under 8 minutes on one H100/H200.
# Usage (the `device` tool runs it from the repository root): bash bench/gpu_check.sh
set -euo pipefail
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
timeout 470 "$PY" bench/gpu_check.py --out "${OUT:-.}"
