"""BM25, dense and hybrid retrieval over one collection, with source filters.

- BM25: bm25s (Lucene's BM25 variant, k1=1.5, b=0.75) over the chunks' heading path + text, lower-cased, with the
  collection language's Snowball stemmer (PyStemmer) and stopword list. The index is built from the store's
  chunks on first use and kept per (store, collection, version), so a re-ingest invalidates it.
- dense: cosine similarity of the query's embedding with the chunks' (the store's FAISS or pgvector index).
- hybrid: weighted reciprocal-rank fusion (Cormack, Clarke & Buettcher, SIGIR 2009), score(d) = sum over the two
  rankings of w / (k + rank(d)), each ranking `depth` deep, w = 1 for BM25 and `dense_weight` for dense.
  Defaults (`default_fusion`; measurements in docs/rag.md): when the embedding model reads the collection's
  language, the paper's plain RRF, k = 60 and w = 1; when it does not (the packaged all-MiniLM-L6-v2 is
  English-only, so French, German, Dutch, Italian ... collections), k = 20 and w = 0.25: there the dense ranking is
  the much weaker one, and at equal weights it pulled hybrid below BM25 on Debian's FAQ.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import numpy as np

from .embed import EmbeddingModel
from .errors import RagError
from .stores import Store, StoredChunk

RETRIEVERS = ("bm25", "dense", "hybrid")
RRF_K = 60
FUSION_DEPTH = 50
FUSION = {True: (60, 1.0), False: (20, 0.25)}  # (k, dense weight): does the embedding model read the language?
ENGLISH_ONLY_MODELS = {"all-MiniLM-L6-v2"}
LANGUAGES = ("english", "french", "german", "dutch", "italian", "spanish", "portuguese", "swedish", "norwegian",
             "danish", "russian", "turkish")


@dataclass
class Hit:
    chunk: StoredChunk
    score: float
    rank: int  # 1-based

    def citation(self) -> dict:
        c = self.chunk
        return {"source": c.source, "heading": c.heading, "page": c.page, "chunk": c.index, "score": self.score,
                "start": c.start, "end": c.end}

    def to_dict(self) -> dict:
        return {**self.citation(), "id": self.chunk.id, "text": self.chunk.text, "rank": self.rank}


class BM25Index:
    """bm25s over a list of chunks; `search` returns (chunk id, score) best first."""

    def __init__(self, chunks: list[StoredChunk], language: str):
        import bm25s
        import Stemmer

        if language not in LANGUAGES:
            raise RagError(f"language {language!r}: BM25 knows {', '.join(LANGUAGES)}", "language")
        self.language = language
        self.stemmer = Stemmer.Stemmer(language)
        self.ids = np.asarray([c.id for c in chunks], dtype=np.int64)
        self.sources = np.asarray([c.source for c in chunks], dtype=object)
        self.retriever = bm25s.BM25()
        if chunks:
            tokens = bm25s.tokenize([c.indexed_text() for c in chunks], stopwords=language, stemmer=self.stemmer,
                                    show_progress=False, return_ids=False)  # lists of str: vocab_dict maps str
            self.retriever.index(tokens, show_progress=False)

    def search(self, query: str, k: int, sources: list[str] | None = None) -> list[tuple[int, float]]:
        import bm25s

        if len(self.ids) == 0:
            return []
        tokens = bm25s.tokenize([query], stopwords=self.language, stemmer=self.stemmer, show_progress=False,
                                return_ids=False)[0]
        vocab = self.retriever.vocab_dict
        token_ids = [vocab[t] for t in tokens if t in vocab]
        if not token_ids:
            return []
        scores = self.retriever.get_scores_from_ids(token_ids)  # (N,) over every chunk
        if sources is not None:
            scores = np.where(np.isin(self.sources, list(sources)), scores, 0.0)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self.ids[i]), float(scores[i])) for i in top if scores[i] > 0]


_BM25_CACHE: dict[tuple[str, str], tuple[int, BM25Index]] = {}
_BM25_LOCK = threading.Lock()


def bm25_index(store: Store, collection: str) -> BM25Index:
    version = store.version(collection)
    key = (store.url, collection)
    with _BM25_LOCK:
        cached = _BM25_CACHE.get(key)
        if cached is None or cached[0] != version:
            cached = (version, BM25Index(store.all_chunks(collection), store.info(collection).language))
            _BM25_CACHE[key] = cached
        return cached[1]


def rrf(rankings: list[list[int]], k: int = RRF_K, weights: list[float] | None = None) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of ranked id lists, each ranking weighted (default 1): (id, fused score) best first;
    ties keep first-seen order."""
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights or [1.0] * len(rankings)):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


