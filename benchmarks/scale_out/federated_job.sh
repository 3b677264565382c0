#!/usr/bin/env bash
# The federated demo measurement (federated_demo.py) as CPU-queue jobs of under 15 minutes each on 2 cores: every
# job runs the phases whose runs/fed-demo/<phase>.json is still missing, in order (a federation cut short resumes
# after its last complete round, the eval keeps its scores), so queue as many as it takes:
#   /tmp/cpuq fed-bench-a bash -c "timeout 890 bash benchmarks/scale_out/federated_job.sh"
set -uo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in a|b|c) shift ;; esac  # the job's name in the queue, nothing else
OUT="${FED_DEMO_OUT:-runs/fed-demo}"
for p in data central alone fedavg ffa svd dp eval; do
  [ -f "$OUT/$p.json" ] && [ "$p" != eval -o -f "$OUT/eval.done" ] && continue
  .venv/bin/python benchmarks/scale_out/federated_demo.py --phase "$p" --out "$OUT" "$@" || exit 1
  [ "$p" = eval ] && touch "$OUT/eval.done"
done
.venv/bin/python benchmarks/scale_out/federated_demo.py --phase report --out "$OUT" "$@"
