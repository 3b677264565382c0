"""`tunekit rag ingest`: files -> documents -> chunks -> vectors -> a store collection, incrementally.

A file's identity is its resolved path; its content hash (SHA-256 of the bytes) decides whether it changed.
Unchanged files are skipped, changed ones replaced (atomically, per file), and files that were in the collection
under a folder being ingested but no longer exist are deleted. Files that cannot be read are skipped with a
warning naming them, and counted. Chunks of several small files are embedded together (in batches of about
`batch_chunks`), but each file is still written in its own transaction.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP, Chunk, chunk_document
from .embed import EmbeddingModel
from .errors import RagError
from .loaders import Document, LoadError, find_files, load_file
from .retrieve import LANGUAGES, check_model
from .stores import Store, open_store


@dataclass
class IngestReport:
    collection: str
    store: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    chunks: int = 0  # chunks written by this run
    total_chunks: int = 0  # chunks in the collection afterwards
    seconds: float = 0.0

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"collection {self.collection} ({self.store}): {self.added} added, {self.updated} updated, "
                f"{self.unchanged} unchanged, {self.removed} removed, {len(self.skipped)} skipped; "
                f"{self.chunks} chunks written in {self.seconds:.1f} s ({self.chunks_per_s:.1f} chunks/s); "
                f"{self.total_chunks} chunks in the collection")


def digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def ingest(inputs: list[str | Path], collection: str, store: str | Store | None = None,
           embedder: EmbeddingModel | None = None, language: str = "english", chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
           overlap: int = DEFAULT_OVERLAP, progress: bool = True, prune: bool = True,
           owner: str | None = None) -> IngestReport:
    """Ingest files and folders (recursively) into `collection`; see the module docstring. owner: recorded with
    every file (an opaque string, e.g. the uploader's pseudonym) so an erasure request finds them
    (`Store.sources_of`)."""
    paths = find_files(inputs)
    folders = [Path(p).resolve() for p in inputs if Path(p).is_dir()]

    def items():
        for path in paths:
            source = str(path.resolve())
            yield source, lambda path=path, source=source: _read(path, source)

    given = {str(q.resolve()) for q in paths}

    def under_inputs(source: str) -> bool:
        return source in given or any(Path(source).is_relative_to(f) for f in folders)

    return _ingest_items(items(), len(paths), collection, store, embedder, language, chunk_tokens, overlap, progress,
                         under_inputs if prune else None, owner)


def ingest_documents(documents: list[Document], collection: str, store: str | Store | None = None,
                     embedder: EmbeddingModel | None = None, language: str = "english",
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS, overlap: int = DEFAULT_OVERLAP,
                     progress: bool = False, prune: bool = False, owner: str | None = None) -> IngestReport:
    """The same for documents built in Python (their `source` is the id; the hash is that of their text).
    prune=True deletes every source of the collection that is not among `documents`."""
    def items():
        for doc in documents:
            yield doc.source, lambda doc=doc: (digest(doc.full_text()), doc)

    return _ingest_items(items(), len(documents), collection, store, embedder, language, chunk_tokens, overlap,
                         progress, (lambda source: True) if prune else None, owner)


def _read(path: Path, source: str):
    """(content hash, a function that loads the document): the hash alone decides whether to load it."""
    return digest(path.read_bytes()), lambda: load_file(path, source)


def _ingest_items(items, n_items: int, collection: str, store, embedder, language: str, chunk_tokens: int,
                  overlap: int, progress: bool, prune_scope, owner: str | None = None) -> IngestReport:
    from tqdm import tqdm

    if language not in LANGUAGES:
        raise RagError(f"--language {language!r}: BM25 knows {', '.join(LANGUAGES)}", "language")
    own_store = not isinstance(store, Store)
    store = open_store(store) if own_store else store
    embedder = embedder or EmbeddingModel()
    if chunk_tokens > embedder.max_tokens:
        raise RagError(f"--chunk-tokens {chunk_tokens}: {embedder.name} reads at most {embedder.max_tokens} tokens "
                       f"(more would be cut off when embedding)", "chunk_tokens")
    info = store.create(collection, embedder.name, embedder.dim, language)
    check_model(info, embedder)
    if info.language != language:
        print(f"[tunekit] note: collection {collection} was created with language {info.language}; BM25 keeps it",
              file=sys.stderr)
    report = IngestReport(collection, store.url)
    known = store.files(collection)
    seen: set[str] = set()
    pending: list[tuple[str, str, list[Chunk], bool]] = []  # (source, hash, chunks, is_update)
    bar = tqdm(total=n_items, unit="file", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()

    def write_pending():
        texts = [c.indexed_text() for _, _, chunks, _ in pending for c in chunks]
        vectors = embedder.encode(texts)
        at = 0
        for source, h, chunks, update in pending:
            store.replace_file(collection, source, h, chunks, vectors[at:at + len(chunks)])
            if owner:
                store.set_owner(collection, source, owner)
            at += len(chunks)
            report.chunks += len(chunks)
            report.updated += update
            report.added += not update
        pending.clear()
        elapsed = time.perf_counter() - start
        bar.set_postfix(chunks=report.chunks, chunks_per_s=f"{report.chunks / elapsed:.1f}" if elapsed else "-")

    try:
        for source, read in items:
            seen.add(source)
            bar.update(1)
            try:
                h, loader = read()
                if known.get(source) == h:
                    report.unchanged += 1
                    if owner:
                        store.set_owner(collection, source, owner)
                    continue
                doc = loader() if callable(loader) else loader
                chunks = chunk_document(doc, embedder.tokenizer, chunk_tokens, overlap)
                if not chunks:
                    raise LoadError(f"{source}: no text in it")
            except (LoadError, OSError) as e:
                report.skipped.append((source, str(e)))
                tqdm.write(f"[tunekit] skipped {e}", file=sys.stderr)
                continue
            pending.append((source, h, chunks, source in known))
            if sum(len(c) for _, _, c, _ in pending) >= 256:
                write_pending()
        if pending:
            write_pending()
        if prune_scope is not None:
            for source in sorted(set(known) - seen):
                if prune_scope(source):
                    store.delete_file(collection, source)
                    report.removed += 1
        store.flush(collection)
    finally:
        bar.close()
        report.seconds = time.perf_counter() - start
    report.total_chunks = store.info(collection).chunks
    if own_store:
        store.close()
    return report