class Retriever:
    """Search one collection of a store; the embedding model must be the one the collection was built with."""

    def __init__(self, store: Store, collection: str, embedder: EmbeddingModel | None = None):
        self.store, self.collection = store, collection
        self.info = store.info(collection)
        self._embedder = embedder
        if embedder is not None:
            check_model(self.info, embedder)

    @property
    def embedder(self) -> EmbeddingModel:
        if self._embedder is None:
            self._embedder = EmbeddingModel()
            check_model(self.info, self._embedder)
        return self._embedder

    def ranked(self, query: str, method: str = "hybrid", k: int = 10, sources: list[str] | None = None,
               rrf_k: int | None = None, depth: int = FUSION_DEPTH, vector: np.ndarray | None = None,
               dense_weight: float | None = None) -> list[tuple[int, float]]:
        """(chunk id, score) best first. `vector`: the query's embedding when the caller has it already;
        `rrf_k`, `dense_weight`: the fusion's k and the dense ranking's weight (BM25's is 1); None: `default_fusion`."""
        if method not in RETRIEVERS:
            raise RagError(f"retriever {method!r}: use one of {', '.join(RETRIEVERS)}", "retriever")
        if k < 1:
            raise RagError(f"top_k {k}: must be at least 1", "top_k")
        if method == "bm25":
            return bm25_index(self.store, self.collection).search(query, k, sources)
        if vector is None:
            vector = self.embedder.encode_query([query])[0]
        if method == "dense":
            return self.store.dense_search(self.collection, vector, k, sources)
        depth = max(depth, k)
        lexical = bm25_index(self.store, self.collection).search(query, depth, sources)
        dense = self.store.dense_search(self.collection, vector, depth, sources)
        auto_k, auto_weight = self.default_fusion()
        weight = auto_weight if dense_weight is None else dense_weight
        return rrf([[i for i, _ in lexical], [i for i, _ in dense]], auto_k if rrf_k is None else rrf_k,
                   [1.0, weight])[:k]

    def default_fusion(self) -> tuple[int, float]:
        """(k, dense weight): (60, 1) when the embedding model reads the collection's language, else (20, 0.25)."""
        reads = self.info.language == "english" or self.info.model not in ENGLISH_ONLY_MODELS
        return FUSION[reads]

    def search(self, query: str, method: str = "hybrid", k: int = 5, sources: list[str] | None = None,
               rrf_k: int | None = None, depth: int = FUSION_DEPTH, dense_weight: float | None = None,
               vector: np.ndarray | None = None) -> list[Hit]:
        ranked = self.ranked(query, method, k, sources, rrf_k, depth, vector, dense_weight)
        chunks = self.store.get_chunks(self.collection, [i for i, _ in ranked])
        return [Hit(c, s, r) for r, (c, (_, s)) in enumerate(zip(chunks, ranked), start=1)]


def check_model(info, embedder: EmbeddingModel) -> None:
    if info.model != embedder.name or info.dim != embedder.dim:
        raise RagError(f"collection {info.name!r} was embedded with {info.model} ({info.dim} dimensions); the "
                       f"embedding model given is {embedder.name} ({embedder.dim} dimensions). Query with "
                       f"--embedding-model set to the collection's model, or re-ingest into a new collection",
                       "embedding_model", 409)


__all__ = ["Hit", "Retriever", "BM25Index", "rrf", "RETRIEVERS", "RRF_K", "FUSION_DEPTH", "asdict"]
