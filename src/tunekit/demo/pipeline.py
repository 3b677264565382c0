"""`tunekit demo`: demo data -> base model exact match -> LoRA fine-tune -> exact match again -> table."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import load_config
from .invoices import write_demo_dataset
from .scoring import format_table

PRESET = Path(__file__).resolve().parents[3] / "configs" / "demo-lora.yaml"
MAX_NEW_TOKENS = 96  # the JSON answers are ~60 tokens; the base model's prose is cut here


def run_demo(out: str = "runs/demo", steps: int | None = None, n_test: int = 100, preset: Path = PRESET) -> list[dict]:
    from ..api import evaluate, train

    if not preset.exists():
        raise FileNotFoundError(f"demo preset {preset} not found; run the demo from a tunekit source checkout")
    t0 = time.perf_counter()
    out_dir = Path(out)
    paths = write_demo_dataset(out_dir / "data", n_test=n_test)
    overrides = {"data.train": str(paths["train"]), "train.output_dir": str(out_dir / "lora")}
    if steps:
        overrides["train.max_steps"] = steps
    cfg = load_config(preset, overrides)

    print(f"== 1/3 base model on {n_test} test invoices", flush=True)
    base = evaluate(str(paths["test"]), model=cfg.model.name, max_new_tokens=MAX_NEW_TOKENS, batch_size=32,
                    output=str(out_dir / "base_predictions.jsonl"))
    print(f"== 2/3 LoRA fine-tune ({cfg.train.max_steps} steps)", flush=True)
    result = train(cfg)
    print("== 3/3 fine-tuned model on the same test invoices", flush=True)
    tuned = evaluate(str(paths["test"]), model=cfg.model.name, adapter=result.run_dir,
                     max_new_tokens=MAX_NEW_TOKENS, batch_size=32, output=str(out_dir / "lora_predictions.jsonl"))

    rows = [
        {"model": "SmolLM2-135M-Instruct (base)", "exact_match": base.scores["exact_match"],
         "json_valid": base.scores["json_valid"], "eval_loss": result.eval_loss_before},
        {"model": f"+ LoRA r={cfg.method.r} ({result.steps} steps)", "exact_match": tuned.scores["exact_match"],
         "json_valid": tuned.scores["json_valid"], "eval_loss": result.eval_loss_after},
    ]
    columns = ["model", "exact_match", "json_valid", "eval_loss"]
    table = format_table(rows, columns)
    fields = format_table(
        [{"field": k, "base %": base.scores["field_accuracy"][k], "lora %": tuned.scores["field_accuracy"][k]}
         for k in base.scores["field_accuracy"]], ["field", "base %", "lora %"])
    summary = (f"\n{table}\n\nper-field accuracy:\n{fields}\n\n"
               f"training: {result.tokens_seen:,} tokens at {result.tokens_per_s:,.0f} tokens/s, "
               f"{result.trainable_params:,} trainable parameters, peak memory "
               f"{result.peak_memory_bytes / 2**30:.2f} GiB; demo wall time {time.perf_counter() - t0:,.0f} s\n")
    print(summary, flush=True)
    (out_dir / "results.md").write_text("```\n" + summary.strip() + "\n```\n")
    (out_dir / "results.json").write_text(json.dumps({"rows": rows, "base": base.scores, "lora": tuned.scores,
                                                      "train": result.__dict__}, indent=2))
    return rows
