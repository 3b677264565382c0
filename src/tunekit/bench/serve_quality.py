"""What serving choices do to quality on the demo task: JSON-schema decoding and int8 weights.

    tunekit bench serve-quality [--adapter runs/demo/lora] [--n 100] [--out docs]

On the demo's 100 test invoices (the same split `make demo` scores), through the serving engine, greedy:
exact match and JSON validity of the base model and of the adapter, each without and with the task's JSON schema
as `response_format` (constrained decoding), in the serving dtype and with int8 weights; the cost of the grammar
per generated token; and the KL divergence of each precision's next-token distribution from fp32, teacher-forced
on the reference answers. Writes serve-quality.json and .md into --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}
INVOICE_SCHEMA = {
    "type": "object",
    "properties": {"vendor": {"type": "string"}, "invoice_id": {"type": "string"}, "date": DATE,
                   "due_date": {"anyOf": [DATE, {"type": "null"}]},
                   "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}, "total": {"type": "number"}},
    "required": ["vendor", "invoice_id", "date", "due_date", "currency", "total"], "additionalProperties": False}


def generate_all(engine, convs, adapter, grammar, max_tokens=128) -> tuple[list[str], int, float]:
    from ..serve.sampling import SamplingParams

    texts, tokens = [None] * len(convs), [0]

    def sink(i):
        parts = []

        def on_event(e):
            parts.append(e.text)
            tokens[0] += len(e.token_ids)
            if e.finish_reason:
                texts[i] = "".join(parts)
        return on_event

    t = time.perf_counter()
    for i, conv in enumerate(convs):
        engine.submit(engine.encode_chat(conv), SamplingParams(max_tokens=max_tokens), adapter=adapter,
                      on_event=sink(i), grammar=grammar)
    # the loop on this thread (the one that loaded the model: see Engine.run), until every request finished
    engine.run(until=lambda: all(x is not None for x in texts))
    return texts, tokens[0], time.perf_counter() - t


def teacher_forced_logprobs(engine, records, adapter) -> list[torch.Tensor]:
    """Per record: (answer tokens, V) log-probs of the reference answer positions, through the engine's runner."""
    from ..serve.runner import Work

    runner = engine.base.runner
    lora = engine.adapters[adapter].lora if adapter else None
    out = []
    for rec in records:
        prompt = engine.encode_chat(rec["messages"][:1])
        answer = engine.tokenizer(rec["messages"][1]["content"], add_special_tokens=False)["input_ids"]
        slot = runner.cache.take_slot()
        try:
            logits = runner.forward([Work(slot, 0, prompt + answer, lora, True)], all_positions=True)
        finally:
            runner.cache.release_slot(slot)
        out.append(torch.log_softmax(logits[len(prompt) - 1: -1], dim=-1))
    return out


def main(argv: list[str] | None = None) -> dict:
    from ..demo.invoices import write_demo_dataset
    from ..demo.scoring import score_predictions
    from ..serve.engine import Engine, ServeOptions
    from .serve_bench import cpu_name, isa_label

    p = argparse.ArgumentParser(prog="tunekit bench serve-quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", default=None, help="a run folder to score too (e.g. runs/demo/lora)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--kl-n", type=int, default=20, help="test records for the KL column")
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        test = Path(write_demo_dataset(tmp, n_test=args.n)["test"]).read_text().splitlines()
    records = [json.loads(line) for line in test]
    convs = [r["messages"][:1] for r in records]
    refs = [r["messages"][1]["content"] for r in records]
    rows, reference = [], {}
    for dtype, quant in (("float32", None), ("auto", None), ("auto", "int8")):
        engine = Engine(ServeOptions(model=args.model, dtype=dtype, quantize=quant, max_num_seqs=32))
        label = f"{str(engine.dtype).replace('torch.', '')}{' + int8 weights' if quant else ''}"
        if args.adapter:
            engine.load_adapter("adapter", args.adapter)
        grammar = engine.grammars.grammar({"type": "json_schema", "json_schema": {"name": "invoice",
                                                                                  "schema": INVOICE_SCHEMA}})
        try:  # the engine is driven from this thread (generate_all), never concurrently with the runner calls
            for adapter in ([None, "adapter"] if args.adapter else [None]):
                lp = teacher_forced_logprobs(engine, records[: args.kl_n], adapter)
                if dtype == "float32":
                    reference[adapter] = lp
                kl = sum(torch.nn.functional.kl_div(q, r, log_target=True, reduction="sum").item()
                         for q, r in zip(lp, reference[adapter])) / sum(len(r) for r in reference[adapter])
                for use_schema in (False, True):
                    texts, tokens, wall = generate_all(engine, convs, adapter, grammar if use_schema else None)
                    score = score_predictions(texts, refs)
                    rows.append({"model": "base" if adapter is None else "adapter", "precision": label,
                                 "schema": use_schema, "exact_match": score["exact_match"],
                                 "json_valid": score["json_valid"], "tokens": tokens, "wall_s": wall,
                                 "ms_per_token": wall / max(tokens, 1) * 1e3, "kl_to_fp32": kl})
                    print(f"  {rows[-1]}", flush=True)
        finally:
            del engine
    result = {"cpu": cpu_name(), "isa": isa_label(), "n": args.n,
              "adapter": args.adapter, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve-quality.json").write_text(json.dumps(result, indent=2))
    lines = [f"Serving quality on the demo's {args.n} test invoices, {result['cpu']} ({result['isa']}), greedy, "
             f"{result['date']}; adapter: {args.adapter or 'none'}.", "",
             "| model | weights | JSON schema | exact match | JSON valid | ms / generated token | KL to fp32 (nats/token) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {'yes' if r['schema'] else 'no'} | "
                     f"{r['exact_match']:.1%} | {r['json_valid']:.1%} | {r['ms_per_token']:.1f} | {r['kl_to_fp32']:.2e} |")
    (out / "serve-quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result
