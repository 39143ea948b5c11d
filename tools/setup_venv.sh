#!/usr/bin/env bash
# Creates .venv and installs Atelier into it. Usage: tools/setup_venv.sh [extra, e.g. test]
# torch is pinned first so pip never swaps in another build: the local CPU wheel on
# CPU-only Linux, PyPI's default (CUDA) build where an NVIDIA driver is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extra=${1:-}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # On CPU-only machines here, this exact version resolves to the CPU wheel on local disk.
    "${pip[@]}" install "torch==${ATELIER_TORCH_VERSION:-2.13.0}"
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" >"$constraints"
target="."
[ -n "$extra" ] && target=".[$extra]"
"${pip[@]}" install -c "$constraints" -e "$target"
if [[ ",$extra," == *",test,"* ]]; then
    # k-diffusion's samplers are the tests' reference; its own requirements (torchvision, clean-fid,
    # wandb, ...) are only for training, so it is installed without them (tests/kdiffusion_ref.py).
    "${pip[@]}" install --no-deps "k-diffusion==0.1.1.post1"
fi
