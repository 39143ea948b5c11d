#!/usr/bin/env bash
# Creates .venv and installs Atelier into it. Usage: tools/setup_venv.sh [extra, e.g. test]
# torch is pinned first so pip never swaps in another build: the local CPU wheel on
# CPU-only Linux, PyPI's default (CUDA) build where an NVIDIA driver is present.
# A stamp of pyproject.toml, this script, the torch pin and the extra skips pip when nothing changed,
# so a second launch starts at once; ATELIER_REINSTALL=1 forces the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extra=${1:-}
torch_pin="torch==${ATELIER_TORCH_VERSION:-2.13.0}"
say() { echo "[setup] $*" >&2; }

# One line per install: "<hash of pyproject.toml and the pin> <extra>"; any extra covers the plain install.
stamp_file=".venv/.atelier-installed"
stamp=$( { cat pyproject.toml "$0"; echo "$torch_pin"; } | sha256sum | cut -d' ' -f1)
installed() {
    [ -f "$stamp_file" ] || return 1
    if [ -n "$extra" ]; then grep -qx "$stamp $extra" "$stamp_file"; else grep -q "^$stamp" "$stamp_file"; fi
}
if [ -z "${ATELIER_REINSTALL:-}" ] && [ -x .venv/bin/python ] && installed; then
    say ".venv is up to date (pyproject.toml and $torch_pin unchanged); skipping pip"
    exit 0
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # On CPU-only machines here, this exact version resolves to the CPU wheel on local disk.
    say "installing $torch_pin"
    "${pip[@]}" install "$torch_pin"
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" >"$constraints"
target="."
[ -n "$extra" ] && target=".[$extra]"
say "installing Atelier ($target) with $(cat "$constraints") held"
"${pip[@]}" install -c "$constraints" -e "$target"
if [[ ",$extra," == *",test,"* ]]; then
    # k-diffusion's samplers are the tests' reference; its own requirements (torchvision, clean-fid,
    # wandb, ...) are only for training, so it is installed without them (tests/kdiffusion_ref.py).
    "${pip[@]}" install --no-deps "k-diffusion==0.1.1.post1"
    # spandrel is the upscalers' reference; its torchvision has no CPU build for this torch, so it comes
    # without it (tests/spandrel_reference.py covers the two torchvision-only architectures it never uses).
    "${pip[@]}" install --no-deps "spandrel==0.4.2" "einops>=0.8"
fi
grep -s "^$stamp " "$stamp_file" | grep -vx "$stamp $extra" >"$stamp_file.new" || true
echo "$stamp $extra" >>"$stamp_file.new"
mv "$stamp_file.new" "$stamp_file"
say "done"
