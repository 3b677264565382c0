"""Retrieval-augmented generation: ingest documents, retrieve (BM25, dense, hybrid RRF) from FAISS or pgvector,
answer with checked [n] citations, evaluate retrieval, make training data for a LoRA that answers from context.

    loaders -> chunking -> embed -> stores -> retrieve -> answer / evaluate / make_data    (ingest ties the first four)
"""

from .errors import RagError

__all__ = ["RagError"]
