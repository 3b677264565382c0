"""`tunekit compare`: every method trained on the demo task with the same budget, one table.

    tunekit compare [--methods lora qlora ...] [--steps 40] [--n-test 50] [--out runs/compare] [--set KEY=VALUE]
    tunekit compare --methods select select-random select-last    # parameter selection vs its baselines

For each method: `tunekit train` on the demo invoices (configs/demo-lora.yaml with the method swapped in and the
same steps, batch, data and seed), in its own process so its peak memory (peak RSS on CPU) is its own; then
`tunekit.api.evaluate` on the held-out test split for exact match. Learning rates differ per method (a small
fixed table below, the usual orders of magnitude for each; not tuned per method here). Writes compare.md,
compare.json and compare.png (bar charts; needs matplotlib) into --out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..config import METHOD_NAMES, load_config
from ..demo.invoices import write_demo_dataset
from ..demo.pipeline import MAX_NEW_TOKENS, PRESET
from ..demo.scoring import format_table, markdown_table

# Per-method settings on top of the demo preset: the method, and a learning rate of the usual size for it.
METHOD_SETTINGS: dict[str, dict] = {
    "lora": {"method.name": "lora", "method.r": 16, "optim.lr": 2e-3},
    "dora": {"method.name": "lora", "method.r": 16, "method.dora": True, "optim.lr": 2e-3},
    "qlora": {"method.name": "qlora", "method.r": 16, "optim.lr": 2e-3},
    "ia3": {"method.name": "ia3", "optim.lr": 1e-2},
    "prefix": {"method.name": "prefix", "optim.lr": 1e-2},
    "prompt": {"method.name": "prompt", "optim.lr": 3e-2},
    "ptuning": {"method.name": "ptuning", "optim.lr": 3e-3},
    "adapter": {"method.name": "adapter", "optim.lr": 1e-3},
    "bitfit": {"method.name": "bitfit", "optim.lr": 3e-3},
    "freeze": {"method.name": "freeze", "method.trainable": ["layers.-4", "layers.-3", "layers.-2", "layers.-1"],
               "optim.lr": 1e-4},
    "full": {"method.name": "full", "optim.lr": 5e-5},
    # Parameter selection: 10% of the decoder's linear weights at full rank, chosen by Fisher importance on 8
    # micro-batches, and the two baselines with the same budget (they skip scoring: their time is training only).
    "select": {"method.name": "select", "method.fraction": 0.1, "optim.lr": 2e-4},
    "select-random": {"method.name": "select", "method.strategy": "random", "method.score_batches": 0,
                      "method.fraction": 0.1, "optim.lr": 2e-4},
    "select-last": {"method.name": "select", "method.strategy": "last", "method.score_batches": 0,
                    "method.fraction": 0.1, "optim.lr": 2e-4},
}
assert set(METHOD_NAMES) <= set(METHOD_SETTINGS)
BASELINES = ("select-random", "select-last")  # only when asked for: `--methods select select-random select-last`
COLUMNS = ["method", "trainable", "trainable %", "peak GiB", "plan GiB", "tokens/s", "eval_loss", "exact_match",
           "json_valid", "train s"]


def method_overrides(method: str) -> dict:
    if method not in METHOD_SETTINGS:
        raise ValueError(f"unknown method {method!r} for compare; choose from: {', '.join(METHOD_SETTINGS)}")
    return dict(METHOD_SETTINGS[method])


def config_file(overrides: dict, path: Path) -> Path:
    """The demo preset with its method section replaced by the method.* keys of `overrides`, written to `path`
    (so the preset's LoRA options do not leak into other methods)."""
    import yaml

    tree = yaml.safe_load(PRESET.read_text())
    tree["method"] = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("method.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def train_one(overrides: dict, config: Path, isolate: bool) -> dict:
    """Train with `config` + the non-method `overrides`; returns result.json. `isolate`: in a fresh process."""
    rest = {k: v for k, v in overrides.items() if not k.startswith("method.")}
    if not isolate:
        from ..api import train

        return asdict(train(load_config(config, rest)))
    argv = [sys.executable, "-m", "tunekit.cli", "train", "--config", str(config)]
    argv += [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in rest.items()]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(argv[3:])}):\n{proc.stderr[-3000:]}")
    return json.loads((Path(overrides["train.output_dir"]) / "result.json").read_text())


