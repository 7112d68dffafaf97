#!/usr/bin/env bash
# Run the strategy benchmark on one CUDA GPU: ViT-B-16 at 224 px, random weights, bf16 autocast.
#
# Prints the training, expert-scaling and evaluation tables of benchmarks/bench_strategies.py and
# writes them as JSON (default runs/bench_strategies_cuda.json, or $OUT). Extra arguments go to the
# benchmark, for example --no-baselines or --steps 10. The run is capped at 290 s; on one
# H100/H200-class GPU it should take about 2-4 minutes (an estimate: it has not been timed yet).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
    PYTHON=python3
fi
OUT="${OUT:-runs/bench_strategies_cuda.json}"

"$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("error: torch.cuda.is_available() is False; run benchmarks/gpu_check.sh on a machine with a CUDA GPU.")
print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16 supported: {torch.cuda.is_bf16_supported()}")
PY

timeout 290 "$PYTHON" benchmarks/bench_strategies.py \
    --device cuda --model ViT-B-16 --precision bf16 --out "$OUT" "$@"
