"""The distillation study on the demo task: teacher vs a 1/3-depth student after SFT and after each KD mode.

    python benchmarks/distill_demo.py [--steps 240] [--lr 1e-3] [--n-test 100] [--jobs 2 --threads 1]
                                      [--modes sft sft-scarce offline logit on-policy] [--scarce-labels 240]
                                      [--out runs/distill240]

1. data: `steps x batch` demo invoices for training (each seen once; the generator's stream, so the first 1,200
   are the teacher's own training data) and 48 for gold validation, none of them a test invoice
2. teacher: SmolLM2-135M-Instruct + the demo's LoRA (trained with configs/demo-lora.yaml if missing); exact match
3. student: `tunekit shrink --every 3` of the teacher (adapter merged): 10 of 30 layers
4. one run per mode, same steps / batch / learning rate / method (full fine-tuning of the student):
   sft (gold labels, no teacher), offline (teacher's greedy answers), logit (alpha CE + (1-alpha) KL, on every
   token), on-policy (first half of the steps as logit, then half the micro-batches sampled by the student);
   sft-scarce: SFT on only the first --scarce-labels gold examples, repeated to fill the same budget, against
   offline KD on all the prompts without their labels: the case where a teacher adds what labels cannot
5. exact match of each on the same test invoices; table (Markdown + JSON) and the validation-loss curves (PNG)
   in --out
Each training run is a `tunekit train` / `tunekit distill` process of its own; --jobs runs several at once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from ..demo.invoices import write_demo_dataset
from ..demo.pipeline import MAX_NEW_TOKENS, PRESET
from ..demo.scoring import format_table, markdown_table, paired_exact_test
from ..evaluate import score_text

MODES = ("sft", "sft-scarce", "offline", "logit", "on-policy")
COLUMNS = ["model", "layers", "params", "exact_match", "of teacher", "fields", "json_valid", "vs SFT", "eval_loss",
           "train s"]


def field_mean(scores: dict) -> float | None:
    """Mean per-field accuracy (vendor, invoice_id, dates, currency, total): partial credit where exact match is 0."""
    acc = scores.get("field_accuracy") or {}
    return sum(acc.values()) / len(acc) if acc else None


def base_tree(student: str, train: Path, val: Path, out: Path, steps: int, batch: int, lr: float,
              threads: int | None = None) -> dict:
    return {"model": {"name": student},
            "data": {"train": str(train), "validation": str(val), "max_length": 512, "packing": True},
            "method": {"name": "full"},
            "optim": {"lr": lr, "schedule": "cosine", "warmup_steps": max(10, steps // 12),
                      "max_grad_norm": 1.0},
            "train": {"output_dir": str(out), "max_steps": steps, "batch_size": batch, "precision": "auto",
                      "eval_every": max(1, steps // 4), "save_every": max(1, steps // 12), "resume": True,
                      "progress": True, "seed": 0, "threads": threads}}


# Keys that do not change what a run computes: a finished run whose config differs only in these is reused.
BOOKKEEPING = {"train": ("save_every", "resume", "progress", "threads")}


def same_run(a: str, b: str) -> bool:
    """Whether two run configs (YAML text) train the same thing."""
    trees = [yaml.safe_load(x) for x in (a, b)]
    for tree in trees:
        for section, keys in BOOKKEEPING.items():
            for k in keys:
                tree.get(section, {}).pop(k, None)
    return trees[0] == trees[1]


def distill_section(mode: str, teacher: str, adapter: str, steps: int) -> dict | None:
    common = {"teacher": teacher, "teacher_adapter": adapter, "max_new_tokens": MAX_NEW_TOKENS}
    return {
        "sft": None,
        "sft-scarce": None,
        # Batches of 64 prompts: CPU decoding is bound by reading the weights once per token, whatever the batch.
        "offline": {"mode": "offline", "generate_batch_size": 64, **common},
        # KD on every token: the shrunk student's language model is broken on the prompt text too, and the
        # teacher's distribution there costs nothing extra (its forward covers the prompt anyway).
        "logit": {"mode": "logit", "alpha": 0.5, "temperature": 1.0, "divergence": "forward_kl", "kd_on": "all",
                  **common},
        # GKD's recipe: the student first learns the task (here: the first half of the budget as in logit mode),
        # then samples; a student this broken at step 0 samples noise that the teacher cannot correct (measured).
        "on-policy": {"mode": "on-policy", "on_policy_fraction": 0.5, "on_policy_warmup_steps": steps // 2,
                      "alpha": 0.5, "divergence": "reverse_kl", "kd_on": "all", **common},
    }[mode]


def run_cli(argv: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "tunekit.cli", *argv], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"tunekit {' '.join(argv)} failed; see {log}:\n{log.read_text()[-3000:]}")


def budget_split(test: Path, out: Path, n_train: int, n_val: int) -> tuple[Path, Path]:
    """n_train demo invoices for training (each seen once in the budget) and the next n_val for validation, from
    the demo generator's training stream (its first 1,200 are the teacher's own training data); none of them is
    one of the `test` invoices."""
    test_texts = {json.loads(x)["messages"][0]["content"] for x in test.read_text().splitlines()}
    paths = write_demo_dataset(out / "generated", n_train=n_train + n_val + len(test_texts), n_test=1)
    lines = [x for x in paths["train"].read_text().splitlines(keepends=True)
             if json.loads(x)["messages"][0]["content"] not in test_texts][: n_train + n_val]
    (out / "train.jsonl").write_text("".join(lines[:n_train]))
    (out / "val.jsonl").write_text("".join(lines[n_train:]))
    return out / "train.jsonl", out / "val.jsonl"


def run_study(out: str = "runs/distill240", steps: int = 240, batch: int = 8, n_test: int = 100, lr: float = 1e-3,
              modes: tuple[str, ...] = MODES, teacher: str = "smollm2-135m", teacher_adapter: str = "runs/demo/lora",
              every: int = 3, threads: int | None = None, jobs: int = 1, scarce_labels: int = 240) -> list[dict]:
    from ..api import evaluate, shrink

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    demo = Path("runs/demo/data")
    paths = {"train": demo / "train.jsonl", "test": demo / "test.jsonl"}
    if not paths["test"].exists() or len(paths["test"].read_text().splitlines()) < n_test:
        paths = write_demo_dataset(demo, n_test=n_test)
    train, val = budget_split(paths["test"], out_dir / "data", steps * batch, 48)
    # The labelled few: the first scarce_labels training examples (a prefix, so the other modes' prompts include
    # them); the loader cycles them (train.max_steps) to fill the same steps x batch budget.
    scarce = out_dir / "data" / f"train_{scarce_labels}.jsonl"
    scarce.write_text("".join(train.read_text().splitlines(keepends=True)[:scarce_labels]))
    if not (Path(teacher_adapter) / "adapter_config.json").exists():
        print(f"== teacher adapter {teacher_adapter} missing: training it with {PRESET.name}", flush=True)
        run_cli(["train", "--config", str(PRESET), "--train.output_dir", teacher_adapter], out_dir / "teacher.log")

    def score(model: str, adapter: str | None, name: str) -> dict:
        """Exact match of model (+ adapter) on the test split; predictions newer than the model are re-scored, not
        regenerated (a rerun of the study only redoes what changed)."""
        preds = out_dir / f"{name}_predictions.jsonl"
        source = Path(adapter or model)
        if preds.exists() and source.exists() and preds.stat().st_mtime > newest_mtime(source):
            rows = [json.loads(x) for x in preds.read_text().splitlines()]
            if len(rows) == n_test:
                return score_text([r["prediction"] for r in rows], [r["reference"] for r in rows])
        r = evaluate(str(paths["test"]), model=model, adapter=adapter, limit=n_test, max_new_tokens=MAX_NEW_TOKENS,
                     batch_size=32, output=str(preds))
        return r.scores

    rows: list[dict] = []
    print("== teacher: exact match", flush=True)
    t = score(teacher, teacher_adapter, "teacher")
    student = out_dir / "student"
    info = student / "shrink.json"
    report = json.loads(info.read_text()) if info.exists() else None
    if report is None or report["teacher_adapter"] != teacher_adapter:  # made from another teacher: make it again
        report = shrink(teacher, str(student), every=every, adapter=teacher_adapter)
    rows.append({"model": "teacher (base + demo LoRA)", "layers": report["teacher_layers"],
                 "params": report["teacher_params"], "exact_match": t["exact_match"], "json_valid": t["json_valid"],
                 "fields": field_mean(t)})
    s0 = score(str(student), None, "student0")
    rows.append({"model": "student, untrained (shrink --every 3)", "layers": len(report["kept_layers"]),
                 "params": report["student_params"], "exact_match": s0["exact_match"], "json_valid": s0["json_valid"],
                 "fields": field_mean(s0)})
    todo = []
    for mode in modes:  # a finished run of the same config is reused (rerun the study after a change)
        tree = base_tree(str(student), scarce if mode == "sft-scarce" else train, val, out_dir / mode, steps,
                         batch, lr, threads)
        section = distill_section(mode, teacher, teacher_adapter, steps)
        if section:
            tree["distill"] = section
        config = out_dir / "configs" / f"{mode}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(tree, sort_keys=False)
        # An interrupted run (crash, Ctrl-C, out of memory) resumes from its last checkpoint (train.resume).
        same = config.exists() and same_run(config.read_text(), text)
        if not ((out_dir / mode / "result.json").exists() and same):
            if not same:  # what is in the run folder was trained with another config: start afresh
                shutil.rmtree(out_dir / mode, ignore_errors=True)
            config.write_text(text)
            todo.append((mode, ["train" if section is None else "distill", "--config", str(config)]))

    def run(item):
        mode, argv = item
        print(f"== {mode}: {steps} steps (log: {out_dir / (mode + '.log')})", flush=True)
        run_cli(argv, out_dir / f"{mode}.log")
        print(f"== {mode}: done", flush=True)

    # Runs share the CPU: with jobs > 1 give each `--threads 2/jobs` (oversubscribed OpenMP threads are ruinous).
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(run, todo))
    for mode in modes:
        run_dir = out_dir / mode
        result = json.loads((run_dir / "result.json").read_text())
        s = score(str(run_dir), None, mode)
        label = {"sft": "student + SFT on gold labels",
                 "sft-scarce": f"student + SFT on {scarce_labels} gold labels only"}.get(mode, f"student + {mode}")
        rows.append({"model": label,
                     "layers": len(report["kept_layers"]), "params": report["student_params"],
                     "exact_match": s["exact_match"], "json_valid": s["json_valid"], "fields": field_mean(s),
                     "eval_loss": result["eval_loss_after"], "train s": step_seconds(run_dir)})
    if "sft" in modes:  # paired on the same test invoices: which ones each model gets right that SFT misses
        for row, name in zip(rows, ["teacher", "student0", *modes]):
            if name != "sft":
                row["vs SFT"] = vs_reference(out_dir, "sft", name)
    notes = []
    # Labels scarce: offline is the one mode that uses no gold label (logit and on-policy mix gold CE on every
    # prompt), so it alone is paired against SFT on the few labels.
    if "sft-scarce" in modes and "offline" in modes:
        notes.append(f"offline (teacher answers, no gold labels) vs SFT on {scarce_labels} gold labels: "
                     f"{vs_reference(out_dir, 'sft-scarce', 'offline')}")
    write_outputs(rows, out_dir, t["exact_match"], f"{steps} steps x {batch} examples (each training prompt seen "
                  f"once; sft-scarce: {scarce_labels} examples seen {steps * batch / scarce_labels:.0f} times), "
                  f"full fine-tuning, lr {lr}, {n_test} test invoices", notes)
    plot_curves(out_dir, modes)
    return rows


def vs_reference(out_dir: Path, reference: str, name: str) -> str:
    """"+wins/-losses (p)": test invoices `name` gets exactly right and `reference` does not, the reverse, and
    McNemar's exact two-sided p-value (demo/scoring.py paired_exact_test), from the two predictions files."""
    def exact(n: str) -> list[bool]:
        return [json.loads(x)["exact"] for x in (out_dir / f"{n}_predictions.jsonl").read_text().splitlines()]

    wins, losses, p = paired_exact_test(exact(reference), exact(name))
    return f"+{wins}/-{losses} (p {p:.2f})" if p >= 0.01 else f"+{wins}/-{losses} (p {p:.0e})"


