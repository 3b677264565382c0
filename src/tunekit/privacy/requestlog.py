"""Request logging off the request path: a bounded queue, one writer thread, batches in one transaction each.

The HTTP side calls `RequestLog.record(...)`, which only puts a dict on a queue (never blocks, never touches the
database). The writer thread takes up to `batch` rows, redacts them (the redactor runs here, not on the request
path), and inserts them in one transaction; a batch is acknowledged only once committed (SQLite in WAL mode,
PostgreSQL transactions), so a crash loses at most the rows still queued, never a committed one. When the database
goes away the batch is kept and retried with backoff while new rows queue up to `max_queue`; rows past the bound
are dropped and counted (`dropped`, the tunekit_log_rows_dropped Prometheus counter, a warning on stderr), never
silently. A periodic purge applies `retention_days`.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from datetime import datetime, timezone

from .logstore import LOG_MODES, LogStore
from .redactor import Redactor, shared_redactor


def _say(msg: str) -> None:
    try:
        print(f"[tunekit] {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr gone (the server was killed): the writer goes on
        pass


class RequestLog:
    def __init__(self, store: LogStore, mode: str = "metadata", redactor: Redactor | None = None,
                 max_queue: int = 10_000, batch: int = 256, flush_seconds: float = 0.2,
                 retention_days: float | None = None, purge_every_s: float = 3600.0, registry=None):
        if mode not in LOG_MODES or mode == "off":
            raise ValueError(f"log mode {mode!r}: one of metadata, redacted, full")
        self.store, self.mode, self.batch, self.flush_seconds = store, mode, batch, flush_seconds
        self._redactor = redactor  # None: loaded by the writer thread as it starts (~1-10 s: spaCy)
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.retention_days, self.purge_every_s = retention_days, purge_every_s
        self.written = self.dropped = self.failed_batches = self.purged = 0
        self.accepted = self.lost = 0  # rows put on the queue; of those, dropped at shutdown (store still away)
        self._count_lock = threading.Lock()
        self.last_error: str | None = None
        self._pending: list[dict] = []
        self._stop = threading.Event()
        self._warned_drop = 0.0
        self._metrics = None
        if registry is not None:
            from prometheus_client import Counter, Gauge

            self._metrics = (Counter("tunekit_log_rows_written", "Request-log rows committed", registry=registry),
                             Counter("tunekit_log_rows_dropped", "Request-log rows dropped: queue full while the "
                                     "store was unreachable", registry=registry),
                             Gauge("tunekit_log_queue_depth", "Request-log rows waiting to be written",
                                   registry=registry))
            self._metrics[2].set_function(lambda: self.queue.qsize() + len(self._pending))
        self.thread = threading.Thread(target=self._run, name="tunekit-request-log", daemon=True)
        self.thread.start()

    # the request path: O(1), never blocks
    def record(self, *, route: str, status: int, latency_ms: float, key_id: str | None = None,
               user: str | None = None, model: str | None = None, prompt_tokens: int | None = None, completion_tokens: int | None = None,
               error: str | None = None, prompt=None, answer=None) -> bool:
        return self.put_row({"created_at": datetime.now(timezone.utc), "key_id": key_id, "user": user,
                             "model": model, "route": route, "status": status, "latency_ms": int(latency_ms),
                             "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "error": error,
                             "prompt": prompt, "answer": answer})

    def put_row(self, row: dict) -> bool:
        """Queue a row as record() builds it (the writer process feeds rows from its pipe here)."""
        try:
            self.queue.put_nowait(row)
            with self._count_lock:
                self.accepted += 1
            return True
        except queue.Full:
            self.dropped += 1
            if self._metrics:
                self._metrics[1].inc()
            now = time.monotonic()
            if now - self._warned_drop > 10:
                self._warned_drop = now
                _say(f"warning: request log queue full ({self.queue.maxsize} rows; store: {self.last_error or 'slow'}"
                     f"): {self.dropped} row(s) dropped so far")
            return False

    # the writer thread
    def _prepare(self, row: dict) -> dict:
        """What the store keeps of a request: the user as a pseudonym, text redacted (mode full: prompt/answer
        as given)."""
        text = lambda v: v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)  # noqa: E731
        red = self._redactor.redact
        out = {k: row[k] for k in ("created_at", "key_id", "route", "status", "latency_ms", "prompt_tokens",
                                   "completion_tokens")}
        out["user_ref"] = self.store.user_ref(row["user"])
        # a model name that was served is one of ours; an unknown one (status 404) is whatever the caller sent
        out["model"] = (red(row["model"]) if row["status"] >= 400 else row["model"]) if row["model"] else None
        out["error"] = red(row["error"]) if row["error"] else None
        out["log_mode"] = self.mode
        keep_text = self.mode in ("redacted", "full")
        out["prompt"] = (text(row["prompt"]) if self.mode == "full" else red(text(row["prompt"]))) \
            if keep_text and row["prompt"] is not None else None
        out["answer"] = (text(row["answer"]) if self.mode == "full" else red(text(row["answer"]))) \
            if keep_text and row["answer"] is not None else None
        return out

    def _take(self, timeout: float) -> list[dict]:
        rows = []
        try:
            rows.append(self.queue.get(timeout=timeout))
            while len(rows) < self.batch:
                rows.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        return rows

    def _run(self) -> None:
        if self._redactor is None:  # loaded here at start (spaCy: seconds), not on the request path nor at row 1
            self._redactor = shared_redactor()
        self.ready = True
        backoff, next_purge = 0.1, time.monotonic()
        while True:
            if not self._pending:
                stopping = self._stop.is_set()
                self._pending = [self._prepare(r) for r in self._take(0.0 if stopping else self.flush_seconds)]
                if not self._pending and stopping:
                    return
            if self._pending:
                try:
                    self.written += self.store.insert_rows(self._pending)
                    if self._metrics:
                        self._metrics[0].inc(len(self._pending))
                    if self.last_error:
                        _say(f"request log store is back: {len(self._pending)} queued row(s) written")
                    self._pending, self.last_error, backoff = [], None, 0.1
                except Exception as e:  # noqa: BLE001 - the store went away: keep the batch, retry
                    self.failed_batches += 1
                    if self.last_error is None:
                        _say(f"warning: request log store unreachable ({type(e).__name__}); rows are queued "
                             f"(at most {self.queue.maxsize}) and written when it returns")
                    self.last_error = type(e).__name__
                    if self._stop.is_set():
                        if time.monotonic() > self._give_up_at:
                            lost = len(self._pending) + self.queue.qsize()
                            self.dropped += lost
                            self.lost += lost
                            _say(f"request log: store still unreachable at shutdown; {self.dropped} row(s) dropped")
                            return
                        time.sleep(backoff)
                    else:
                        self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
            if self.retention_days and time.monotonic() >= next_purge:
                next_purge = time.monotonic() + self.purge_every_s
                try:
                    self.purged += self.store.purge(self.retention_days)
                except Exception as e:  # noqa: BLE001
                    self.last_error = type(e).__name__

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued row is committed (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        target = self.accepted
        while self.written + self.lost < target and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)
        return self.written + self.lost >= target

    def close(self, timeout: float = 10.0, wait: float | None = 5.0) -> dict:
        """Write what is queued (giving an unreachable store `timeout` seconds), stop the thread, report.
        wait: seconds beyond `timeout` to wait for the writer (None: until every queued row is written or given up
        on; the writer process uses that, since its rows have nowhere else to go)."""
        self._give_up_at = time.monotonic() + timeout
        self._stop.set()
        self.thread.join(None if wait is None else timeout + wait)
        return self.stats()

    def stats(self) -> dict:
        return {"mode": self.mode, "written": self.written, "dropped": self.dropped, "queued": self.queue.qsize()
                + len(self._pending), "failed_batches": self.failed_batches, "purged": self.purged,
                "store_error": self.last_error, "ready": self.ready}

    _give_up_at = float("inf")
    ready = False  # the writer has its redactor and takes rows
