"""Fine-tune or retrieve? LoRA vs RAG vs both on a knowledge task whose facts live in documents (product sheets,
tunekit.rag.facts_demo), measured on SmolLM2-135M-Instruct on CPU:

  1 base                       the question alone
  2 base + RAG                 the question with the top-3 hybrid chunks (answer.rag_prompt)
  3 LoRA (QA)                  trained on the train phrasing of every question (no retrieval), asked the test
                               phrasing alone
  3b LoRA (QA) + RAG           the same adapter, asked with the chunks
  4 LoRA (make-data) + RAG     trained on `rag make-data` records (rag.make_data.make_records: the gold chunk among
                               distractors, target "answer [n]"), asked with the chunks
  then a share of the facts changes, the sheets are rewritten and re-ingested (incremental), and the questions about
  the changed facts are asked again: which setups follow the new facts, which still answer the old ones?

Scores: normalised match (the gold value appears in the answer; facts_demo.normalised_match) and, for RAG setups,
citation correctness (the answer cites at least one [n], every chunk it cites comes from the product's sheet, and
one of them holds the gold value) and answer-in-context (one of the 3 chunks given holds the gold value: the
ceiling retrieval sets).
Also training cost, retrieval and generation time per answer, prompt length.

Phases, each one queued job (state under --work, so a later phase reuses the adapters of an earlier one):

    /tmp/cpuq study-train-qa  .venv/bin/python benchmarks/rag/lora_vs_rag.py --phase train-qa
    /tmp/cpuq study-train-rag .venv/bin/python benchmarks/rag/lora_vs_rag.py --phase train-rag
    /tmp/cpuq study-before    .venv/bin/python benchmarks/rag/lora_vs_rag.py --phase before
    /tmp/cpuq study-after     .venv/bin/python benchmarks/rag/lora_vs_rag.py --phase after
    .venv/bin/python benchmarks/rag/lora_vs_rag.py --phase report   # docs/rag-lora-vs-rag.{json,png} + table
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from tunekit.rag import facts_demo
from tunekit.rag.answer import check_answer, rag_prompt
from tunekit.rag.embed import EmbeddingModel
from tunekit.rag.ingest import ingest
from tunekit.rag.make_data import make_records
from tunekit.rag.retrieve import Retriever
from tunekit.rag.stores import open_store

TOP_K = 3
PHASES = ("train-qa", "train-rag", "before", "after")
MODEL = "smollm2-135m"
SETUPS = {"1 base": (None, False), "2 base + RAG": (None, True), "3 LoRA (QA)": ("lora-qa", False),
          "3b LoRA (QA) + RAG": ("lora-qa", True), "4 LoRA (make-data) + RAG": ("lora-rag", True)}


def lora_config(data: str, out: str, steps: int) -> dict:
    return {"model": {"name": MODEL},
            "data": {"train": data, "val_fraction": 0.0, "max_length": 768, "packing": True},
            "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "optim": {"lr": 0.002, "schedule": "cosine", "warmup_steps": 6, "max_grad_norm": 1.0},
            "train": {"output_dir": out, "max_steps": steps, "batch_size": 4, "grad_accum": 1, "precision": "auto",
                      "eval_every": 0, "save_every": 0, "seed": 0}}


def collection(work: Path, items: list[dict], embedder) -> tuple[Retriever, dict]:
    """Write the sheets of `items` and ingest them (incremental: only changed sheets are re-embedded)."""
    sheets = facts_demo.write_sheets(items, work / "sheets")
    t0 = time.perf_counter()
    report = ingest([sheets], "products", str(work / "store"), embedder, progress=False)
    stats = {"added": report.added, "updated": report.updated, "unchanged": report.unchanged,
             "chunks_written": report.chunks, "s": round(time.perf_counter() - t0, 2)}
    return Retriever(open_store(str(work / "store")), "products", embedder), stats


def answer_all(adapter, rows, retriever=None, batch_size=16) -> tuple[list[str], list, dict]:
    """(predictions, hits per row or None, timings)."""
    from tunekit.inference import generate, load_for_inference

    t0 = time.perf_counter()
    hits = [retriever.search(r["question"], "hybrid", TOP_K) for r in rows] if retriever else [None] * len(rows)
    retrieval_s = time.perf_counter() - t0
    convs = [[{"role": "user", "content": rag_prompt(r["question"], h) if h is not None else r["question"]}]
             for r, h in zip(rows, hits)]
    model, tok = load_for_inference(MODEL, adapter, "cpu", merge=True)
    prompt_tokens = sum(len(tok(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)["input_ids"]) for c in convs) / len(convs)
    t0 = time.perf_counter()
    preds = generate(model, tok, convs, max_new_tokens=40, batch_size=batch_size)
    timing = {"retrieval_ms_per_question": round(retrieval_s * 1000 / len(rows), 2) if retriever else 0.0,
              "generation_s_per_answer": round((time.perf_counter() - t0) / len(rows), 3),
              "prompt_tokens": round(prompt_tokens, 1)}
    return preds, hits, timing


def score(rows, preds, hits) -> dict:
    match = [facts_demo.normalised_match(p, r["answer"]) for p, r in zip(preds, rows)]
    out = {"match": round(sum(match) / len(rows), 4), "n": len(rows)}
    if hits[0] is not None:
        correct = []
        for p, r, h in zip(preds, rows, hits):
            cited = [h[n - 1].chunk for n in check_answer(p, h).cited]
            correct.append(bool(cited) and all(r["source"] in c.source for c in cited)
                           and any(facts_demo.normalised_match(c.text, r["answer"]) for c in cited))
        out["citation_correct"] = round(sum(correct) / len(rows), 4)
        out["answer_in_context"] = round(sum(any(facts_demo.normalised_match(x.chunk.text, r["answer"]) for x in h)
                                             for r, h in zip(rows, hits)) / len(rows), 4)
    return out


def examples(rows, preds, n=3) -> list[dict]:
    return [{"question": r["question"], "gold": r["answer"], "answer": p} for r, p in zip(rows[:n], preds[:n])]


def phase_train(args, work: Path, label: str) -> dict:
    """train-qa: sheets, collection and both training files anew, then the QA LoRA; train-rag: the make-data LoRA
    on the files train-qa wrote (two queued jobs, each under 15 minutes)."""
    from tunekit import api

    data = work / "data"
    cost = {}
    if label == "lora-qa":
        for sub in ("store", "sheets", "data", "lora-qa", "lora-rag"):
            shutil.rmtree(work / sub, ignore_errors=True)
        items = facts_demo.products(args.products)
        retriever, cost["ingest"] = collection(work, items, EmbeddingModel())
        train = facts_demo.questions(items, "train")
        data.mkdir(parents=True, exist_ok=True)
        qa = [{"messages": [{"role": "user", "content": r["question"]},
                            {"role": "assistant", "content": r["answer"]}]} for r in train]
        (data / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in qa))
        t0 = time.perf_counter()
        rag_records = make_records(retriever, train, top_k=TOP_K, unanswerable=0.0, seed=0)
        cost["make_data_s"], cost["records"] = round(time.perf_counter() - t0, 2), len(rag_records)
        (data / "rag.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rag_records))
    elif not (data / "rag.jsonl").exists():
        raise SystemExit(f"{data / 'rag.jsonl'} missing: run --phase train-qa first")
    file = "qa.jsonl" if label == "lora-qa" else "rag.jsonl"
    t0 = time.perf_counter()
    r = api.train(lora_config(str(data / file), str(work / label), args.steps))
    cost[label] = {"train_s": round(time.perf_counter() - t0, 1), "steps": args.steps, "tokens": r.tokens_seen,
                   "tokens_per_s": round(r.tokens_per_s, 1)}
    print(label, cost[label], flush=True)
    return cost


def phase_eval(args, work: Path, after: bool) -> dict:
    items = facts_demo.products(args.products)
    embedder = EmbeddingModel()
    test = facts_demo.questions(items, "test")
    if after:
        new_items, moved = facts_demo.changed(items, args.change)
        retriever, reingest = collection(work, new_items, embedder)
        rows = [r for r in facts_demo.questions(new_items, "test") if (r["source"], r["fact"]) in moved]
        old = {(r["source"], r["fact"]): r["answer"] for r in test}
    else:
        retriever, reingest = collection(work, items, embedder)  # the original sheets (also after an `after` run)
        rows = test
    out = {"reingest": reingest, "questions": len(rows), "setups": {}}
    for name, (adapter, rag) in SETUPS.items():
        preds, hits, timing = answer_all(str(work / adapter) if adapter else None, rows, retriever if rag else None)
        row = {**score(rows, preds, hits), **timing, "examples": examples(rows, preds)}
        if after:
            row["old_value"] = round(sum(facts_demo.normalised_match(p, old[(r["source"], r["fact"])])
                                         for p, r in zip(preds, rows)) / len(rows), 4)
        out["setups"][name] = row
        print("after change" if after else "before", name, {k: v for k, v in row.items() if k != "examples"},
              flush=True)
    return out


def report(work: Path, out: str, png: str, args) -> None:
    runs = {p: json.loads((work / f"{p}.json").read_text()) for p in PHASES}
    train = {**runs["train-qa"], **runs["train-rag"]}
    before, after = runs["before"], runs["after"]
    merged = {"meta": {"model": "SmolLM2-135M-Instruct", "products": args.products,
                       "test_questions": before["questions"], "changed_facts": after["questions"],
                       "change_share": args.change, "steps": args.steps, "top_k": TOP_K,
                       "runs": {p: r.get("meta") for p, r in runs.items()}},
              "training": train, "before": before, "after_change": after}
    Path(out).write_text(json.dumps(merged, indent=2))
    print(table(merged))
    plot(merged, png)


def table(d: dict) -> str:
    tr, m = d["training"], d["meta"]
    lines = ["| setup | match | citation correct | answer in context | after change: new value | after change: old "
             "value | training | s / answer (gen + retrieval) | prompt tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, (adapter, _) in SETUPS.items():
        b, a = d["before"]["setups"][name], d["after_change"]["setups"][name]
        cost = f"{tr[adapter]['train_s']:.0f} s ({tr[adapter]['steps']} steps)" if adapter else "-"
        cite = lambda r: f"{r['citation_correct']:.3f}" if "citation_correct" in r else "-"  # noqa: E731
        hit = f"{b['answer_in_context']:.3f}" if "answer_in_context" in b else "-"
        lat = b["generation_s_per_answer"] + b["retrieval_ms_per_question"] / 1000
        lines.append(f"| {name} | {b['match']:.3f} | {cite(b)} | {hit} | {a['match']:.3f} | {a['old_value']:.3f} | "
                     f"{cost} | {lat:.3f} | {b['prompt_tokens']:.0f} |")
    lines.append(f"\n{m['products']} products, {m['test_questions']} test questions (phrasings unseen in training); "
                 f"after {m['change_share']:.0%} of the non-contact facts changed: {m['changed_facts']} questions, "
                 f"re-ingest {d['after_change']['reingest']}.")
    return "\n".join(lines)


def plot(d: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(SETUPS)
    series = {"before: match": [d["before"]["setups"][n]["match"] for n in names],
              "before: citation correct": [d["before"]["setups"][n].get("citation_correct", np.nan) for n in names],
              "after change: new value": [d["after_change"]["setups"][n]["match"] for n in names],
              "after change: still the old value": [d["after_change"]["setups"][n]["old_value"] for n in names]}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    x, w = np.arange(len(names)), 0.2
    for j, (label, vals) in enumerate(series.items()):
        bars = ax.bar(x + (j - 1.5) * w, vals, w, label=label)
        ax.bar_label(bars, labels=[("" if np.isnan(v) else f"{v:.2f}") for v in vals], fontsize=7)
    ax.set_xticks(x, names, fontsize=9)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of questions")
    m = d["meta"]
    ax.set_title(f"LoRA vs RAG vs both: SmolLM2-135M, {m['products']} product sheets, {m['test_questions']} test "
                 f"questions; then {m['changed_facts']} facts changed and re-ingested", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def meta() -> dict:
    import os
    import subprocess

    cpu = next((x.split(":", 1)[1].strip() for x in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if x.startswith("Model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", choices=[*PHASES, "report", "all"], default="all")
    p.add_argument("--products", type=int, default=30)
    p.add_argument("--steps", type=int, default=24, help="per LoRA, batch 4 packed rows of 768 tokens (~74k tokens)")
    p.add_argument("--change", type=float, default=0.3, help="share of the (product, fact) pairs changed")
    p.add_argument("--work", default="runs/rag-study")
    p.add_argument("--out", default="docs/rag-lora-vs-rag.json")
    p.add_argument("--png", default="docs/rag-lora-vs-rag.png")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    phases = [*PHASES, "report"] if args.phase == "all" else [args.phase]
    for phase in phases:
        if phase == "report":
            report(work, args.out, args.png, args)
            continue
        t0 = time.perf_counter()
        result = (phase_train(args, work, "lora-" + phase.split("-")[1]) if phase.startswith("train")
                  else phase_eval(args, work, after=phase == "after"))
        result["meta"] = {**meta(), "phase_s": round(time.perf_counter() - t0, 1), "products": args.products,
                          "steps": args.steps}
        (work / f"{phase}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
