"""One benchmark run per process: `python -m tunekit.bench.runners SPEC.json`.

Each runner trains the same LoRA on the same prepared examples for a fixed budget, records a timestamp and
the real (non-padding) token count of every optimizer step, saves the adapter in PEFT format and writes
`result.json` into the spec's `out` folder. The parent measures the process's peak RSS (wait4) and scores
every adapter with one shared eval function, so no tool grades itself.

On CUDA (spec `device`), every run also records torch.cuda.max_memory_allocated, the peak the table shows there.

Runners: `trainer` (transformers Trainer + peft, fp32, padded batches: the recipe most tutorials give; with
`trainer_bf16`, the same under bf16 autocast),
`trl` (TRL SFTTrainer: bf16, packing, completion-only loss), `tunekit` (our engine, with `variant` switches
that turn single optimisations off for the ablation table), `eval` (the shared scorer).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ..config import load_config
from ..data import prepare_data
from ..models import load_model, load_tokenizer, resolve_model_path


def lora_config(spec: dict):
    from peft import LoraConfig

    return LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                      target_modules=list(spec["targets"]), bias="none", task_type="CAUSAL_LM")


def prepared(spec: dict, split: str):
    """The examples every runner trains on: tunekit's chat-template tokenisation and completion-only labels."""
    tok = load_tokenizer(spec["model"])
    cfg = load_config(None, {"data.train": spec[split], "data.val_fraction": 0.0,
                             "data.max_length": spec["max_length"]})
    return tok, prepare_data(cfg.data, tok).train


class StepClock:
    """Timestamps at the end of every optimizer step (the first one at the start of training)."""

    def __init__(self):
        self.marks: list[float] = []

    def mark(self):
        self.marks.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.marks[:-1], self.marks[1:])]


def _hf_callback(clock: StepClock, token_budget: int | None, tokens: list[int]):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.mark()

        def on_step_end(self, args, state, control, **kw):
            clock.mark()
            if token_budget and sum(tokens[: len(clock.marks) - 1]) >= token_budget:
                control.should_training_stop = True

    return Clock()


def run_trainer(spec: dict, out: Path) -> dict:
    """transformers Trainer + peft LoRA, fp32, batches padded to the longest (the common tutorial recipe)."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok, examples = prepared(spec, "train")
    rows = [{"input_ids": ex.input_ids, "labels": ex.labels, "attention_mask": [1] * len(ex.input_ids)}
            for ex in examples]
    tokens: list[int] = []
    pad = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def collate(batch):
        tokens.append(sum(len(r["input_ids"]) for r in batch))  # real tokens, before padding
        return pad(batch)

    model = load_model(spec["model"], "float32", attn_implementation="sdpa")
    model = get_peft_model(model, lora_config(spec))
    clock = StepClock()
    bf16 = bool(spec.get("trainer_bf16"))
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=spec["max_grad_norm"], bf16=bf16,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=spec_device(spec) == "cpu",
        dataloader_num_workers=0, seed=spec["seed"], remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                      callbacks=[_hf_callback(clock, None, tokens)])
    trainer.train()
    model.save_pretrained(out / "adapter")
    return {"step_times": clock.step_times(), "step_tokens": tokens[: len(clock.step_times())],
            "precision": "bf16" if bf16 else "fp32", "packing": False}


def run_trl(spec: dict, out: Path) -> dict:
    """TRL SFTTrainer: bf16 autocast, BFD packing (padding-free rows), completion-only loss."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(spec["model"])
    records = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines() if line.strip()]
    rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records]
    tokens: list[int] = []
    clock = StepClock()
    args = SFTConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=1, max_steps=spec["steps"] * 4,
        max_length=spec["trl_row_tokens"], packing=True, completion_only_loss=True, bf16=True,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=spec["max_grad_norm"],
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=spec_device(spec) == "cpu",
        dataloader_num_workers=0, seed=spec["seed"], disable_tqdm=True, dataset_num_proc=1,
    )
    model = load_model(spec["model"], "float32", attn_implementation="sdpa")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora_config(spec), callbacks=[_hf_callback(clock, spec["token_budget"], tokens)])
    collate = trainer.data_collator

    def counting(batch):
        out_batch = collate(batch)
        mask = out_batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else int(out_batch["input_ids"].numel()))
        return out_batch

    trainer.data_collator = counting
    trainer.train()
    trainer.model.save_pretrained(out / "adapter")
    return {"step_times": clock.step_times(), "step_tokens": tokens[: len(clock.step_times())],
            "precision": "bf16", "packing": True}


