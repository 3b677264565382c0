#!/usr/bin/env bash
# Run ON THE LENT GPU MACHINE (device tool, carry [".gpu"] made by benchmarks/gpu/prepare.sh):
#   bash benchmarks/gpu/run.sh tests     the CUDA tests (tests/test_cuda.py, varlen attention) -> $OUT/tests.txt
#   bash benchmarks/gpu/run.sh bench     tunekit bench train on a random-weight Llama-3.2-1B -> $OUT/bench.*
# Extra arguments after "bench" go to `tunekit bench train` (e.g. --batch-size 16 --steps 40).
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=${1:?usage: run.sh tests|bench [bench arguments]}
shift
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
[ -d .gpu/wheels ] || { echo "no .gpu/wheels: run benchmarks/gpu/prepare.sh here first and carry .gpu"; exit 2; }
python3 -m pip install -q --no-index --no-deps --target /tmp/tunekit-site .gpu/wheels/*.whl
export PYTHONPATH="$PWD/src:/tmp/tunekit-site" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TUNEKIT_CACHE=/tmp/tunekit-cache
mkdir -p "$TUNEKIT_CACHE/models" && cp -r .gpu/smollm2-135m "$TUNEKIT_CACHE/models/"  # tokenizer only, no weights
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"
case "$stage" in
  tests)
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_attention.py 2>&1 | tee "$OUT/tests.txt"
    ;;
  bench)
    python3 -m tunekit.cli bench train --device cuda --model random:.gpu/llama-3.2-1b --out /tmp/bench "$@" \
      2>&1 | tee "$OUT/bench.log"
    cp /tmp/bench/bench.json /tmp/bench/bench.md /tmp/bench/bench.png "$OUT/"
    ;;
  *) echo "unknown stage $stage (tests or bench)"; exit 2 ;;
esac
