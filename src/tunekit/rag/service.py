"""What `tunekit serve` needs from RAG: one store, a retriever per collection (its embedding model checked once),
and the turn that puts the numbered chunks into a chat. The HTTP routes (serve/api.py) call these on the engine's
thread (embedding is torch work) and turn a RagError into an OpenAI-shaped error naming the parameter."""

from __future__ import annotations

import threading

from .answer import check_answer, rag_prompt
from .embed import EmbeddingModel
from .errors import RagError
from .retrieve import Hit, Retriever
from .stores import Store, open_store


class RagService:
    def __init__(self, store: str | Store | None = None, embedding_model: str | None = None, max_top_k: int = 50):
        self._store_arg, self._embedding_path, self.max_top_k = store, embedding_model, max_top_k
        self._store: Store | None = store if isinstance(store, Store) else None
        self._embedder: EmbeddingModel | None = None
        self._retrievers: dict[str, Retriever] = {}
        self._lock = threading.Lock()  # opening the store
        self._use = threading.RLock()  # one search or retriever lookup at a time: a SQLite store is not thread-safe

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = open_store(self._store_arg)
            return self._store

    def retriever(self, collection: str) -> Retriever:
        with self._use:
            return self._retriever(collection)

    def _retriever(self, collection: str) -> Retriever:
        cached = self._retrievers.get(collection)
        if cached is not None and collection in self.store.collections():
            return cached
        self._retrievers.pop(collection, None)
        if self._embedder is None:
            self._embedder = EmbeddingModel(self._embedding_path)
        retriever = Retriever(self.store, collection, self._embedder)
        self._retrievers[collection] = retriever
        return retriever

    def embed(self, collection: str, query: str, method: str = "hybrid"):
        """The query's vector for this collection's model (None for bm25): torch work, for the engine thread."""
        retriever = self.retriever(collection)  # checks the collection and its embedding model first
        return None if method == "bm25" else retriever.embedder.encode_query([query])[0]

    def search(self, collection: str, query: str, top_k: int = 5, method: str = "hybrid",
               sources: list[str] | None = None, vector=None) -> list[Hit]:
        """BM25 and the store's index search (no torch: any thread); `vector` from `embed`, else computed here."""
        if top_k > self.max_top_k:
            raise RagError(f"top_k {top_k} exceeds this server's limit of {self.max_top_k}", "top_k")
        if not query.strip():
            raise RagError("the query (the last user message) is empty", "query")
        with self._use:
            return self._retriever(collection).search(query, method, top_k, sources, vector=vector)


    def erase_owner(self, owner: str) -> dict[str, dict[str, int]]:
        """Delete every source recorded with this owner from every collection: {collection: {files, chunks}}
        (collections without any are left out)."""
        with self._use:
            return erase_owner(self.store, owner)


def erase_owner(store: Store, owner: str) -> dict[str, dict[str, int]]:
    out = {}
    for name in store.collections():
        sources = store.sources_of(name, owner)
        if sources:
            out[name] = {"files": len(sources), "chunks": sum(store.delete_file(name, s) for s in sources)}
            store.flush(name)
    return out


def last_user_text(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    raise RagError("rag needs a user message to retrieve for", "messages")


def with_context(messages: list[dict], hits: list[Hit]) -> list[dict]:
    """A new conversation whose last user turn is the RAG prompt (numbered chunks + the question)."""
    at = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [*messages[:at], {"role": "user", "content": rag_prompt(messages[at]["content"], hits)},
            *messages[at + 1:]]


def response_fields(texts: list[str] | None, hits: list[Hit]) -> dict:
    """What a chat completion with "rag" adds: `citations` (the chunks given, numbered, with `cited` when the
    answer's [n] markers name them) and `invalid_citations` ([n] markers that name no chunk)."""
    if texts is None:  # a stream's first chunk: which ones are cited is not known yet
        return {"citations": [{"n": n, **h.citation()} for n, h in enumerate(hits, start=1)]}
    answer = check_answer(texts[0], hits)
    return {"citations": answer.citations(), "invalid_citations": answer.invalid}
