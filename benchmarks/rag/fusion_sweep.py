"""Hybrid fusion parameters on collections already ingested (by eval_corpora.py --store DIR): MRR@10 of hybrid
RRF for each dense weight x RRF k, next to bm25 and dense alone. Questions are rebuilt from the corpora.

    flock /tmp/tunekit-cpu.lock .venv/bin/python benchmarks/rag/fusion_sweep.py --store DIR \
        --collections debian-faq-en debian-faq-fr [--out runs/rag-eval/fusion.json]
"""

from __future__ import annotations

import argparse
import json
import sys

from tunekit.rag import corpora
from tunekit.rag.embed import EmbeddingModel
from tunekit.rag.evaluate import evaluate
from tunekit.rag.retrieve import Retriever
from tunekit.rag.stores import open_store


def questions_for(collection: str):
    corpus, lang = collection.rsplit("-", 1)
    return (corpora.debian_faq(lang) if corpus == "debian-faq" else corpora.wiki_summaries(lang))[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--collections", nargs="+", required=True)
    p.add_argument("--weights", nargs="+", type=float, default=[0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    p.add_argument("--ks", nargs="+", type=int, default=[10, 30, 60, 100])
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    store, embedder = open_store(args.store), EmbeddingModel()
    out = {}
    for name in args.collections:
        questions = questions_for(name)[:args.limit]
        retriever = Retriever(store, name, embedder)
        base = evaluate(retriever, questions, ("bm25", "dense"), progress=False)
        row = {"bm25": base["bm25"]["mrr@10"], "dense": base["dense"]["mrr@10"], "hybrid": {}}
        for k in args.ks:
            for w in args.weights:
                r = evaluate(retriever, questions, ("hybrid",), progress=False, rrf_k=k, dense_weight=w)
                row["hybrid"][f"k={k},w={w:g}"] = r["hybrid"]["mrr@10"]
        best = max(row["hybrid"].items(), key=lambda kv: kv[1])
        print(f"{name}: bm25 {row['bm25']:.3f} dense {row['dense']:.3f} hybrid(k=60,w=1) "
              f"{row['hybrid'].get('k=60,w=1', float('nan')):.3f} best {best}", flush=True)
        print("   " + "  ".join(f"{key}:{v:.3f}" for key, v in row["hybrid"].items()), flush=True)
        out[name] = row
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
