"""Where chunks and their vectors live: FAISS on disk (faiss_store.py) or PostgreSQL + pgvector (pgvector_store.py)."""

from .base import CollectionInfo, Store, StoredChunk, default_store_url, open_store

__all__ = ["CollectionInfo", "Store", "StoredChunk", "default_store_url", "open_store"]
