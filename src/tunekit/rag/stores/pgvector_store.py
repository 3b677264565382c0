"""PostgreSQL + pgvector through psycopg 3: one chunks table per collection with an HNSW index (inner product on
unit vectors = cosine), and two shared tables for collections and files.

    tunekit_rag_collections (name, id, model, dim, language, index_kind, version)
    tunekit_rag_files       (collection, source, hash)
    tunekit_rag_owners      (collection, source, owner)   who a source was ingested for (erasure requests)
    tunekit_rag_chunks_<id> (id, source, heading, page, chunk_no, start_char, end_char, text, embedding vector(dim))

Each file is one transaction. Filtered searches use pgvector's iterative index scans (0.8+), so a filter that keeps
few rows still returns k of them.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..chunking import Chunk
from ..errors import RagError
from .base import CollectionInfo, Store, StoredChunk, check_name, check_vectors

SCHEMA = """
create extension if not exists vector;
create table if not exists tunekit_rag_collections (name text primary key, id serial unique, model text not null,
  dim integer not null, language text not null, index_kind text not null, version bigint not null default 0);
create table if not exists tunekit_rag_files (collection text not null references tunekit_rag_collections(name)
  on delete cascade, source text not null, hash text not null, primary key (collection, source));
create table if not exists tunekit_rag_owners (collection text not null references tunekit_rag_collections(name)
  on delete cascade, source text not null, owner text not null, primary key (collection, source));
