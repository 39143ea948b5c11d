#!/usr/bin/env bash
# One prepared GPU benchmark for a lent machine (see bench/gpu.py). Finishes in about 8 minutes on an H100.
#   device run, carry [".whl"]:  bash bench/gpu.sh            (results in $OUT/gpu.json and $OUT/gpu.log)
#   here, without a GPU:         bash bench/gpu.sh --dry-run   (tiny widths on the CPU; only checks the script)
#   quantized FLUX.1-dev (issue 16), its own device command (~8 min): bash bench/gpu.sh --quant
#                                (results in $OUT/quant-gpu.json and $OUT/quant-gpu.log; see bench/quant_gpu.py)
# Carries .whl/diffusers-*.whl (and an xformers wheel matching the machine's torch, if one is there).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/cache}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [[ "${1:-}" == "--dry-run" ]]; then
    PY="${PYTHON:-.venv/bin/python}"
    HF_HUB_OFFLINE=1 "$PY" bench/gpu.py --dry-run --configs sd15-b1,sdxl-b1 --out "$OUT/gpu-dry.json"
    HF_HUB_OFFLINE=1 "$PY" bench/quant_gpu.py --tiny --steps 1 --out "$OUT/quant-gpu-dry.json"
    exit 0
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [[ "${1:-}" == "--quant" ]]; then  # rows stop starting after 420 s; the JSON is rewritten after each row
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/quant-gpu.log"
    timeout 510 "$PY" bench/quant_gpu.py --budget-s 420 --out "$OUT/quant-gpu.json" 2>&1 | tee -a "$OUT/quant-gpu.log" || true
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.log"
# SD 1.5 first (batch 1 and 4, with --compile and diffusers fp32), then SDXL without compile
# (its compile alone takes minutes); each run writes gpu*.json as it goes, so a timeout keeps what ran.
timeout 330 "$PY" bench/gpu.py --configs sd15-b1,sd15-b4 --steps 20 --variants compile,fp32 \
    --out "$OUT/gpu-sd15.json" 2>&1 | grep -v -i "warn\|deprecat" | tee -a "$OUT/gpu.log" || true
timeout 150 "$PY" bench/gpu.py --configs sdxl-b1 --steps 10 --variants fp32 \
    --out "$OUT/gpu-sdxl.json" 2>&1 | grep -v -i "warn\|deprecat" | tee -a "$OUT/gpu.log" || true
