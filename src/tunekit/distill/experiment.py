"""The distillation study on the demo task: teacher vs a 1/3-depth student after SFT and after each KD mode.

    python benchmarks/distill_demo.py [--steps 80] [--n-test 100] [--modes sft offline logit on-policy]

1. data: the demo invoices (written if missing); every run sees the same `steps x batch` training prompts once and
   the same gold validation examples
2. teacher: SmolLM2-135M-Instruct + the demo's LoRA (trained with configs/demo-lora.yaml if missing); exact match
3. student: `tunekit shrink --every 3` of the teacher (adapter merged): 10 of 30 layers
4. one run per mode, same steps / batch / learning rate / method (full fine-tuning of the student):
   sft (gold labels, no teacher), offline (teacher's greedy answers), logit (alpha CE + (1-alpha) KL), on-policy
5. exact match of each on the same test invoices; table (Markdown + JSON) in --out
Each training run is a `tunekit train` / `tunekit distill` process of its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..demo.invoices import write_demo_dataset
from ..demo.pipeline import MAX_NEW_TOKENS, PRESET
from ..demo.scoring import format_table, markdown_table
from ..evaluate import score_text

MODES = ("sft", "offline", "logit", "on-policy")
COLUMNS = ["model", "layers", "params", "exact_match", "of teacher", "fields", "json_valid", "eval_loss", "train s"]


def field_mean(scores: dict) -> float | None:
    """Mean per-field accuracy (vendor, invoice_id, dates, currency, total): partial credit where exact match is 0."""
    acc = scores.get("field_accuracy") or {}
    return sum(acc.values()) / len(acc) if acc else None


def base_tree(student: str, train: Path, val: Path, out: Path, steps: int, batch: int, lr: float,
              threads: int | None = None) -> dict:
    return {"model": {"name": student},
            "data": {"train": str(train), "validation": str(val), "max_length": 512, "packing": True},
            "method": {"name": "full"},
            "optim": {"lr": lr, "schedule": "cosine", "warmup_steps": 10, "max_grad_norm": 1.0},
            "train": {"output_dir": str(out), "max_steps": steps, "batch_size": batch, "precision": "auto",
                      "eval_every": 0, "save_every": 0, "progress": True, "seed": 0, "threads": threads}}


def distill_section(mode: str, teacher: str, adapter: str) -> dict | None:
    common = {"teacher": teacher, "teacher_adapter": adapter, "max_new_tokens": MAX_NEW_TOKENS}
    return {
        "sft": None,
        "offline": {"mode": "offline", **common},
        "logit": {"mode": "logit", "alpha": 0.5, "temperature": 1.0, "divergence": "forward_kl", **common},
        # GKD's recipe mixes student samples with gold batches; a student this broken at step 0 samples noise.
        "on-policy": {"mode": "on-policy", "on_policy_fraction": 0.5, "alpha": 0.5, "divergence": "reverse_kl",
                      **common},
    }[mode]


def run_cli(argv: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "tunekit.cli", *argv], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"tunekit {' '.join(argv)} failed; see {log}:\n{log.read_text()[-3000:]}")


def budget_split(train: Path, out: Path, n_train: int, n_val: int) -> tuple[Path, Path]:
    """The first n_train records for training (each seen once in the budget), the next n_val for validation."""
    lines = train.read_text().splitlines(keepends=True)
    if len(lines) < n_train + n_val:
        raise ValueError(f"{train} has {len(lines)} records; the budget needs {n_train} + {n_val} validation")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(lines[:n_train]))
    (out / "val.jsonl").write_text("".join(lines[n_train : n_train + n_val]))
    return out / "train.jsonl", out / "val.jsonl"


def run_study(out: str = "runs/distill", steps: int = 80, batch: int = 8, n_test: int = 100, lr: float = 2e-4,
              modes: tuple[str, ...] = MODES, teacher: str = "smollm2-135m", teacher_adapter: str = "runs/demo/lora",
              every: int = 3, threads: int | None = None) -> list[dict]:
    from ..api import evaluate, shrink

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_demo_dataset(Path("runs/demo/data"), n_test=n_test)
    train, val = budget_split(paths["train"], out_dir / "data", steps * batch, 48)
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
    if (student / "shrink.json").exists() and json.loads((student / "shrink.json").read_text())["teacher_adapter"] \
            == teacher_adapter:
        report = json.loads((student / "shrink.json").read_text())
    else:
        report = shrink(teacher, str(student), every=every, adapter=teacher_adapter)
    rows.append({"model": "teacher (base + demo LoRA)", "layers": report["teacher_layers"],
                 "params": report["teacher_params"], "exact_match": t["exact_match"], "json_valid": t["json_valid"],
                 "fields": field_mean(t)})
    s0 = score(str(student), None, "student0")
    rows.append({"model": "student, untrained (shrink --every 3)", "layers": len(report["kept_layers"]),
                 "params": report["student_params"], "exact_match": s0["exact_match"], "json_valid": s0["json_valid"],
                 "fields": field_mean(s0)})
    for mode in modes:
        run_dir = out_dir / mode
        tree = base_tree(str(student), train, val, run_dir, steps, batch, lr, threads)
        section = distill_section(mode, teacher, teacher_adapter)
        if section:
            tree["distill"] = section
        config = out_dir / "configs" / f"{mode}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(tree, sort_keys=False)
        done = (run_dir / "result.json").exists() and config.exists() and config.read_text() == text
        if not done:  # a finished run with the same config is reused (rerun the study after a change)
            config.write_text(text)
            print(f"== {mode}: {steps} steps (log: {out_dir / (mode + '.log')})", flush=True)
            run_cli(["train" if section is None else "distill", "--config", str(config)], out_dir / f"{mode}.log")
        result = json.loads((run_dir / "result.json").read_text())
        seconds = result["wall_time_s"]
        s = score(str(run_dir), None, mode)
        rows.append({"model": f"student + {mode}" if mode != "sft" else "student + SFT on gold labels",
                     "layers": len(report["kept_layers"]), "params": report["student_params"],
                     "exact_match": s["exact_match"], "json_valid": s["json_valid"], "fields": field_mean(s),
                     "eval_loss": result["eval_loss_after"], "train s": seconds})
        write_outputs(rows, out_dir, t["exact_match"], f"{steps} steps x {batch} examples (each training prompt "
                      f"seen once), full fine-tuning, lr {lr}, {n_test} test invoices")
    return rows


def newest_mtime(path: Path) -> float:
    return max((p.stat().st_mtime for p in [path, *path.glob("*")] if p.exists()), default=0.0)


def write_outputs(rows: list[dict], out_dir: Path, teacher_em: float, budget: str) -> None:
    for r in rows:
        r["of teacher"] = r["exact_match"] / teacher_em if teacher_em else None
    table = format_table(rows, COLUMNS)
    print(f"\n{budget}\n{table}\n", flush=True)
    md = markdown_table(rows, COLUMNS, _cell)
    (out_dir / "distill.md").write_text(f"Budget: {budget}\n\n" + md + "\n")
    (out_dir / "distill.json").write_text(json.dumps({"budget": budget, "rows": rows}, indent=2))


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
    p.add_argument("--out", default="runs/distill")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--teacher-adapter", default="runs/demo/lora")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (1 when sharing the CPU)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    run_study(a.out, a.steps, a.batch, a.n_test, a.lr, tuple(a.modes), teacher_adapter=a.teacher_adapter,
              threads=a.threads)


if __name__ == "__main__":
    main()