create index if not exists tunekit_rag_owners_owner on tunekit_rag_owners (collection, owner);
"""
COLUMNS = "id, source, heading, page, chunk_no, start_char, end_char, text"
EF_SEARCH = 100


def _row(r) -> StoredChunk:
    return StoredChunk(r[0], r[1], r[2] or "", r[3], r[4], r[5], r[6], r[7])


class PostgresStore(Store):
    def __init__(self, url: str):
        try:
            import psycopg
            from pgvector.psycopg import register_vector
        except ImportError:
            raise RagError("a postgresql:// store needs psycopg 3 and pgvector: pip install 'psycopg[binary]' "
                           "pgvector", "store") from None
        self.url = url.replace("postgresql+psycopg://", "postgresql://")
        try:
            self.conn = psycopg.connect(self.url, autocommit=True)
        except psycopg.OperationalError as e:
            raise RagError(f"cannot connect to {self._safe_url()}: {str(e).strip()}", "store") from None
        try:
            self.conn.execute(SCHEMA)
        except psycopg.Error as e:
            raise RagError(f"{self._safe_url()}: cannot set up the pgvector tables ({str(e).strip()}); is the "
                           f"vector extension installed on the server?", "store") from None
        register_vector(self.conn)
        self._lock = threading.Lock()  # one psycopg connection; the server may call from more than one thread
        self._tables: dict[str, str] = {}

    def _safe_url(self) -> str:
        from urllib.parse import urlparse

        p = urlparse(self.url)
        return self.url.replace(p.password, "***") if p.password else self.url

    def _table(self, name: str) -> str:
        if name not in self._tables:
            row = self.conn.execute("select id from tunekit_rag_collections where name = %s",
                                    (check_name(name),)).fetchone()
            if row is None:
                raise RagError(f"no collection {name!r} in {self._safe_url()}; make it with `tunekit rag ingest DIR "
                               f"--collection {name} --store URL` (collections here: "
                               f"{', '.join(self.collections()) or 'none'})", "collection", 404)
            self._tables[name] = f"tunekit_rag_chunks_{row[0]}"
        return self._tables[name]

    def _dim(self, name) -> int:
        self._table(name)
        return self.conn.execute("select dim from tunekit_rag_collections where name = %s", (name,)).fetchone()[0]

    def version(self, name) -> int:
        self._table(name)
        return self.conn.execute("select version from tunekit_rag_collections where name = %s", (name,)).fetchone()[0]

    def collections(self) -> list[str]:
        return [r[0] for r in self.conn.execute("select name from tunekit_rag_collections order by name")]

    def create(self, name, model, dim, language, index=None) -> CollectionInfo:
        check_name(name)
        with self._lock, self.conn.transaction():
            self.conn.execute("insert into tunekit_rag_collections (name, model, dim, language, index_kind, version) "
                              "values (%s, %s, %s, %s, 'hnsw', %s) on conflict (name) do nothing",  # version starts
                              (name, model, int(dim), language, time.time_ns() // 1000))  # at the creation time (µs)
            cid = self.conn.execute("select id from tunekit_rag_collections where name = %s", (name,)).fetchone()[0]
            table = f"tunekit_rag_chunks_{cid}"
            self.conn.execute(f"create table if not exists {table} (id bigserial primary key, source text not null, "
                              f"heading text, page integer, chunk_no integer, start_char integer, end_char integer, "
                              f"text text not null, embedding vector({int(dim)}) not null)")
            self.conn.execute(f"create index if not exists {table}_source on {table} (source)")
            self.conn.execute(f"create index if not exists {table}_hnsw on {table} using hnsw "
                              f"(embedding vector_ip_ops) with (m = 16, ef_construction = 64)")
        return self.info(name)

    def info(self, name) -> CollectionInfo:
        table = self._table(name)
        row = self.conn.execute("select name, model, dim, language, index_kind, version from "
                                "tunekit_rag_collections where name = %s", (name,)).fetchone()
        files = self.conn.execute("select count(*) from tunekit_rag_files where collection = %s", (name,)).fetchone()
        chunks = self.conn.execute(f"select count(*) from {table}").fetchone()
        return CollectionInfo(*row, files=files[0], chunks=chunks[0])

    def files(self, name) -> dict[str, str]:
        self._table(name)
        return dict(self.conn.execute("select source, hash from tunekit_rag_files where collection = %s", (name,)))

    def replace_file(self, name, source, digest, chunks: list[Chunk], vectors: np.ndarray) -> None:
        table = self._table(name)
        vectors = check_vectors(chunks, vectors, self._dim(name))
        with self._lock, self.conn.transaction():
            self.conn.execute(f"delete from {table} where source = %s", (source,))
            with self.conn.cursor() as cur:
                cur.executemany(f"insert into {table} (source, heading, page, chunk_no, start_char, end_char, text, "
                                f"embedding) values (%s, %s, %s, %s, %s, %s, %s, %s)",
                                [(source, c.heading, c.page, c.index, c.start, c.end, c.text, v)
                                 for c, v in zip(chunks, vectors)])
            self.conn.execute("insert into tunekit_rag_files values (%s, %s, %s) on conflict (collection, source) "
                              "do update set hash = excluded.hash", (name, source, digest))
            self.conn.execute("update tunekit_rag_collections set version = version + 1 where name = %s", (name,))

    def delete_file(self, name, source) -> int:
        table = self._table(name)
        with self._lock, self.conn.transaction():
            n = self.conn.execute(f"delete from {table} where source = %s", (source,)).rowcount
            self.conn.execute("delete from tunekit_rag_files where collection = %s and source = %s", (name, source))
            self.conn.execute("delete from tunekit_rag_owners where collection = %s and source = %s", (name, source))
            self.conn.execute("update tunekit_rag_collections set version = version + 1 where name = %s", (name,))
        return n

    def set_owner(self, name, source, owner) -> None:
        self._table(name)
        with self._lock:
            self.conn.execute("insert into tunekit_rag_owners values (%s, %s, %s) on conflict (collection, source) "
                              "do update set owner = excluded.owner", (name, source, owner))

    def sources_of(self, name, owner) -> list[str]:
        self._table(name)
        with self._lock:
            return [r[0] for r in self.conn.execute("select source from tunekit_rag_owners where collection = %s "
                                                    "and owner = %s order by source", (name, owner))]

    def drop(self, name) -> None:
        table = self._table(name)
        with self._lock, self.conn.transaction():
            self.conn.execute(f"drop table {table}")
            self.conn.execute("delete from tunekit_rag_collections where name = %s", (name,))
        self._tables.pop(name, None)

    def dense_search(self, name, vector, k, sources=None):
        table = self._table(name)
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        where, args = ("where source = any(%s)", [list(sources)]) if sources is not None else ("", [])
        with self._lock, self.conn.transaction():
            self.conn.execute(f"set local hnsw.ef_search = {max(EF_SEARCH, int(k))}")
            self.conn.execute("set local hnsw.iterative_scan = relaxed_order")
            rows = self.conn.execute(f"select id, -(embedding <#> %s) as score from {table} {where} "
                                     f"order by embedding <#> %s limit %s", [q, *args, q, int(k)]).fetchall()
        rows.sort(key=lambda r: -r[1])  # relaxed_order: re-sort the few rows by their exact score
        return [(int(i), float(s)) for i, s in rows]

    def get_chunks(self, name, ids):
        if not ids:
            return []
        table = self._table(name)
        with self._lock:
            rows = {r[0]: _row(r) for r in self.conn.execute(f"select {COLUMNS} from {table} where id = any(%s)",
                                                             (list(ids),))}
        return [rows[i] for i in ids if i in rows]

    def all_chunks(self, name):
        table = self._table(name)
        with self._lock:
            return [_row(r) for r in self.conn.execute(f"select {COLUMNS} from {table} order by id")]

    def close(self) -> None:
        self.conn.close()
