"""Speed and scale of tunekit rag, with Haystack's in-memory retrievers as the peer in the same process:

- ingest: `tunekit.rag.ingest.ingest` end to end (read .md files, chunk, embed with all-MiniLM-L6-v2, write) on
  `--ingest-docs` Wikipedia articles written out as files: chunks/s;
- per store (FAISS flat, FAISS HNSW, PostgreSQL + pgvector HNSW) at each size: fill rate (chunks/s written with
  their vectors given), BM25 first build, query p50/p95 of `Retriever.search` for bm25 / dense / hybrid (top 10,
  the query vector given: the query embedding is measured once, separately, and is the same for every store),
  recall@10 against exact search (FAISS flat) for dense and hybrid, the index's size; FAISS HNSW at efSearch
  16/64/128;
- peer: Haystack 2's InMemoryDocumentStore (InMemoryBM25Retriever with BM25Okapi, InMemoryEmbeddingRetriever,
  DocumentJoiner reciprocal_rank_fusion) over the same chunks, vectors and queries;
- bm25s against rank_bm25 (BM25Okapi) on the same stemmed tokens, at sizes up to 20k.

Chunks: the wiki-en and wiki-fr collections that `eval_corpora.py --store runs/rag-eval/store` ingested (20,547
chunks of Wikipedia summaries, vectors reused), else embedded here. 10k = the first 10,000 (English); larger sizes
repeat the corpus, each further copy with its vectors jittered (Gaussian, sigma 0.02 per dimension, renormalised)
and its sources renamed, so the indexes are real sizes while the embedding is paid once (BM25 then sees exact
duplicates of every text). Queries: `--queries` Wikidata descriptions (English), seeded.

    /tmp/cpuq rag-speed .venv/bin/python benchmarks/rag/speed.py --sizes 10000 --out runs/rag-speed-10k.json
    /tmp/cpuq rag-speed .venv/bin/python benchmarks/rag/speed.py --sizes 100000 --ingest-docs 0 \
        --out runs/rag-speed-100k.json
    .venv/bin/python benchmarks/rag/speed.py --merge runs/rag-speed-10k.json runs/rag-speed-100k.json \
        --out docs/rag-speed.json --png docs/rag-speed.png      # also prints the markdown table

The peer needs haystack-ai (not a tunekit dependency): `pip install --target runs/peer-haystack haystack-ai`
(found there, or importable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from tunekit.rag import corpora  # noqa: E402
from tunekit.rag.chunking import Chunk, chunk_document  # noqa: E402
from tunekit.rag.embed import EmbeddingModel  # noqa: E402
from tunekit.rag.retrieve import BM25Index, Retriever, bm25_index  # noqa: E402
from tunekit.rag.stores import StoredChunk, open_store  # noqa: E402

GROUP = 200  # chunks per "file" when filling a store (one transaction each)
K = 10


def pct(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(seconds) * 1000, q)), 3)


def timed(fn, items) -> tuple[dict, list]:
    times, results = [], []
    for x in items:
        t0 = time.perf_counter()
        results.append(fn(x))
        times.append(time.perf_counter() - t0)
    return {"p50_ms": pct(times, 50), "p95_ms": pct(times, 95), "qps": round(len(times) / sum(times), 1),
            "n": len(times)}, results


def recall(results: list[list], truth: list[list]) -> float:
    return round(float(np.mean([len(set(r[:K]) & set(t[:K])) / max(1, len(t[:K])) for r, t in zip(results, truth)])),
                 4)


# ---- data ---------------------------------------------------------------------------------------------------------
def corpus(embedder, from_store: str | None):
    """(chunks, vectors): from the eval store when it has the wiki collections, else chunked and embedded here."""
    import sqlite3

    if from_store and (Path(from_store) / "wiki-fr" / "chunks.sqlite").exists():
        chunks, vectors = [], []
        for name in ("wiki-en", "wiki-fr"):
            conn = sqlite3.connect(Path(from_store) / name / "chunks.sqlite")
            for source, heading, page, no, start, end, text, blob in conn.execute(
                    "select source, heading, page, chunk_no, start_char, end_char, text, vector from chunks order by id"):
                chunks.append(Chunk(source, heading or "", page, no, start, end, text))
                vectors.append(np.frombuffer(blob, dtype=np.float32))
        return chunks, np.stack(vectors), f"vectors reused from {from_store}"
    chunks = [c for lang in ("en", "fr") for d in corpora.wiki_summaries(lang)[0]
              for c in chunk_document(d, embedder.tokenizer)]
    return chunks, embedder.encode([c.indexed_text() for c in chunks]), "embedded in this run"


def queries(n: int) -> list[str]:
    _, questions = corpora.wiki_summaries("en")
    return [questions[i]["question"] for i in np.random.default_rng(0).choice(len(questions), n, replace=False)]


def scaled(chunks, vectors, size, rng):
    """`size` chunks: copies of the corpus, later copies with jittered vectors and renamed sources."""
    out_c, out_v, copy = [], [], 0
    while len(out_c) < size:
        take = min(len(chunks), size - len(out_c))
        v = vectors[:take]
        if copy:
            v = v + rng.normal(0, 0.02, v.shape).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
        at = len(out_c)  # `start` holds the chunk's position: the key that compares rankings across stores
        out_c += [Chunk(f"{c.source}#copy{copy}" if copy else c.source, c.heading, c.page, c.index, at + j,
                        at + j + len(c.text), c.text) for j, c in enumerate(chunks[:take])]
        out_v.append(v.astype(np.float32))
        copy += 1
    return out_c, np.concatenate(out_v)


# ---- measurements -------------------------------------------------------------------------------------------------
def measure_ingest(embedder, n_docs: int) -> dict:
    """tunekit's ingest, end to end, on n_docs Wikipedia articles written as Markdown files."""
    from tunekit.rag.ingest import ingest

    docs, _ = corpora.wiki_summaries("en")
    with tempfile.TemporaryDirectory(prefix="tunekit-rag-ingest-") as tmp:
        folder = Path(tmp) / "docs"
        folder.mkdir()
        for i, d in enumerate(docs[:n_docs]):
            (folder / f"{i:05d}.md").write_text(f"# {d.title}\n\n{d.sections[0].text}\n", encoding="utf-8")
        report = ingest([folder], "ingest", f"{tmp}/store", embedder, progress=False)
        again = time.perf_counter()
        ingest([folder], "ingest", f"{tmp}/store", embedder, progress=False)  # unchanged: hashes only
        return {"files": n_docs, "chunks": report.chunks, "s": round(report.seconds, 1),
                "chunks_per_s": round(report.chunks_per_s, 1),
                "reingest_unchanged_s": round(time.perf_counter() - again, 2)}


