"""tokens/s of the demo LoRA recipe on 1 process vs N DDP processes of this machine, same global batch.

    flock /tmp/tunekit-cpu.lock .venv/bin/python benchmarks/scale_out/ddp_throughput.py --steps 12 --nproc 2

Each run is a real `tunekit train` (1 process: all cores as threads; N processes: cores / N threads each, through
`tunekit train --nproc N`); tokens/s is the run's own figure (result.json, first step excluded), summed over ranks.
Prints a Markdown table and writes it as JSON next to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(nproc: int, steps: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"nproc{nproc}"
    cores = os.cpu_count() or 1
    args = [sys.executable, "-m", "tunekit.cli", "train", "--config", "configs/demo-lora.yaml",
            f"--train.max_steps={steps}", "--train.eval_every=0", "--train.save_every=0", "--train.energy=false",
            "--train.progress=false", f"--train.output_dir={run_dir}", f"--train.threads={max(1, cores // nproc)}",
            "--data.val_fraction=0.0", *extra]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    subprocess.run(args, check=True)
    r = json.loads((run_dir / "result.json").read_text())
    return {"processes": nproc, "threads_each": max(1, cores // nproc), "tokens_per_s": r["tokens_per_s"],
            "tokens_seen": r["tokens_seen"], "wall_time_s": r["wall_time_s"], "precision": r["precision"],
            "peak_memory_gib_rank0": r["peak_memory_bytes"] / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default="runs/scale-out-bench")
    ap.add_argument("extra", nargs="*", help="more tunekit train flags for both runs")
    a = ap.parse_args()
    if not Path("runs/demo/data/train.jsonl").exists():
        sys.exit("runs/demo/data/train.jsonl is missing: `make demo` (or tunekit demo) writes the demo data")
    out = Path(a.out)
    rows = [run(1, a.steps, out, a.extra), run(a.nproc, a.steps, out, a.extra)]
    load = os.getloadavg()[0]
    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; load average before the table: {load:.2f}")
    print("| processes | threads each | tokens/s | speedup | wall s | peak GiB (rank 0) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['threads_each']} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x | {r['wall_time_s']:.0f} | "
              f"{r['peak_memory_gib_rank0']:.2f} |")
    (out / "ddp_throughput.json").write_text(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(),
                                                          "steps": a.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
