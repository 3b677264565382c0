#!/usr/bin/env bash
# Flower for `tunekit federate`, in its own venv beside tunekit's (default .flower-venv, git-ignored).
# Every flwr release pins its web stack below what `tunekit serve` runs on (flwr 1.42: fastapi 0.138, starlette 1.3,
# uvicorn 0.49, packaging<26, rich<15, typer<0.21), so it cannot share .venv without downgrading it. This venv holds
# flwr and its pinned dependencies only; a .pth file then appends tunekit's venv (torch, transformers, peft and the
# editable tunekit itself) after them, so the SuperLink, SuperNodes and apps import Flower's versions first and
# tunekit's engine from the one install. Usage: bash benchmarks/scale_out/install_flower.sh [VENV_DIR] [TUNEKIT_VENV]
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${1:-.flower-venv}"
MAIN="${2:-.venv}"
PYTHON="${PYTHON:-python3}"
FLWR_SPEC="${FLWR_SPEC:-flwr==1.42.0}"
[ -x "$MAIN/bin/python" ] || { echo "tunekit's venv $MAIN is missing: run make setup first" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$FLWR_SPEC"
V_MAIN="$("$MAIN/bin/python" -c 'import sys; print(sys.version_info[:2])')"
V_OWN="$("$VENV/bin/python" -c 'import sys; print(sys.version_info[:2])')"
[ "$V_MAIN" = "$V_OWN" ] || { echo "$VENV has Python $V_OWN, $MAIN has $V_MAIN: the same minor version is needed (PYTHON=...)" >&2; exit 1; }
MAIN_SITE="$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
OWN_SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# addsitedir (not a bare path): the main venv's own .pth files (the editable tunekit) are read too.
echo "import site; site.addsitedir('$MAIN_SITE')" > "$OWN_SITE/zz_tunekit_venv.pth"
FLWR_TELEMETRY_ENABLED=0 "$VENV/bin/python" -c "import flwr, torch, transformers, tunekit.engine; print('flwr', flwr.__version__, 'torch', torch.__version__)"
