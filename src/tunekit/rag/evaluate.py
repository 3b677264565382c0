"""`tunekit rag eval`: retrieval quality of bm25, dense and hybrid on questions with known relevant documents.

Questions file (JSONL): {"question": "...", "relevant": ["doc id", ...]} per line ("query" is accepted too). A doc
id matches a chunk's source exactly, or the source's file name, or that name without its suffix. Rankings are of
documents: a document's rank is that of its best chunk. Metrics, averaged over questions:
hit@k (a relevant document in the top k), MRR@10 (1/rank of the first relevant one, 0 past 10) and nDCG@10
(binary gains, log2 discount; Jarvelin & Kekalainen 2002).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .errors import RagError
from .retrieve import RETRIEVERS, Retriever

DEPTH = 10
METRICS = ("hit@1", "hit@5", "hit@10", "mrr@10", "ndcg@10")


def read_questions(path: str | Path) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RagError(f"{path}:{n}: not JSON ({e.msg})", "questions") from None
        question = row.get("question", row.get("query"))
        relevant = row.get("relevant")
        if not isinstance(question, str) or not question.strip():
            raise RagError(f"{path}:{n}: needs a non-empty \"question\"", "questions")
        if isinstance(relevant, str):
            relevant = [relevant]
        if not relevant or not all(isinstance(r, str) for r in relevant):
            raise RagError(f"{path}:{n}: needs \"relevant\": a list of document ids", "questions")
        rows.append({"question": question, "relevant": relevant})
    if not rows:
        raise RagError(f"{path}: no questions in it", "questions")
    return rows


def doc_keys(source: str) -> tuple[str, ...]:
    name = source.rsplit("/", 1)[-1]
    return source, name, name.rsplit(".", 1)[0]


def metrics_for(ranked_docs: list[str], relevant: set[str]) -> dict[str, float]:
    """The metrics of one ranked list of document ids (best first, no repeats)."""
    ranks = [i for i, d in enumerate(ranked_docs[:DEPTH], start=1) if d in relevant]
    first = ranks[0] if ranks else None
    dcg = sum(1 / math.log2(r + 1) for r in ranks)
    ideal = sum(1 / math.log2(r + 1) for r in range(1, min(len(relevant), DEPTH) + 1))
    return {"hit@1": float(first == 1), "hit@5": float(first is not None and first <= 5),
            "hit@10": float(first is not None), "mrr@10": 1 / first if first else 0.0, "ndcg@10": dcg / ideal}


def ranked_documents(ranked_chunks: list[tuple[int, float]], source_of: dict[int, str], relevant: set[str]
                     ) -> list[str]:
    """Chunk ranking -> document ranking (first occurrence wins), each document named by the key in `relevant`
    it matches, else by its source."""
    docs, seen = [], set()
    for cid, _ in ranked_chunks:
        source = source_of[cid]
        key = next((k for k in doc_keys(source) if k in relevant), source)
        if key not in seen:
            seen.add(key)
            docs.append(key)
    return docs


def evaluate(retriever: Retriever, questions: list[dict], methods=RETRIEVERS, chunk_depth: int = 50,
             progress: bool = True, **search) -> dict:
    """{method: {metric: mean}, "n": questions, "latency_ms": {method: mean per query}}."""
    from tqdm import tqdm

    source_of = {c.id: c.source for c in retriever.store.all_chunks(retriever.collection)}
    vectors = None
    if any(m != "bm25" for m in methods):
        t = time.perf_counter()
        vectors = retriever.embedder.encode_query([q["question"] for q in questions])
        embed_ms = (time.perf_counter() - t) * 1000 / len(questions)
    results = {"n": len(questions), "collection": retriever.collection, "latency_ms": {}}
    for method in methods:
        sums = dict.fromkeys(METRICS, 0.0)
        t = time.perf_counter()
        for i, q in enumerate(tqdm(questions, desc=method, disable=not progress, file=sys.stderr)):
            ranked = retriever.ranked(q["question"], method, chunk_depth, vector=None if vectors is None
                                      else vectors[i], **search)
            docs = ranked_documents(ranked, source_of, set(q["relevant"]))
            for k, v in metrics_for(docs, set(q["relevant"])).items():
                sums[k] += v
        per_query = (time.perf_counter() - t) * 1000 / len(questions)
        results["latency_ms"][method] = round(per_query + (embed_ms if method != "bm25" else 0.0), 3)
        results[method] = {k: round(v / len(questions), 4) for k, v in sums.items()}
    return results


def table(results: dict, methods=RETRIEVERS) -> str:
    width = max(9, *(len(m) for m in methods))
    head = f"{'retriever':<{width}}  " + "  ".join(f"{m:>7}" for m in METRICS) + "  ms/query"
    lines = [head, "-" * len(head)]
    for method in methods:
        if method in results:
            lines.append(f"{method:<{width}}  " + "  ".join(f"{results[method][m]:>7.3f}" for m in METRICS)
                         + f"  {results['latency_ms'][method]:>8.2f}")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: str | Path, title: str = "Retrieval quality") -> Path:
    """Grouped bars of MRR@10 and nDCG@10 per retriever for each labelled result (e.g. per corpus/language)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(labels) + 4), 4.2), sharey=True)
    width = 0.8 / len(RETRIEVERS)
    for ax, metric in zip(axes, ("mrr@10", "ndcg@10")):
        for j, method in enumerate(RETRIEVERS):
            values = [rows[label].get(method, {}).get(metric, np.nan) for label in labels]
            xs = np.arange(len(labels)) + (j - 1) * width
            bars = ax.bar(xs, values, width, label=method)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(np.arange(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.set_ylim(0, 1)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
