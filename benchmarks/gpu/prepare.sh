#!/usr/bin/env bash
# Run HERE (PyPI reachable) before asking the device tool for a GPU: gathers into .gpu/ (git-ignored) what the lent
# machine lacks. That machine is offline; its python3 (3.12) has torch (CUDA), transformers, peft, accelerate,
# pytest, matplotlib, but not pydantic, gguf, trl, datasets or bitsandbytes (library/device/KINDS.md).
#   .gpu/wheels/          the missing packages, at the versions installed in this venv (transformers and peft too,
#                         so both machines run the same versions); bitsandbytes cut to its CPU and CUDA 13 libraries
#                         (the full wheel is 43 MB, above what a device call carries beside the repo)
#   .gpu/llama-3.2-1b/    the Llama-3.2-1B shape (configs/models) with the SmolLM2 tokenizer beside it, for
#                         `--model random:.gpu/llama-3.2-1b` (random weights, built on the GPU machine)
#   .gpu/smollm2-135m/    the packaged model's tokenizer and config only (its weights stay here): the tests' tokenizer
# Then: device run, carry [".gpu"], command "bash benchmarks/gpu/run.sh tests" (and "... bench").
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PACKAGES="pydantic pydantic_core annotated-types typing-inspection gguf trl datasets dill multiprocess bitsandbytes
transformers peft"
rm -rf .gpu && mkdir -p .gpu/wheels
pins=$($PY - $PACKAGES <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
$PY -m pip download -q --no-deps --dest .gpu/wheels --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_28_x86_64 $pins
$PY - <<'PY'
"""Repack the bitsandbytes wheel with only the libraries a CUDA 13 machine (and a CPU) loads."""
import glob, os, zipfile
(src,) = glob.glob(".gpu/wheels/bitsandbytes-*.whl")
keep = lambda n: not n.endswith(".so") or n.endswith(("_cpu.so", "_cuda130.so", "_cuda132.so"))
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if not keep(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = "".join(l + "\n" for l in data.decode().splitlines() if keep(l.split(",")[0])).encode()
        zout.writestr(item, data)
os.replace(tmp, src)
PY
$PY - <<'PY'
import json, shutil
from pathlib import Path
from tunekit.models import load_tokenizer, resolve_model_path
tok = load_tokenizer("smollm2-135m")
for name in ("llama-3.2-1b", "smollm2-135m"):
    tok.save_pretrained(f".gpu/{name}")
shutil.copy("configs/models/llama-3.2-1b.json", ".gpu/llama-3.2-1b/config.json")
shutil.copy(Path(resolve_model_path("smollm2-135m")) / "config.json", ".gpu/smollm2-135m/config.json")
PY
du -sh .gpu .gpu/wheels