def fill(store, name, chunks, vectors) -> float:
    store.create(name, "all-MiniLM-L6-v2", vectors.shape[1], "english")
    t0 = time.perf_counter()
    for at in range(0, len(chunks), GROUP):
        store.replace_file(name, f"group-{at}", str(at), chunks[at:at + GROUP], vectors[at:at + GROUP])
    store.flush(name)
    return time.perf_counter() - t0


def store_bytes(store, name) -> int:
    if hasattr(store, "root"):
        return sum(p.stat().st_size for p in (store.root / name).iterdir())
    table = store._table(name)
    return int(store.conn.execute("select pg_total_relation_size(%s)", (table,)).fetchone()[0])


def key(hit) -> int:
    return hit.chunk.start  # the position in the scaled corpus (the stores' "files" group 200 chunks each)


def measure_store(label, store, name, cs, vs, texts, vecs, embedder, truth) -> dict:
    fill_s = fill(store, name, cs, vs)
    row = {"fill_s": round(fill_s, 1), "fill_chunks_per_s": round(len(cs) / fill_s, 1),
           "bytes": store_bytes(store, name)}
    retriever = Retriever(store, name, embedder)
    t0 = time.perf_counter()
    bm25_index(store, name)
    row["bm25_build_s"] = round(time.perf_counter() - t0, 2)
    retriever.search(texts[0], "dense", K, vector=vecs[0])  # load the index outside the timing
    for method in ("bm25", "dense", "hybrid"):
        timing, hits = timed(lambda i: retriever.search(texts[i], method, K, vector=vecs[i]), range(len(texts)))
        keys = [[key(h) for h in r] for r in hits]
        truth.setdefault(method, keys)  # the first store measured (FAISS flat) is the reference
        row[method] = {**timing, "recall@10": recall(keys, truth[method])}
    print(len(cs), label, row, flush=True)
    return row


