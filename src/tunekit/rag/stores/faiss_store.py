"""FAISS on disk: SQLite holds the truth (collections, files, chunks and their vectors); the FAISS index is derived.

Layout of a store folder:  <root>/<collection>/chunks.sqlite  and  <root>/<collection>/index.faiss (+ .version).
Every file's chunks go in by one SQLite transaction; the FAISS index follows in memory and is written at `flush`
(atomically, by rename) together with the collection version it reflects. An index file whose version differs
from SQLite's (an ingest that was interrupted before its flush) is rebuilt from the stored vectors when opened.
Index kinds: flat (exact inner product, the default) or hnsw (HNSW graph, M=32; efSearch from ?ef_search=, 64).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np

from ..chunking import Chunk
from ..errors import RagError
from .base import CollectionInfo, Store, StoredChunk, check_name, check_vectors

SCHEMA = """
create table if not exists collection (name text primary key, model text not null, dim integer not null,
  language text not null, index_kind text not null, version integer not null default 0);
create table if not exists files (source text primary key, hash text not null);
create table if not exists chunks (id integer primary key autoincrement, source text not null, heading text,
  page integer, chunk_no integer, start_char integer, end_char integer, text text not null, vector blob not null);
create index if not exists chunks_source on chunks(source);
create table if not exists owners (source text primary key, owner text not null);
create index if not exists owners_owner on owners(owner);
"""
COLUMNS = "id, source, heading, page, chunk_no, start_char, end_char, text"


def _row(r) -> StoredChunk:
    return StoredChunk(r[0], r[1], r[2] or "", r[3], r[4], r[5], r[6], r[7])


def _one_thread_search(index, query, k, params):
    """One query searched with one OpenMP thread (restored after; the setting is the calling thread's). Measured
    (benchmarks/rag/speed.py, docs/rag-speed.json, 2 cores with other work beside it, as in a server that is
    decoding): flat search p50 at 10k chunks 24.0 ms with FAISS's default threads vs 0.63 ms with one, at 100k
    16.5 vs 9.4 ms; HNSW the same either way. For one query the threads only add wake-ups on busy cores."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(query, k, params=params)
    finally:
        faiss.omp_set_num_threads(threads)


class FaissStore(Store):
    def __init__(self, root: Path, index: str = "flat", ef_search: str | int = 64, **unknown):
        if unknown:
            raise RagError(f"faiss store URL: unknown option(s) {', '.join(unknown)} (known: index, ef_search)",
                           "store")
        if index not in ("flat", "hnsw"):
            raise RagError(f"faiss store URL: index={index!r}; use flat or hnsw", "store")
        self.root, self.index_kind, self.ef_search = Path(root).expanduser(), index, int(ef_search)
        self.url = f"faiss://{self.root.resolve()}"
        self._db: dict[str, sqlite3.Connection] = {}
        self._index: dict[str, object] = {}
        self._dirty: set[str] = set()

    # ---- connections ----------------------------------------------------------------------------------------
    def _folder(self, name: str) -> Path:
        return self.root / check_name(name)

    def _conn(self, name: str, create: bool = False) -> sqlite3.Connection:
        if name in self._db:
            return self._db[name]
        path = self._folder(name) / "chunks.sqlite"
        if not path.exists():
            if not create:
                raise RagError(f"no collection {name!r} in {self.url}; make it with `tunekit rag ingest DIR "
                               f"--collection {name}` (collections here: {', '.join(self.collections()) or 'none'})",
                               "collection", 404)
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("pragma journal_mode=wal")
        conn.execute("pragma secure_delete=on")  # deleted chunks are overwritten, not left in free pages (erasure)
        conn.executescript(SCHEMA)
        self._db[name] = conn
        return conn

    def collections(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "chunks.sqlite").exists())

    def create(self, name, model, dim, language, index=None) -> CollectionInfo:
        conn = self._conn(name, create=True)
        row = conn.execute("select name from collection").fetchone()
        if row is None:
            conn.execute("insert into collection values (?, ?, ?, ?, ?, ?)",  # version starts at the creation
                         (name, model, dim, language, index or self.index_kind, time.time_ns() // 1000))  # time (µs)
        return self.info(name)

    def info(self, name) -> CollectionInfo:
        conn = self._conn(name)
        row = conn.execute("select name, model, dim, language, index_kind, version from collection").fetchone()
        if row is None:
            raise RagError(f"collection {name!r} in {self.url} is empty (its first ingest did not finish)",
                           "collection", 404)
        files = conn.execute("select count(*) from files").fetchone()[0]
        chunks = conn.execute("select count(*) from chunks").fetchone()[0]
        return CollectionInfo(*row, files=files, chunks=chunks)

    def files(self, name) -> dict[str, str]:
        return dict(self._conn(name).execute("select source, hash from files").fetchall())

    # ---- writes ---------------------------------------------------------------------------------------------
    def replace_file(self, name, source, digest, chunks: list[Chunk], vectors: np.ndarray) -> None:
        conn = self._conn(name)
        index = self._faiss(name)
        vectors = check_vectors(chunks, vectors, self._dim(name))
        conn.execute("begin immediate")
        try:
            old = [r[0] for r in conn.execute("select id from chunks where source = ?", (source,))]
            conn.execute("delete from chunks where source = ?", (source,))
            ids = []
            for c, v in zip(chunks, vectors):
                cur = conn.execute("insert into chunks (source, heading, page, chunk_no, start_char, end_char, text,"
                                   " vector) values (?, ?, ?, ?, ?, ?, ?, ?)",
                                   (source, c.heading, c.page, c.index, c.start, c.end, c.text, v.tobytes()))
                ids.append(cur.lastrowid)
            conn.execute("insert or replace into files values (?, ?)", (source, digest))
            conn.execute("update collection set version = version + 1")
            conn.execute("commit")
        except BaseException:
            conn.execute("rollback")
            raise
        self._apply(name, index, old, ids, vectors)

    def delete_file(self, name, source) -> int:
        conn = self._conn(name)
        index = self._faiss(name)
        conn.execute("begin immediate")
        try:
            old = [r[0] for r in conn.execute("select id from chunks where source = ?", (source,))]
            conn.execute("delete from chunks where source = ?", (source,))
            conn.execute("delete from files where source = ?", (source,))
            conn.execute("delete from owners where source = ?", (source,))
            conn.execute("update collection set version = version + 1")
            conn.execute("commit")
        except BaseException:
            conn.execute("rollback")
            raise
        self._apply(name, index, old, [], np.zeros((0, 1), np.float32))
        return len(old)

    def set_owner(self, name, source, owner) -> None:
        self._conn(name).execute("insert or replace into owners values (?, ?)", (source, owner))

    def sources_of(self, name, owner) -> list[str]:
        return [r[0] for r in self._conn(name).execute("select source from owners where owner = ? order by source",
                                                       (owner,))]

    def _apply(self, name, index, removed: list[int], ids: list[int], vectors: np.ndarray) -> None:
        """Mirror one committed file change into the in-memory FAISS index."""
        if removed:
            if self._kind(name) == "hnsw":  # HNSW cannot remove: rebuild from SQLite at the next search/flush
                self._index.pop(name, None)
            else:
                index.remove_ids(np.asarray(removed, dtype=np.int64))
        if ids and name in self._index:
            self._index[name].add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        self._dirty.add(name)

    def drop(self, name) -> None:
        import shutil

        folder = self._folder(name)
        self._conn(name)  # raises when missing
        self._db.pop(name).close()
        self._index.pop(name, None)
        shutil.rmtree(folder)

    # ---- the FAISS index ------------------------------------------------------------------------------------
    def _kind(self, name) -> str:
        return self._conn(name).execute("select index_kind from collection").fetchone()[0]

    def _dim(self, name) -> int:
        return self._conn(name).execute("select dim from collection").fetchone()[0]

    def version(self, name) -> int:
        return self._conn(name).execute("select version from collection").fetchone()[0]

    def _new_index(self, dim: int, kind: str):
        import faiss

        if kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = 80
            inner.hnsw.efSearch = self.ef_search
        else:
            inner = faiss.IndexFlatIP(dim)
        return faiss.IndexIDMap2(inner)

    def _faiss(self, name):
        """The collection's index: from memory, else its file when that is current, else rebuilt from SQLite."""
        import faiss

        if name in self._index:
            return self._index[name]
        info = self.info(name)
        path = self._folder(name) / "index.faiss"
        stamp = path.with_suffix(".version")
        if path.exists() and stamp.exists() and stamp.read_text().strip() == str(info.version):
            index = faiss.read_index(str(path))
        else:
            index = self._new_index(info.dim, info.index)
            rows = self._conn(name).execute("select id, vector from chunks order by id")
            while batch := rows.fetchmany(8192):
                ids = np.asarray([r[0] for r in batch], dtype=np.int64)
                vecs = np.frombuffer(b"".join(r[1] for r in batch), dtype=np.float32).reshape(len(batch), info.dim)
                index.add_with_ids(vecs, ids)
            self._dirty.add(name)
        if info.index == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = self.ef_search
        self._index[name] = index
        return index

    def flush(self, name) -> None:
        import faiss

        if name not in self._dirty:
            return
        index = self._faiss(name)
        path = self._folder(name) / "index.faiss"
        faiss.write_index(index, str(path) + ".tmp")
        Path(str(path) + ".tmp").replace(path)
        stamp = path.with_suffix(".version")
        stamp.with_suffix(".tmp").write_text(str(self.version(name)))
        stamp.with_suffix(".tmp").replace(stamp)
        self._conn(name).execute("pragma wal_checkpoint(TRUNCATE)")  # no old page images left in the WAL file
        self._dirty.discard(name)

    # ---- reads ----------------------------------------------------------------------------------------------
    def dense_search(self, name, vector, k, sources=None):
        import faiss

        index = self._faiss(name)
        if index.ntotal == 0:
            return []
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        params = None
        if sources is not None:
            marks = ",".join("?" * len(sources))
            allowed = [r[0] for r in self._conn(name).execute(f"select id from chunks where source in ({marks})",
                                                             list(sources))]
            if not allowed:
                return []
            selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
            params = (faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, k))
                      if self._kind(name) == "hnsw" else faiss.SearchParameters(sel=selector))
        scores, ids = _one_thread_search(index, query, min(k, index.ntotal), params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def get_chunks(self, name, ids):
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = {r[0]: _row(r) for r in self._conn(name).execute(f"select {COLUMNS} from chunks where id in ({marks})",
                                                                 list(ids))}
        return [rows[i] for i in ids if i in rows]

    def all_chunks(self, name):
        return [_row(r) for r in self._conn(name).execute(f"select {COLUMNS} from chunks order by id")]

    def close(self) -> None:
        for name in list(self._dirty):
            if name in self._db:
                self.flush(name)
        for conn in self._db.values():
            conn.close()
        self._db.clear()
        self._index.clear()