def run_tunekit(spec: dict, out: Path) -> dict:
    """Our engine with the same LoRA and data; `variant` switches single optimisations off for the ablation."""
    from ..engine import loop, objective
    from ..engine.loss import IGNORE

    variant = spec.get("variant", {})
    overrides = {
        "data.train": spec["train"], "data.val_fraction": 0.0, "data.max_length": spec["max_length"],
        "method.r": spec["r"], "method.alpha": spec["alpha"], "method.dropout": spec["dropout"],
        "method.target_modules": list(spec["targets"]), "optim.lr": spec["lr"], "optim.schedule": "constant",
        "optim.warmup_steps": 0, "optim.max_grad_norm": spec["max_grad_norm"], "train.max_steps": spec["steps"],
        "train.batch_size": spec["batch_size"], "train.seed": spec["seed"], "train.eval_every": 0,
        "train.save_every": 0, "train.progress": False, "train.output_dir": str(out / "run"),
        "train.device": spec_device(spec), "model.name": spec["model"],
    }
    overrides.update(variant.get("overrides", {}))
    if variant.get("full_logits"):
        def full_logits_loss_sum(hidden, head, targets):  # (B, T, H) -> logits at every position
            logits = head(hidden).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                                     reduction="sum")
            return loss, int((targets != IGNORE).sum())

        # objective.py holds the name the loop's forward calls (gold_loss_sum); patching it anywhere else is a no-op
        objective.label_only_loss_sum = full_logits_loss_sum
    if variant.get("unfused_adamw"):
        from ..engine import schedule

        def unfused(named_params, cfg):
            return torch.optim.AdamW(list(named_params.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay, foreach=False, fused=False)

        loop.build_optimizer = unfused
        schedule.build_optimizer = unfused
    cfg = load_config(None, overrides)
    loop.train(cfg)
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens" in r]
    (out / "adapter").symlink_to((out / "run").resolve(), target_is_directory=True)
    run = json.loads((out / "run" / "result.json").read_text())
    return {"step_times": [r["tokens"] / r["tokens_per_s"] for r in steps], "step_tokens": [r["tokens"] for r in steps],
            "precision": run["precision"], "packing": cfg.data.packing,
            "planned_peak_bytes": run.get("planned_peak_bytes")}  # tunekit plan's prediction for this run


def run_eval(spec: dict, out: Path) -> dict:
    """Mean completion-token loss of base + each adapter on the held-out set, fp32, padded batches."""
    from peft import PeftModel

    from ..engine.batching import eval_batches
    from ..engine.loss import label_only_loss_sum

    tok, examples = prepared(spec, "test")
    device = torch.device(spec_device(spec))

    def mean_loss(model) -> float:
        model.to(device).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in eval_batches(examples, 16, False, tok.pad_token_id):
                batch = batch.to(device)
                hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                loss_sum, n = label_only_loss_sum(hidden.last_hidden_state, model.lm_head, batch.targets)
                total, count = total + float(loss_sum), count + n
        return total / count

    def base():
        return load_model(spec["model"], "float32", attn_implementation="sdpa")

    losses = {name: mean_loss(PeftModel.from_pretrained(base(), adapter).get_base_model())
              for name, adapter in spec["adapters"].items()}
    return {"eval_loss": losses, "base_eval_loss": mean_loss(base())}


def spec_device(spec: dict) -> str:
    """"cpu" or "cuda": the parent's choice (train_bench --device), else CUDA when there is one."""
    return spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")


RUNNERS = {"trainer": run_trainer, "trl": run_trl, "tunekit": run_tunekit, "eval": run_eval}


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec.get("seed", 0))
    resolve_model_path(spec["model"])  # converts the packaged GGUF once, outside any timing
    result = RUNNERS[spec["runner"]](spec, out)
    result["torch_threads"] = torch.get_num_threads()
    if spec_device(spec) == "cuda":  # everything the run allocated through torch on the GPU, at its peak
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    from ..allocator import in_use

    result["malloc"] = in_use()
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out / "result.json")


if __name__ == "__main__":
    main(sys.argv[1:])
