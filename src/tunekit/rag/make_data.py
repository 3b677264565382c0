"""`tunekit rag make-data`: question/answer pairs + a collection -> chat training records whose user turn is the
RAG prompt (answer.rag_prompt) with the retrieved chunks, so a LoRA learns to answer from context and cite [n].

Input JSONL: {"question", "answer", "source"} per line; "source" names the document that holds the answer (a doc id
as in `rag eval`). For each question the top_k retrieved chunks are the context. The gold chunk is a chunk of the
answer's document that holds the answer's text (case and spacing aside): the best-ranked such chunk among those
retrieved, else the document's chunk that BM25 finds for the answer itself; only when no chunk of the document holds
the text verbatim (a paraphrased answer) is it the document's best-ranked chunk. So a record never asks the model to
answer from a chunk that lacks the answer (a product sheet's "History" section for a price question). It goes in at
a random position; the others, all from other documents, are distractors. The target is the answer followed by [n] of the
gold chunk. With --unanswerable F, a share F of the records drops the gold chunk and the target says the sources do
not contain the answer. Output: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} per line,
which `tunekit train --data` reads unchanged.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .answer import rag_prompt
from .errors import RagError
from .evaluate import doc_keys
from .retrieve import Retriever

UNKNOWN = "The sources do not contain the answer."


def make_records(retriever: Retriever, pairs: list[dict], top_k: int = 4, method: str = "hybrid",
                 unanswerable: float = 0.0, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for n, pair in enumerate(pairs, start=1):
        question, answer, source = pair.get("question"), pair.get("answer"), pair.get("source")
        if not (isinstance(question, str) and isinstance(answer, str) and isinstance(source, str)):
            raise RagError(f"pair {n}: needs string fields question, answer and source", "pairs")
        hits = retriever.search(question, method, max(top_k * 4, 20))
        gold = [h for h in hits if source in doc_keys(h.chunk.source)]
        others = [h for h in hits if source not in doc_keys(h.chunk.source)]
        gold = _holding(gold, answer) or _holding(_document_hits(retriever, answer, source), answer) or gold
        if not gold:
            gold = retriever.search(question, "bm25", 1, sources=_sources_of(retriever, source))
            if not gold:
                raise RagError(f"pair {n}: no chunk of document {source!r} in collection {retriever.collection}",
                               "pairs")
        if rng.random() < unanswerable:
            context, target = others[:top_k], UNKNOWN
        else:
            context = others[:top_k - 1]
            at = rng.randrange(len(context) + 1)
            context.insert(at, gold[0])
            target = f"{answer.strip()} [{at + 1}]"
        records.append({"messages": [{"role": "user", "content": rag_prompt(question, context)},
                                     {"role": "assistant", "content": target}]})
    return records


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _holding(hits: list, answer: str) -> list:
    """The hits whose chunk text holds the answer verbatim (case and spacing aside), in their order."""
    wanted = _norm(answer)
    return [h for h in hits if wanted and wanted in _norm(h.chunk.text)]


def _document_hits(retriever: Retriever, answer: str, doc_id: str) -> list:
    sources = _sources_of(retriever, doc_id)
    return retriever.search(answer, "bm25", 20, sources=sources) if sources else []


def _sources_of(retriever: Retriever, doc_id: str) -> list[str]:
    files = retriever.store.files(retriever.collection)
    return [s for s in files if doc_id in doc_keys(s)]


def make_data(pairs_path: str | Path, retriever: Retriever, out: str | Path, **options) -> int:
    pairs = [json.loads(line) for line in Path(pairs_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = make_records(retriever, pairs, **options)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return len(records)
