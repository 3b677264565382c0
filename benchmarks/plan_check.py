"""The memory planner against measured peaks: short `tunekit train` runs on the demo data, each in its own process.

    python benchmarks/plan_check.py [--runs lora_r8_b8 qlora_r16_b4 ...] [--steps 5] [--threads 2]
                                    [--out runs/plancheck]

Each run records both numbers in its result.json: `peak_memory_bytes` (peak RSS on CPU, peak allocated on CUDA)
and `planned_peak_bytes` (tunekit.planner's prediction for that run's own config and data). Prints a Markdown table
of both and the error; writes plan_check.{md,json} into --out. `tunekit plan` shows the terms of each prediction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RUNS: dict[str, dict] = {
    "lora_r8_b8": {"method.name": "lora", "method.r": 8, "train.batch_size": 8},
    "lora_r16_b8": {"method.name": "lora", "method.r": 16, "train.batch_size": 8},
    "lora_r16_b4": {"method.name": "lora", "method.r": 16, "train.batch_size": 4},
    "full_b8": {"method.name": "full", "train.batch_size": 8},
    "full_b4": {"method.name": "full", "train.batch_size": 4},
    "qlora_r16_b8": {"method.name": "qlora", "method.r": 16, "train.batch_size": 8},
    "qlora_r16_b4": {"method.name": "qlora", "method.r": 16, "train.batch_size": 4},
}


def run_one(name: str, steps: int, threads: int, out: Path, data: Path) -> dict:
    """Train run `name` for `steps` steps in a process of its own (compare's config and launcher); both peaks."""
    from tunekit.bench.compare import config_file, train_one

    tree = {"data.train": str(data), "train.output_dir": str(out / name), "train.max_steps": steps,
            "train.save_every": 0, "train.eval_every": 0, "train.threads": threads, "train.progress": False,
            **RUNS[name]}
    result = train_one(tree, config_file(tree, out / "configs" / f"{name}.yaml"), isolate=True)
    return {"run": name, "measured GiB": result["peak_memory_bytes"] / 2**30,
            "planned GiB": (result["planned_peak_bytes"] or 0) / 2**30}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/plancheck")
    a = ap.parse_args(argv)
    from tunekit.demo.invoices import write_demo_dataset

    out = Path(a.out)
    data = write_demo_dataset(out / "data", n_train=600, n_test=10)["train"]
    rows = []
    for name in a.runs:
        print(f"== {name}: {a.steps} steps", flush=True)
        row = run_one(name, a.steps, a.threads, out, data)
        row["error"] = row["planned GiB"] / row["measured GiB"] - 1
        print(f"   measured {row['measured GiB']:.2f} GiB, planned {row['planned GiB']:.2f} GiB, "
              f"error {100 * row['error']:+.1f}%", flush=True)
        rows.append(row)
    md = ["| run | planned GiB | measured GiB | error |", "|---|---|---|---|"]
    md += [f"| {r['run']} | {r['planned GiB']:.2f} | {r['measured GiB']:.2f} | {100 * r['error']:+.1f}% |"
           for r in rows]
    print("\n" + "\n".join(md), flush=True)
    (out / "plan_check.md").write_text("\n".join(md) + "\n")
    (out / "plan_check.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
