"""The interface every store implements, and `open_store(url)` that picks one by its URL.

A store holds collections. A collection records the embedding model and dimension it was built with, the BM25
language, its files (source -> content hash, and optionally the owner it was ingested for) and its chunks (text,
metadata, vector). Writes are per file and
atomic: `replace_file` removes a source's old chunks and adds the new ones in one transaction, so an interrupted
ingest leaves every file either wholly old or wholly new, and the next ingest carries on from there.

    faiss:///path/to/dir   (or a plain folder path)   FAISS index + SQLite metadata on disk (the default)
    faiss:///path?index=hnsw                           HNSW graph instead of exact (flat) search, for new collections
    postgresql://user@host/db (or postgres://)         PostgreSQL + pgvector, HNSW index
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from ..chunking import Chunk
from ..errors import RagError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass
class CollectionInfo:
    name: str
    model: str
    dim: int
    language: str
    index: str  # flat | hnsw
    version: int  # bumped by every change (caches of BM25 indexes key on it)
    files: int = 0
    chunks: int = 0


@dataclass
class StoredChunk:
    id: int
    source: str
    heading: str
    page: int | None
    index: int
    start: int
    end: int
    text: str

    def indexed_text(self) -> str:
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def check_vectors(chunks: list, vectors: np.ndarray, dim: int) -> np.ndarray:
    """float32 (len(chunks), dim), or RagError before anything is written."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (len(chunks), dim):
        raise RagError(f"{len(chunks)} chunks need vectors of shape ({len(chunks)}, {dim}); got {vectors.shape} "
                       f"(the collection's dimension is {dim})", "embedding_model", 409)
    return vectors


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise RagError(f"collection name {name!r}: use 1-63 letters, digits, '_', '-' or '.', starting with a letter "
                       f"or digit", "collection")
    return name


class Store:
    """One interface over FAISS and pgvector; see the module docstring."""

    url: str

    def create(self, name: str, model: str, dim: int, language: str, index: str | None = None) -> CollectionInfo:
        """The collection, created if new; an existing one must have the same model and dimension."""
        raise NotImplementedError

    def info(self, name: str) -> CollectionInfo:
        """Raises RagError (status 404) when the collection does not exist."""
        raise NotImplementedError

    def collections(self) -> list[str]:
        raise NotImplementedError

    def version(self, name: str) -> int:
        """A number that changes with every write to the collection (cheap: no counting)."""
        raise NotImplementedError

    def files(self, name: str) -> dict[str, str]:
        """{source: content hash} of every file in the collection."""
        raise NotImplementedError

    def replace_file(self, name: str, source: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Atomically: the source's old chunks out, these in, its hash recorded."""
        raise NotImplementedError

    def delete_file(self, name: str, source: str) -> int:
        """Remove the source's chunks, hash and owner; returns how many chunks went."""
        raise NotImplementedError

    def set_owner(self, name: str, source: str, owner: str) -> None:
        """Record who a source came from (an opaque string, e.g. a user pseudonym), so `sources_of` finds it for
        an erasure request."""
        raise NotImplementedError

    def sources_of(self, name: str, owner: str) -> list[str]:
        """The sources recorded with this owner."""
        raise NotImplementedError

    def dense_search(self, name: str, vector: np.ndarray, k: int, sources: list[str] | None = None
                     ) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity) of the k nearest chunks, best first; only `sources` when given."""
        raise NotImplementedError

    def get_chunks(self, name: str, ids: list[int]) -> list[StoredChunk]:
        """The chunks with these ids, in the order given."""
        raise NotImplementedError

    def all_chunks(self, name: str) -> list[StoredChunk]:
        """Every chunk (what BM25 indexes), in id order."""
        raise NotImplementedError

    def drop(self, name: str) -> None:
        raise NotImplementedError

    def flush(self, name: str) -> None:
        """Make the collection's derived index durable (FAISS writes its index file; pgvector has nothing to do)."""

    def close(self) -> None:
        pass


def default_store_url() -> str:
    import os

    if os.environ.get("TUNEKIT_RAG_STORE"):
        return os.environ["TUNEKIT_RAG_STORE"]
    cache = Path(os.environ.get("TUNEKIT_CACHE", Path.home() / ".cache" / "tunekit"))
    return str(cache / "rag")


def open_store(url: str | None = None) -> Store:
    """The store for a URL (see the module docstring); None: $TUNEKIT_RAG_STORE, else ~/.cache/tunekit/rag."""
    url = url or default_store_url()
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        from .pgvector_store import PostgresStore

        return PostgresStore(url)
    if scheme in ("faiss", "file"):
        options = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        from .faiss_store import FaissStore

        return FaissStore(Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path), **options)
    if scheme == "" or (len(scheme) == 1 and re.match(r"^[A-Za-z]:", url)):  # a path (or a Windows drive letter)
        from .faiss_store import FaissStore

        return FaissStore(Path(url))
    raise RagError(f"unknown store URL {url!r}: use a folder path or faiss:///path (FAISS on disk), or "
                   f"postgresql://user@host/dbname (PostgreSQL + pgvector)", "store")
