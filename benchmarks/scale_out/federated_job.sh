#!/usr/bin/env bash
# The federated demo measurement (federated_demo.py) as three CPU-queue jobs of under 15 minutes each on 2 cores
# (the eval phase keeps its scores in eval.json and continues where a cut-short job stopped):
#   /tmp/cpuq fed-bench-a bash benchmarks/scale_out/federated_job.sh a     # data, centralized, alone, fedavg, ffa
#   /tmp/cpuq fed-bench-b bash benchmarks/scale_out/federated_job.sh b     # svd, dp, eval (part)
#   /tmp/cpuq fed-bench-c bash benchmarks/scale_out/federated_job.sh c     # eval (rest), report
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
B="benchmarks/scale_out/federated_demo.py"
case "${1:?a, b or c}" in
  a) for p in data central alone fedavg ffa; do $PY $B --phase $p; done ;;
  b) $PY $B --phase svd; $PY $B --phase dp; timeout 300 $PY $B --phase eval || true ;;
  c) $PY $B --phase eval; $PY $B --phase report ;;
esac
