#!/usr/bin/env bash
# Train the demo model on a lent GPU machine and send the results back through $OUT.
#   device run, carry [".whl"]:  bash tools/train_demo_gpu.sh MINUTES [extra train_demo_model.py options]
# The machine has torch but no diffusers: a carried .whl/diffusers-*.whl is installed to /tmp/site.
# $OUT gets the checkpoint in 15 MB parts (join with `cat m.part.* > FILE`), train.log and sample grids.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:?minutes}"
shift
OUT="${OUT:-outputs/demo-gpu}"
WORK=/tmp/demo-training
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if ls .whl/diffusers-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/diffusers-*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
"$PY" tools/train_demo_model.py --out "$WORK/m.safetensors" --work-dir "$WORK" --max-minutes "$MINUTES" "$@" 2>&1 \
    | tr "\r" "\n" | tail -30 || true
split -b 15M "$WORK/m.safetensors" "$OUT/m.part."
cp "$WORK/train.log" "$OUT/"
cp "$WORK/samples/final.png" "$OUT/" 2>/dev/null || true
sha256sum "$WORK/m.safetensors"