def run_compare(methods: list[str] | None = None, model: str = "smollm2-135m", steps: int = 40, n_train: int = 1200,
                n_test: int = 50, batch_size: int = 8, device: str = "auto", out: str = "runs/compare",
                overrides: dict | None = None, isolate: bool = True, max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    from ..api import evaluate

    methods = methods or [m for m in METHOD_SETTINGS if m not in BASELINES]
    for m in methods:
        method_overrides(m)  # fails early on an unknown name
    out_dir = Path(out)
    paths = write_demo_dataset(out_dir / "data", n_train=n_train, n_test=n_test)
    rows = []
    budget = f"{steps} steps x batch {batch_size}, {n_train} train / {n_test} test examples, model {model}"
    for m in methods:
        run_dir = out_dir / m
        tree = {"model.name": model, "data.train": str(paths["train"]), "train.output_dir": str(run_dir),
                "train.max_steps": steps, "train.batch_size": batch_size, "train.device": device,
                "train.save_every": 0, "train.progress": False, **method_overrides(m), **(overrides or {})}
        # A method finished by an earlier invocation with the same settings is reused (the row file is written
        # only after its evaluation), so an interrupted comparison continues where it stopped.
        done = out_dir / f"{m}.row.json"
        settings = {"tree": tree, "n_test": n_test, "max_new_tokens": max_new_tokens}
        finished = json.loads(done.read_text()) if done.exists() else {}
        if finished.get("settings") == settings:
            print(f"== {m}: reusing the finished run in {run_dir}", flush=True)
            rows.append(finished["row"])
            continue
        print(f"== {m}: training {steps} steps", flush=True)
        t0 = time.perf_counter()
        result = train_one(tree, config_file(tree, out_dir / "configs" / f"{m}.yaml"), isolate)
        train_s = time.perf_counter() - t0
        print(f"== {m}: exact match on {n_test} test examples", flush=True)
        full = (run_dir / "config.json").exists()
        report = evaluate(str(paths["test"]), model=str(run_dir) if full else model, adapter=None if full else
                          str(run_dir), limit=n_test, max_new_tokens=max_new_tokens, device=device)
        planned = result.get("planned_peak_bytes")  # tunekit plan's prediction for this run
        rows.append({"method": m, "trainable": result["trainable_params"],
                     "trainable %": result["trainable_params"] / result["total_params"],
                     "peak GiB": result["peak_memory_bytes"] / 2**30,
                     "plan GiB": planned / 2**30 if planned else None,
                     "tokens/s": result["tokens_per_s"],
                     "eval_loss": result["eval_loss_after"], "exact_match": report.scores["exact_match"],
                     "json_valid": report.scores["json_valid"], "train s": train_s,
                     "groups": selected_groups(run_dir)})
        done.write_text(json.dumps({"settings": settings, "row": rows[-1]}, indent=2))
        if len(rows) < len(methods):
            write_outputs(rows, out_dir, budget + f" (so far: {len(rows)} of {len(methods)} methods)", quiet=True)
    write_outputs(rows, out_dir, budget)
    return rows


def selected_groups(run_dir: Path) -> str | None:
    """'k of n' (layer x module) groups a select run trained, from its selection.json; None for other methods."""
    path = run_dir / "selection.json"
    if not path.exists():
        return None
    groups = json.loads(path.read_text())["groups"]
    return f"{sum(g['selected'] for g in groups)} of {len(groups)}"


def write_outputs(rows: list[dict], out_dir: Path, budget: str, quiet: bool = False) -> None:
    columns = COLUMNS + (["groups"] if any(r.get("groups") for r in rows) else [])
    md = markdown_table(rows, columns, _md_cell)
    if not quiet:
        print(f"\n{budget}\n{format_table(rows, columns)}\n", flush=True)
        print(md + "\n", flush=True)
    (out_dir / "compare.md").write_text(f"Budget: {budget}\n\n" + md + "\n")
    (out_dir / "compare.json").write_text(json.dumps({"budget": budget, "rows": rows}, indent=2))
    plot(rows, out_dir / "compare.png", budget)


def _md_cell(column: str, v) -> str:
    if v is None:
        return "-"
    if column in ("trainable %", "exact_match", "json_valid"):
        return f"{100 * v:.3f}%" if column == "trainable %" else f"{100 * v:.1f}%"
    if column == "trainable":
        return f"{v:,}"
    if column in ("peak GiB", "plan GiB", "eval_loss"):
        return f"{v:.4f}" if column == "eval_loss" else f"{v:.3f}"
    if isinstance(v, float):
        return f"{v:,.0f}"
    return str(v)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Four bar charts (trainable %, peak memory, tokens/s, exact match); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[tunekit] matplotlib not installed: no compare.png (pip install 'tunekit[plot]')", flush=True)
        return False
    names = [r["method"] for r in rows]
    panels = [("trainable %", 100, "trainable parameters (%)"), ("peak GiB", 1, "peak memory (GiB)"),
              ("tokens/s", 1, "training tokens/s"), ("exact_match", 100, "test exact match (%)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, (key, scale, label) in zip(axes, panels):
        ax.bar(names, [(r[key] or 0) * scale for r in rows], color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
