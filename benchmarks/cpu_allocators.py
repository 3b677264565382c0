"""Peak RSS and speed of one CPU training run under different memory allocators, side by side.

    python benchmarks/cpu_allocators.py [--steps 40] [--threads 2] [--allocators glibc jemalloc ...]
                                        [--run lora_r16_b8] [--out runs/allocators]

The same `tunekit train` run (benchmarks/plan_check.py's configs, demo data) in a fresh process per allocator:
glibc's malloc as it comes, glibc with a fixed mmap threshold (GLIBC_TUNABLES), and jemalloc / tcmalloc through
LD_PRELOAD where the shared library is installed (TUNEKIT_MALLOC=system keeps the CLI from choosing its own).
Prints a table of the peak RSS after steps 5, 10, 20 and at the end (metrics.jsonl's peak_memory_gib), the
planner's figure, and tokens/s, with ratios to the first allocator; writes allocators.{md,json} into --out.
Run it on a quiet machine: the speed column is only as good as that.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from plan_check import RUNS

from tunekit.allocator import find_library


def allocator_env(name: str) -> dict[str, str] | None:
    """Environment that makes a new process use allocator `name`; None when it is not installed here."""
    keep = {"TUNEKIT_MALLOC": "system"}  # the CLI must not swap in its own choice (tunekit/allocator.py)
    if name == "glibc":
        return keep
    if name.startswith("glibc-mmap"):  # e.g. glibc-mmap4m: serve blocks >= 4 MiB by mmap, threshold fixed
        mib = int(name.removeprefix("glibc-mmap").removesuffix("m"))
        return {**keep, "GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={mib * 2**20}"}
    lib = find_library(name)
    return {**keep, "LD_PRELOAD": lib} if lib else None


def peaks_by_step(metrics: Path) -> dict[int, float]:
    """metrics.jsonl's running peak (GiB) at each logged training step."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    return {r["step"]: r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--allocators", nargs="+", default=["glibc", "glibc-mmap4m", "jemalloc", "tcmalloc"])
    ap.add_argument("--run", default="lora_r16_b8", choices=list(RUNS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/allocators")
    a = ap.parse_args(argv)
    from tunekit.bench.compare import config_file, train_one
    from tunekit.demo.invoices import write_demo_dataset

    out = Path(a.out)
    data = write_demo_dataset(out / "data", n_train=600, n_test=10)["train"]
    rows = []
    for name in a.allocators:
        env = allocator_env(name)
        if env is None:
            print(f"== {name}: not installed here, skipped", flush=True)
            continue
        print(f"== {name}: {a.run}, {a.steps} steps {env or ''}", flush=True)
        tree = {"data.train": str(data), "train.output_dir": str(out / name), "train.max_steps": a.steps,
                "train.save_every": 0, "train.eval_every": 0, "train.log_every": 1, "train.threads": a.threads,
                "train.progress": False, **RUNS[a.run]}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            result = train_one(tree, config_file(tree, out / "configs" / f"{name}.yaml"), isolate=True)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        peaks = peaks_by_step(out / name / "metrics.jsonl")
        row = {"allocator": name, **{f"step {s}": peaks.get(s) for s in (5, 10, 20) if s < a.steps},
               "peak GiB": result["peak_memory_bytes"] / 2**30,
               "plan GiB": (result["planned_peak_bytes"] or 0) / 2**30, "tokens/s": result["tokens_per_s"]}
        print("   " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)), flush=True)
        rows.append(row)
    if not rows:
        return
    base = rows[0]
    for r in rows:
        r["peak vs first"] = r["peak GiB"] / base["peak GiB"]
        r["speed vs first"] = r["tokens/s"] / base["tokens/s"]
    cols = list(rows[0])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(r[c] if isinstance(r[c], str) else "-" if r[c] is None else f"{r[c]:.2f}"
                             for c in cols) + " |" for r in rows]
    text = f"{a.run}, {a.steps} steps, {a.threads} threads (peaks in GiB; ratios to {base['allocator']})\n\n"
    text += "\n".join(md) + "\n"
    print("\n" + text, flush=True)
    (out / "allocators.md").write_text(text)
    (out / "allocators.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
