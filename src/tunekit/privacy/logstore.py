"""The request-log store: SQLAlchemy 2 over SQLite (the embedded default, WAL) or PostgreSQL (by URL).

Tables (created and upgraded by the Alembic migrations in privacy/migrations/):

- request_log: one row per answered request: time, key name, user pseudonym, model, route, status, token counts,
  latency, error (redacted), and in `redacted`/`full` log modes the prompt and answer.
- erasure_audit: that an erasure happened: when, by whom (key name), the user pseudonym, rows removed per store.
- log_exports: JSONL files written by `tunekit logs export`, so an erasure can remove them too.
- log_meta: the store's pseudonym salt when TUNEKIT_PII_SECRET is not set.

User ids are never stored: `user_ref` is HMAC-SHA256(secret, user id), the secret from TUNEKIT_PII_SECRET or, failing
that, a random one kept in log_meta. The same id always maps to the same reference in one store, so
`tunekit logs erase --user ID` and `export --user ID` find the rows, and the table alone names nobody.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import (JSON, BigInteger, Column, DateTime, Integer, MetaData, String, Table, Text, create_engine,
                        delete, event, func, insert, select)
from sqlalchemy.exc import SQLAlchemyError

from .errors import SECRET_ENV, PrivacyError

metadata = MetaData()
request_log = Table(
    "request_log", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("key_id", String(200)),
    Column("user_ref", String(64), index=True),
    Column("model", String(300)),
    Column("route", String(100)),
    Column("status", Integer),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("latency_ms", Integer),
    Column("error", Text),
    Column("prompt", Text),
    Column("answer", Text),
    Column("log_mode", String(16)),
)
erasure_audit = Table(
    "erasure_audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(200)),
    Column("user_ref", String(64)),
    Column("counts", JSON),
)
log_exports = Table(
    "log_exports", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("user_ref", String(64), index=True),
    Column("path", Text),
)
log_meta = Table("log_meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text))

LOG_MODES = ("off", "metadata", "redacted", "full")


class LogStoreError(PrivacyError):
    pass


def default_url() -> str:
    from ..models import cache_dir

    return f"sqlite:///{cache_dir() / 'logs' / 'requests.db'}"


def normalise_url(url: str) -> str:
    """sqlite paths as URLs; postgresql:// through psycopg 3 (SQLAlchemy's default driver would be psycopg2)."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser()}"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given minus anything after '@'
        return url.split("@")[-1]


def upgrade(engine) -> None:
    """Run the Alembic migrations up to head on `engine`."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class LogStore:
    """Read/write access to one log database. Thread-safe (SQLAlchemy's pool; short transactions)."""

    def __init__(self, url: str | None = None, migrate: bool = True, timeout: float = 30.0):
        self.url = normalise_url(url or default_url())
        kwargs = {}
        if self.url.startswith("sqlite:///"):
            path = Path(self.url[len("sqlite:///"):])
            if str(path) not in ("", ":memory:"):
                path.parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": timeout, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {"connect_timeout": max(1, int(timeout))}
        try:
            self.engine = create_engine(self.url, **kwargs)
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise LogStoreError(f"log store {redact_url(self.url)}: {e}") from None
        if self.engine.dialect.name == "sqlite":
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, record):
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; a crash keeps commits
                cur.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss too
                cur.execute("PRAGMA secure_delete=ON")  # erased and purged rows are overwritten, not left in free pages
                cur.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
                cur.close()
        try:
            if migrate:
                upgrade(self.engine)
            self._secret = self._pseudonym_secret()
        except SQLAlchemyError as e:
            raise LogStoreError(f"log store {redact_url(self.url)} cannot be reached or set up: "
                                f"{type(e.orig or e).__name__}: {str(e.orig or e).strip().splitlines()[0]}\n"
                                "fix the URL (--log-db), start the database, or serve with --log off") from None

    def _pseudonym_secret(self) -> bytes:
        env = os.environ.get(SECRET_ENV)
        if env:
            return env.encode()
        with self.engine.begin() as c:
            row = c.execute(select(log_meta.c.value).where(log_meta.c.key == "user_salt")).first()
            if row:
                return row[0].encode()
            salt = secrets.token_hex(32)
            c.execute(insert(log_meta).values(key="user_salt", value=salt))
            return salt.encode()

    def user_ref(self, user: str | None) -> str | None:
        if not user:
            return None
        return hmac.new(self._secret, user.encode("utf-8"), hashlib.sha256).hexdigest()

    # writes
    def insert_rows(self, rows: list[dict]) -> int:
        """One transaction for the batch: all rows are committed or none."""
        if not rows:
            return 0
        with self.engine.begin() as c:
            c.execute(insert(request_log), rows)
        return len(rows)

    def purge(self, days: float) -> int:
        """Delete rows older than `days`; returns how many."""
        cutoff = datetime.now(timezone.utc) - timedelta(days=days)
        with self.engine.begin() as c:
            return c.execute(delete(request_log).where(request_log.c.created_at < cutoff)).rowcount

    def erase_user(self, user: str, actor: str = "cli", extra_stores: dict | None = None) -> dict[str, int]:
        """Remove every row and file of `user` from the derived stores and the log store; audit it.

        extra_stores: {name: fn(user) -> count or {part: count}} for stores outside this database (RAG collections,
        caches). They run first: if one fails, nothing is deleted here and no audit row claims an erasure, so the
        request can simply be repeated (every step is idempotent)."""
        ref = self.user_ref(user)
        counts: dict = {}
        for name, fn in (extra_stores or {}).items():
            found = fn(user)
            counts[name] = found if isinstance(found, dict) else int(found)
        with self.engine.begin() as c:
            counts["request_log"] = c.execute(delete(request_log).where(request_log.c.user_ref == ref)).rowcount
            paths = [r[0] for r in c.execute(select(log_exports.c.path).where(log_exports.c.user_ref == ref))]
            removed = 0
            for p in paths:
                try:
                    Path(p).unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
            c.execute(delete(log_exports).where(log_exports.c.user_ref == ref))
            counts["exported_jsonl"] = removed
        if self.engine.dialect.name == "sqlite":  # no page image of the erased rows left in the WAL file
            with self.engine.connect() as c:
                c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        counts = {"request_log": counts.pop("request_log"), "exported_jsonl": counts.pop("exported_jsonl"), **counts}
        with self.engine.begin() as c:
            c.execute(insert(erasure_audit).values(at=datetime.now(timezone.utc), actor=actor, user_ref=ref,
                                                   counts=counts))
        return counts

    # reads
    def rows(self, user: str | None = None) -> list[dict]:
        q = select(request_log).order_by(request_log.c.id)
        if user is not None:
            q = q.where(request_log.c.user_ref == self.user_ref(user))
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q)]

    def count(self) -> int:
        with self.engine.connect() as c:
            return c.execute(select(func.count()).select_from(request_log)).scalar_one()

    def audit(self) -> list[dict]:
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(select(erasure_audit).order_by(erasure_audit.c.id))]

    def export_user(self, user: str, out: str | Path) -> int:
        """Write the user's rows as JSONL (a data-subject access request); recorded so an erasure removes it."""
        rows = self.rows(user)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as fh:
            for r in rows:
                r = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items() if k != "user_ref"}
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        with self.engine.begin() as c:
            c.execute(insert(log_exports).values(at=datetime.now(timezone.utc), user_ref=self.user_ref(user),
                                                 path=str(out.resolve())))
        return len(rows)

    def dispose(self) -> None:
        self.engine.dispose()