def step_seconds(run_dir: Path) -> float:
    """Time spent in optimizer steps, summed from metrics.jsonl (each step logs its tokens and tokens/s): the same
    measure for every mode, also for runs resumed from checkpoints written before wall_time_s carried over resumes;
    evaluation, loading and offline's teacher generation are not in it."""
    from ..engine.metrics import read_metrics

    return sum(r["tokens"] / r["tokens_per_s"] for r in read_metrics(run_dir / "metrics.jsonl")
               if r.get("tokens_per_s"))


def newest_mtime(path: Path) -> float:
    return max((p.stat().st_mtime for p in [path, *path.glob("*")] if p.exists()), default=0.0)


def write_outputs(rows: list[dict], out_dir: Path, teacher_em: float, budget: str, notes: list[str] = ()) -> None:
    for r in rows:
        r["of teacher"] = r["exact_match"] / teacher_em if teacher_em else None
    table = format_table(rows, COLUMNS)
    tail = "".join(f"\n{n}" for n in notes)
    print(f"\n{budget}\n{table}\n{tail}\n", flush=True)
    md = markdown_table(rows, COLUMNS, _cell)
    (out_dir / "distill.md").write_text(f"Budget: {budget}\n\n" + md + "\n" + "".join(f"\n- {n}" for n in notes)
                                        + ("\n" if notes else ""))
    (out_dir / "distill.json").write_text(json.dumps({"budget": budget, "rows": rows, "notes": list(notes)},
                                                     indent=2))