def hnsw_sweep(store, name, texts, vecs, embedder, truth) -> dict:
    out = {}
    for ef in (16, 64, 128):
        store.ef_search = ef
        store._index.pop(name, None)  # reloaded with the new efSearch
        retriever = Retriever(store, name, embedder)
        retriever.search(texts[0], "dense", K, vector=vecs[0])
        timing, hits = timed(lambda i: retriever.search(texts[i], "dense", K, vector=vecs[i]), range(len(texts)))
        out[f"ef{ef}"] = {**timing, "recall@10": recall([[key(h) for h in r] for r in hits], truth["dense"])}
        print("hnsw", ef, out[f"ef{ef}"], flush=True)
    return out


def one_thread(store, name, texts, vecs, embedder) -> dict:
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        retriever = Retriever(store, name, embedder)
        timing, _ = timed(lambda i: retriever.search(texts[i], "dense", K, vector=vecs[i]), range(len(texts)))
    finally:
        faiss.omp_set_num_threads(threads)
    print("faiss 1 thread", timing, flush=True)
    return timing


def haystack_peer(cs, vs, texts, vecs, truth, n_queries: int) -> dict:
    """Haystack 2's in-memory store and retrievers over the same chunks, vectors and queries."""
    for path in (ROOT / "runs" / "peer-haystack",):
        if path.is_dir() and str(path) not in sys.path:
            sys.path.append(str(path))
    os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"
    try:
        import haystack
        from haystack import Document
        from haystack.components.joiners import DocumentJoiner
        from haystack.components.retrievers.in_memory import InMemoryBM25Retriever, InMemoryEmbeddingRetriever
        from haystack.document_stores.in_memory import InMemoryDocumentStore
    except ImportError as e:
        return {"skipped": f"haystack-ai not importable ({e})"}
    store = InMemoryDocumentStore(bm25_algorithm="BM25Okapi", embedding_similarity_function="dot_product",
                                  return_embedding=False)
    docs = [Document(id=str(i), content=c.indexed_text(), embedding=v.tolist(),
                     meta={"position": c.start}) for i, (c, v) in enumerate(zip(cs, vs))]
    t0 = time.perf_counter()
    store.write_documents(docs)
    row = {"version": haystack.__version__, "fill_s": round(time.perf_counter() - t0, 1)}
    row["fill_chunks_per_s"] = round(len(cs) / (time.perf_counter() - t0), 1)
    del docs
    bm25, dense = InMemoryBM25Retriever(store, top_k=K), InMemoryEmbeddingRetriever(store, top_k=K)
    bm25_50, dense_50 = InMemoryBM25Retriever(store, top_k=50), InMemoryEmbeddingRetriever(store, top_k=50)
    joiner = DocumentJoiner(join_mode="reciprocal_rank_fusion", top_k=K)

    def keys(documents):
        return [d.meta["position"] for d in documents]

    runs = {"bm25": lambda i: bm25.run(query=texts[i])["documents"],
            "dense": lambda i: dense.run(query_embedding=vecs[i].tolist())["documents"],
            "hybrid": lambda i: joiner.run(documents=[bm25_50.run(query=texts[i])["documents"],
                                                      dense_50.run(query_embedding=vecs[i].tolist())["documents"]]
                                           )["documents"]}
    for method, fn in runs.items():
        fn(0)
        timing, results = timed(fn, range(n_queries))
        row[method] = {**timing, "recall@10 vs tunekit flat": recall([keys(r) for r in results],
                                                                     truth[method][:n_queries])}
        print(len(cs), "haystack", method, row[method], flush=True)
    return row


