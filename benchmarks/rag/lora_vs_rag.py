"""Fine-tune or retrieve? LoRA vs RAG vs both on a knowledge task whose facts live in documents (product sheets,
tunekit.rag.facts_demo), measured on SmolLM2-135M-Instruct on CPU:

  1. base                      the question alone
  2. base + RAG                the question with the top-3 hybrid chunks (answer.rag_prompt)
  3. LoRA (QA, no retrieval)   trained on the train phrasing of every question, asked the test phrasing alone
  4. LoRA (make-data) + RAG    trained on `rag make-data` records (gold chunk + distractors), asked with RAG
  5. then a share of the facts changes, the sheets are rewritten and re-ingested (incremental), and the questions
     about the changed facts are asked again: which setups follow the new facts?

Scores: normalised match (the gold value appears in the answer) and, for RAG setups, citation correctness (the
answer cites [n] and chunk n comes from the product's sheet). Also training cost and answer latency.

    flock /tmp/tunekit-cpu.lock .venv/bin/python benchmarks/rag/lora_vs_rag.py [--products 30] [--steps 30] \
        [--out docs/rag-lora-vs-rag.json]
"""

from __future__ import annotations

import argparse
import json
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


def lora_config(data: str, out: str, steps: int) -> dict:
    return {"model": {"name": "smollm2-135m"},
            "data": {"train": data, "val_fraction": 0.0, "max_length": 768, "packing": True},
            "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "optim": {"lr": 0.002, "schedule": "cosine", "warmup_steps": 6, "max_grad_norm": 1.0},
            "train": {"output_dir": out, "max_steps": steps, "batch_size": 8, "grad_accum": 1, "precision": "auto",
                      "eval_every": 0, "save_every": 0, "seed": 0}}


def answer_all(adapter, rows, retriever=None, batch_size=16):
    """(predictions, hits per row or None, seconds per answer)."""
    from tunekit.inference import generate, load_for_inference

    hits = [retriever.search(r["question"], "hybrid", TOP_K) for r in rows] if retriever else [None] * len(rows)
    convs = [[{"role": "user", "content": rag_prompt(r["question"], h) if h is not None else r["question"]}]
             for r, h in zip(rows, hits)]
    model, tok = load_for_inference("smollm2-135m", adapter, "cpu", merge=True)
    t0 = time.perf_counter()
    preds = generate(model, tok, convs, max_new_tokens=40, batch_size=batch_size)
    return preds, hits, (time.perf_counter() - t0) / len(rows)


def score(rows, preds, hits) -> dict:
    match = [facts_demo.normalised_match(p, r["answer"]) for p, r in zip(preds, rows)]
    out = {"match": round(sum(match) / len(rows), 4), "n": len(rows)}
    if hits[0] is not None:
        correct = []
        for p, r, h in zip(preds, rows, hits):
            answer = check_answer(p, h)
            correct.append(bool(answer.cited) and all(r["source"] in h[n - 1].chunk.source for n in answer.cited))
        out["citation_correct"] = round(sum(correct) / len(rows), 4)
        out["retrieval_hit@3"] = round(sum(any(r["source"] in x.chunk.source for x in h)
                                           for r, h in zip(rows, hits)) / len(rows), 4)
    return out


def main(argv=None) -> int:
    from tunekit import api

    p = argparse.ArgumentParser()
    p.add_argument("--products", type=int, default=30)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--work", default="runs/rag-study")
    p.add_argument("--out", default="docs/rag-lora-vs-rag.json")
    args = p.parse_args(argv)
    work = Path(args.work)
    items = facts_demo.products(args.products)
    sheets = facts_demo.write_sheets(items, work / "sheets")
    store_url = str(work / "store")
    embedder = EmbeddingModel()
    ingest([sheets], "products", store_url, embedder, progress=False)
    retriever = Retriever(open_store(store_url), "products", embedder)
    train, test = facts_demo.questions(items, "train"), facts_demo.questions(items, "test")

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    qa = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
          for r in train]
    (data / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in qa))
    rag_records = make_records(retriever, train, top_k=TOP_K, unanswerable=0.0, seed=0)
    (data / "rag.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rag_records))

    results, cost = {}, {}
    for label, file in (("lora-qa", "qa.jsonl"), ("lora-rag", "rag.jsonl")):
        t0 = time.perf_counter()
        r = api.train(lora_config(str(data / file), str(work / label), args.steps))
        cost[label] = {"train_s": round(time.perf_counter() - t0, 1), "tokens": r.tokens_seen,
                       "tokens_per_s": round(r.tokens_per_s, 1)}
        print(label, cost[label], flush=True)
    setups = {"1 base": (None, False), "2 base + RAG": (None, True), "3 LoRA (QA)": (str(work / "lora-qa"), False),
              "4 LoRA (make-data) + RAG": (str(work / "lora-rag"), True)}
    for name, (adapter, rag) in setups.items():
        preds, hits, latency = answer_all(adapter, test, retriever if rag else None)
        results[name] = {**score(test, preds, hits), "s_per_answer": round(latency, 3)}
        print(name, results[name], flush=True)

    new_items, moved = facts_demo.changed(items, 0.3)
    facts_demo.write_sheets(new_items, sheets)
    t0 = time.perf_counter()
    report = ingest([sheets], "products", store_url, embedder, progress=False)
    reingest = {"updated": report.updated, "unchanged": report.unchanged, "s": round(time.perf_counter() - t0, 2)}
    retriever = Retriever(open_store(store_url), "products", embedder)
    changed_rows = [r for r in facts_demo.questions(new_items, "test") if (r["source"], r["fact"]) in moved]
    old_answers = {(r["source"], r["fact"]): r["answer"] for r in test}
    after = {}
    for name, (adapter, rag) in setups.items():
        preds, hits, _ = answer_all(adapter, changed_rows, retriever if rag else None)
        row = score(changed_rows, preds, hits)
        row["old_value"] = round(sum(facts_demo.normalised_match(p, old_answers[(r["source"], r["fact"])])
                                     for p, r in zip(preds, changed_rows)) / len(changed_rows), 4)
        after[name] = row
        print("after change", name, row, flush=True)
    out = {"meta": {"products": len(items), "test_questions": len(test), "changed_facts": len(moved),
                    "steps": args.steps, "top_k": TOP_K, "model": "SmolLM2-135M-Instruct",
                    "date": time.strftime("%Y-%m-%d", time.gmtime())},
           "training": cost, "before": results, "reingest": reingest, "after_change": after}
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