def plot_curves(out_dir: Path, modes) -> None:
    """distill-curves.png: the gold validation loss of each run over its steps (metrics.jsonl's eval_loss)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no distill-curves.png (pip install 'tunekit[plot]')", flush=True)
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode in modes:
        rows = [json.loads(x) for x in (out_dir / mode / "metrics.jsonl").read_text().splitlines()]
        points = sorted({m["step"]: m["eval_loss"] for m in rows if m.get("eval_loss") is not None}.items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gold validation CE (log scale)")
    ax.set_title("1/3-depth student: validation loss by training mode")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "distill-curves.png", dpi=120)
    plt.close(fig)


def _cell(column: str, v) -> str:
    if v is None:
        return "-"
    if column in ("exact_match", "json_valid", "of teacher", "fields"):
        return f"{100 * v:.1f}%"
    if column == "params":
        return f"{v / 1e6:.1f}M"
    if column == "eval_loss":
        return f"{v:.4f}"
    if isinstance(v, float):
        return f"{v:,.0f}"
    return str(v)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/distill240")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--scarce-labels", type=int, default=240, help="gold examples sft-scarce may use")
    p.add_argument("--teacher-adapter", default="runs/demo/lora")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (1 when sharing the CPU)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once (give each --threads cores/jobs)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    run_study(a.out, a.steps, a.batch, a.n_test, a.lr, tuple(a.modes), teacher_adapter=a.teacher_adapter,
              threads=a.threads, jobs=a.jobs, scarce_labels=a.scarce_labels)


if __name__ == "__main__":
    main()