def bm25_libraries(cs, texts) -> dict:
    """bm25s against rank_bm25 (BM25Okapi) on the same stemmed, stopworded tokens."""
    try:
        from rank_bm25 import BM25Okapi
    except ImportError:
        return {"skipped": "rank_bm25 not installed"}
    import bm25s
    import Stemmer

    stem = Stemmer.Stemmer("english")
    stored = [StoredChunk(i, c.source, c.heading, None, c.index, 0, 0, c.text) for i, c in enumerate(cs)]
    t0 = time.perf_counter()
    ours = BM25Index(stored, "english")
    row = {"bm25s_index_s": round(time.perf_counter() - t0, 2)}
    tokens = bm25s.tokenize([c.indexed_text() for c in stored], stopwords="english", stemmer=stem, return_ids=False,
                            show_progress=False)
    t0 = time.perf_counter()
    okapi = BM25Okapi(tokens)
    row["rank_bm25_index_s"] = round(time.perf_counter() - t0, 2)
    qt = bm25s.tokenize(texts, stopwords="english", stemmer=stem, return_ids=False, show_progress=False)
    row["bm25s"], _ = timed(lambda i: ours.search(texts[i], K), range(len(texts)))
    row["rank_bm25"], _ = timed(lambda i: np.argsort(-okapi.get_scores(qt[i]))[:K], range(min(50, len(texts))))
    row["bm25s_speedup"] = round(row["bm25s"]["qps"] / row["rank_bm25"]["qps"], 1)
    print(len(cs), "bm25 libraries", row, flush=True)
    return row


def run_size(size, chunks, vectors, texts, vecs, embedder, pg_url, args) -> dict:
    cs, vs = scaled(chunks, vectors, size, np.random.default_rng(size))
    row, truth = {"stores": {}}, {}
    with tempfile.TemporaryDirectory(prefix="tunekit-rag-speed-") as root:
        urls = {"faiss-flat": f"faiss://{root}/flat", "faiss-hnsw": f"faiss://{root}/hnsw?index=hnsw&ef_search=64"}
        if pg_url:
            urls["pgvector-hnsw"] = pg_url
        for label, url in urls.items():
            store, name = open_store(url), f"s{size}"
            row["stores"][label] = measure_store(label, store, name, cs, vs, texts, vecs, embedder, truth)
            if label == "faiss-hnsw":
                row["faiss-hnsw-ef"] = hnsw_sweep(store, name, texts, vecs, embedder, truth)
            if label.startswith("faiss"):  # one query at a time: does FAISS's OpenMP pool help or cost?
                row["stores"][label]["dense_1_thread"] = one_thread(store, name, texts, vecs, embedder)
            store.drop(name)
            store.close()
    if not args.no_peer:
        row["haystack"] = haystack_peer(cs, vs, texts, vecs, truth, min(args.peer_queries, len(texts)))
    if size <= 20000:
        row["bm25_libraries"] = bm25_libraries(cs, texts)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[10000])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--peer-queries", type=int, default=50, help="queries for Haystack (its BM25 is pure Python)")
    p.add_argument("--ingest-docs", type=int, default=600, help="articles for the end-to-end ingest (0: skip)")
    p.add_argument("--no-postgres", action="store_true")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--from-store", default="runs/rag-eval/store")
    p.add_argument("--merge", nargs="+", default=None, help="merge these JSON outputs into --out (+ --png, table)")
    p.add_argument("--png", default=None)
    p.add_argument("--out", default="docs/rag-speed.json")
    args = p.parse_args(argv)
    if args.merge:
        from speed_report import merge

        return merge(args.merge, args.out, args.png)
    embedder = EmbeddingModel()
    out = {"meta": meta(args)}
    if args.ingest_docs:
        out["ingest"] = measure_ingest(embedder, args.ingest_docs)
        print("ingest", out["ingest"], flush=True)
    chunks, vectors, origin = corpus(embedder, args.from_store)
    texts = queries(args.queries)
    vecs = embedder.encode(texts)
    t0 = time.perf_counter()
    for t in texts[:50]:
        embedder.encode([t])
    out["query_embedding_ms"] = round((time.perf_counter() - t0) * 1000 / 50, 2)
    out["corpus"] = {"chunks": len(chunks), "origin": origin, "queries": len(texts)}
    pg_ctx = pg_url = None
    if not args.no_postgres:
        from postgres_server import throwaway_postgres

        pg_ctx = throwaway_postgres()
        pg_url = pg_ctx.__enter__()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out["sizes"] = {}
    try:
        for size in args.sizes:  # saved after each size: a job cut short keeps what it measured
            out["sizes"][str(size)] = run_size(size, chunks, vectors, texts, vecs, embedder, pg_url, args)
            Path(args.out).write_text(json.dumps(out, indent=2))
    finally:
        if pg_ctx is not None:
            pg_ctx.__exit__(None, None, None)
    return 0


def meta(args) -> dict:
    import subprocess

    import faiss
    import torch

    cpu = next((x.split(":", 1)[1].strip() for x in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if x.startswith("Model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:]}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
