"""The memory planner against measured peaks: short `tunekit train` runs on the demo data, each in its own process.

    python benchmarks/plan_check.py [--runs lora_r8_b8 qlora_r16_b4 ...] [--steps 20] [--threads 2]
                                    [--out runs/plancheck] [--reuse]

Each run records its measured peak in result.json (`peak_memory_bytes`: peak RSS on CPU, peak allocated on CUDA)
and the plan made when it started (`planned_peak_bytes`). The table shows the plan of the current planner for the
run's own config and data, with its terms, so `--reuse` (keep finished runs, train only missing ones) re-checks a
changed planner against the same measurements. The runs go through the `tunekit` command, so they use the malloc
it picks (tunekit/allocator.py) and the plan is made for that malloc. Writes plan_check.{md,json} into --out.
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


def run_one(name: str, steps: int, threads: int, out: Path, data: Path, reuse: bool) -> dict:
    """Train run `name` for `steps` steps in a process of its own (compare's config and launcher), unless `reuse`
    finds it finished; its measured peak and the current planner's terms for it."""
    from tunekit.bench.compare import config_file, train_one

    tree = {"data.train": str(data), "train.output_dir": str(out / name), "train.max_steps": steps,
            "train.save_every": 0, "train.eval_every": 0, "train.threads": threads, "train.progress": False,
            **RUNS[name]}
    done = out / name / "result.json"
    result = json.loads(done.read_text()) if reuse and done.exists() else {}
    if result.get("steps") != steps:
        result = train_one(tree, config_file(tree, out / "configs" / f"{name}.yaml"), isolate=True)
    p = replan(out / name, result)
    g = 2**30
    return {"run": name, "malloc": result.get("allocator") or "?", "weights": p.weights / g,
            "adapter+grad+optim": (p.adapter + p.gradients + p.optimizer) / g, "activations": p.activations / g,
            "allocator": p.allocator / g, "overhead": p.overhead / g, "planned GiB": p.total / g,
            "measured GiB": result["peak_memory_bytes"] / 2**30}


def replan(run_dir: Path, result: dict):
    """The current planner's MemoryPlan for a finished run: its resolved config, its data, its malloc."""
    import torch

    from tunekit.config import load_config
    from tunekit.data import prepare_data
    from tunekit.models import load_tokenizer
    from tunekit.planner import student_plan

    cfg = load_config(run_dir / "config.yaml", {})
    stats = prepare_data(cfg.data, load_tokenizer(cfg.model.name)).stats
    malloc = result.get("allocator") or None
    return student_plan(cfg, stats, torch.device(result["device"]), result["precision"], malloc=malloc)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/plancheck")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs of the same steps; re-plan them")
    a = ap.parse_args(argv)
    from tunekit.demo.invoices import write_demo_dataset

    out = Path(a.out)
    data = write_demo_dataset(out / "data", n_train=600, n_test=10)["train"]
    rows = []
    for name in a.runs:
        print(f"== {name}: {a.steps} steps", flush=True)
        row = run_one(name, a.steps, a.threads, out, data, a.reuse)
        row["error"] = row["planned GiB"] / row["measured GiB"] - 1
        print(f"   measured {row['measured GiB']:.2f} GiB, planned {row['planned GiB']:.2f} GiB, "
              f"error {100 * row['error']:+.1f}%", flush=True)
        rows.append(row)
    cols = [c for c in rows[0] if c != "error"]
    md = ["| " + " | ".join(cols) + " | error |", "|" + "---|" * (len(cols) + 1)]
    md += ["| " + " | ".join(r[c] if isinstance(r[c], str) else f"{r[c]:.2f}" for c in cols)
           + f" | {100 * r['error']:+.1f}% |" for r in rows]
    print("\n" + "\n".join(md), flush=True)
    (out / "plan_check.md").write_text("\n".join(md) + "\n")
    (out / "plan_check.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
