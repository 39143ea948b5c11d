#!/usr/bin/env bash
# Fresh-machine setup and launch: creates .venv, installs Atelier, starts the app.
# Arguments go to webui.py, e.g. ./webui.sh generate --ckpt model.safetensors --prompt "a cat"
set -euo pipefail
cd "$(dirname "$0")"
tools/setup_venv.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python webui.py "$@"
