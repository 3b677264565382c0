"""The request log in a writer process: redaction and database writes leave the server process entirely.

`ProcessRequestLog` has RequestLog's interface (record, flush, close, stats, store, mode). The server side only
puts a row on a bounded queue; a feeder thread writes it as one JSON line to the writer's stdin (a pipe; microseconds
per row, no redaction, no database). The writer (`python -m tunekit.privacy.logwriter`) reads the pipe eagerly into
its own bounded queue and runs the RequestLog writer loop there: redact, insert in batches, retry when the store is
away, retention. It reports its counters as JSON lines on stdout, which the server reads for `stats()`, `flush()`
and the Prometheus counters.

Why a process, not a thread: spaCy and libphonenumber are pure-Python-heavy and hold the GIL, so a writer thread
slows the event loop and the engine even though it is "off the request path". And the backlog a crash can lose
moves with it: when the server is killed (kill -9, OOM), the writer still reads every row already in the pipe, sees
EOF, writes its queue and exits. What a crash of the server loses is only what the feeder had not yet written to the
pipe; a crash of the writer process (or of the machine) loses the rows it had not yet committed. The writer ignores
SIGINT and SIGTERM (a Ctrl-C or a service stop signals the whole process group): it stops at EOF, once the server
has closed the pipe, after writing what it holds. Raw personal data is never spooled to disk: it lives only in the
pipe and the writer's memory until it is redacted.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

from .logstore import LOG_MODES, LogStore
from .requestlog import RequestLog, _say

_COUNTERS = ("accepted", "written", "dropped", "lost", "queued", "failed_batches", "purged")


class ProcessRequestLog:
    def __init__(self, store: LogStore, mode: str = "metadata", max_queue: int = 10_000, batch: int = 256,
                 flush_seconds: float = 0.2, retention_days: float | None = None, purge_every_s: float = 3600.0,
                 registry=None, close_timeout: float = 10.0):
        if mode not in LOG_MODES or mode == "off":
            raise ValueError(f"log mode {mode!r}: one of metadata, redacted, full")
        self.store, self.mode = store, mode
        self._config = {"url": store.url, "mode": mode,
                        "max_queue": max_queue, "batch": batch, "flush_seconds": flush_seconds,
                        "retention_days": retention_days, "purge_every_s": purge_every_s,
                        "close_timeout": close_timeout}
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.accepted = self.local_dropped = self.sent = self.lost_to_writer = self.restarts = 0
        self._child: dict = {}  # the writer's last report
        self._base = {k: 0 for k in ("written", "dropped")}  # counts of writers that died (restart)
        self._lock = threading.Lock()
        self._warned_drop = 0.0
        self._stopping = threading.Event()
        self._metrics = None
        if registry is not None:
            from prometheus_client import Counter, Gauge

            self._metrics = (Counter("tunekit_log_rows_written", "Request-log rows committed", registry=registry),
                             Counter("tunekit_log_rows_dropped", "Request-log rows dropped: queue full while the "
                                     "store was unreachable, or lost with a writer process", registry=registry),
                             Gauge("tunekit_log_queue_depth", "Request-log rows waiting to be written",
                                   registry=registry))
            self._metrics[2].set_function(lambda: self.stats()["queued"])
        self._spawn()
        self._feeder = threading.Thread(target=self._feed, name="tunekit-request-log-feeder", daemon=True)
        self._feeder.start()

    # the request path: O(1), never blocks
    def record(self, *, route: str, status: int, latency_ms: float, key_id: str | None = None,
               user: str | None = None, model: str | None = None, prompt_tokens: int | None = None,
               completion_tokens: int | None = None, error: str | None = None, prompt=None, answer=None) -> bool:
        row = {"created_at": datetime.now(timezone.utc).isoformat(), "key_id": key_id, "user": user, "model": model,
               "route": route, "status": status, "latency_ms": int(latency_ms), "prompt_tokens": prompt_tokens,
               "completion_tokens": completion_tokens, "error": error, "prompt": prompt, "answer": answer}
        try:
            self.queue.put_nowait(row)
            with self._lock:
                self.accepted += 1
            return True
        except queue.Full:  # the writer process is not reading (dead or stuck): count, never block
            with self._lock:
                self.local_dropped += 1
            if self._metrics:
                self._metrics[1].inc()
            now = time.monotonic()
            if now - self._warned_drop > 10:
                self._warned_drop = now
                _say(f"warning: request log queue full ({self.queue.maxsize} rows): "
                     f"{self.stats()['dropped']} row(s) dropped so far")
            return False

    # the writer process
    def _spawn(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tunekit.privacy.logwriter"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.proc.stdin.write((json.dumps(self._config) + "\n").encode())  # the URL (password) never in argv
        self.proc.stdin.flush()
        self._child = {}
        self._reader = threading.Thread(target=self._read_reports, args=(self.proc,), daemon=True,
                                        name="tunekit-request-log-reports")
        self._reader.start()

    def _read_reports(self, proc) -> None:
        for line in proc.stdout:
            try:
                rep = json.loads(line)
            except ValueError:
                continue
            if self._metrics:
                old = self._child
                self._metrics[0].inc(max(0, rep.get("written", 0) - old.get("written", 0)))
                self._metrics[1].inc(max(0, rep.get("dropped", 0) - old.get("dropped", 0)))
            self._child = rep

    def _feed(self) -> None:
        """Rows -> the writer's stdin, as they come (a row waits here only while the pipe is full)."""
        while True:
            try:
                row = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            rows = [row]
            while len(rows) < 512:
                try:
                    rows.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            data = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows).encode()
            while True:
                try:
                    self.proc.stdin.write(data)
                    self.proc.stdin.flush()
                    with self._lock:
                        self.sent += len(rows)
                    break
                except (BrokenPipeError, OSError, ValueError):
                    if not self._restart():  # stopping: no new writer for these rows
                        with self._lock:
                            self.lost_to_writer += len(rows)
                        break

    def _restart(self) -> bool:
        """The writer died: the rows it held uncommitted are lost (counted); start another one (False when
        stopping)."""
        self.proc.wait()
        self._reader.join(5)
        done = self._child.get("written", 0) + self._child.get("dropped", 0)
        with self._lock:
            lost = max(0, self.sent - done)
            self.lost_to_writer += lost
            self._base["written"] += self._child.get("written", 0)
            self._base["dropped"] += self._child.get("dropped", 0)
            self._child, self.sent = {}, 0
            self.restarts += 1
        if self._metrics:
            self._metrics[1].inc(lost)
        _say(f"warning: request log writer process exited (code {self.proc.returncode}); {lost} row(s) it held "
             "uncommitted are lost" + ("" if self._stopping.is_set() else "; starting a new one"))
        if self._stopping.is_set():
            return False
        self._spawn()
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every accepted row is committed or counted as dropped (tests, erasure, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.stats()
            if s["written"] + s["dropped"] - self.local_dropped >= self.accepted:
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float | None = None) -> dict:
        """Hand the writer what is queued, close its pipe (it writes what it holds, giving an unreachable store
        close_timeout seconds), wait for it, report."""
        timeout = self._config["close_timeout"] if timeout is None else timeout
        self._stopping.set()
        self._feeder.join(timeout + 5)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout + 60)
        except subprocess.TimeoutExpired:  # a long backlog: the writer finishes on its own (killing it loses rows)
            _say(f"request log writer (pid {self.proc.pid}) is still writing {self.stats()['queued']} row(s); it "
                 "exits when done")
            return self.stats()
        self._reader.join(5)
        return self.stats()

    def stats(self) -> dict:
        c = self._child
        with self._lock:
            in_pipe = max(0, self.sent - c.get("accepted", 0) - c.get("queue_full", 0))
            return {"mode": self.mode, "written": self._base["written"] + c.get("written", 0),
                    "dropped": self.local_dropped + self.lost_to_writer + self._base["dropped"] + c.get("dropped", 0),
                    "queued": self.queue.qsize() + in_pipe + c.get("queued", 0),
                    "failed_batches": c.get("failed_batches", 0), "purged": c.get("purged", 0),
                    "store_error": c.get("store_error"), "ready": c.get("ready", False), "writer_pid": self.proc.pid,
                    "writer_restarts": self.restarts}


# --- the writer process -------------------------------------------------------------------------------------------

def _report(log: RequestLog, final: bool = False) -> dict:
    s = log.stats()
    return {**{k: s.get(k, getattr(log, k, 0)) for k in _COUNTERS}, "queue_full": log.dropped - log.lost,
            "store_error": s["store_error"], "ready": s["ready"], "final": final}


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):  # a process-group signal must not kill the backlog: stop at EOF
        signal.signal(sig, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    cfg = json.loads(stdin.readline())
    store = LogStore(cfg["url"], migrate=False)
    log = RequestLog(store, cfg["mode"], max_queue=cfg["max_queue"], batch=cfg["batch"],
                     flush_seconds=cfg["flush_seconds"], retention_days=cfg["retention_days"],
                     purge_every_s=cfg["purge_every_s"])
    eof = threading.Event()

    def read() -> None:
        for line in stdin:
            row = json.loads(line)
            row["created_at"] = datetime.fromisoformat(row["created_at"])
            log.put_row(row)
        eof.set()

    threading.Thread(target=read, name="tunekit-request-log-pipe", daemon=True).start()
    out, last = sys.stdout, None

    def say(rep: dict) -> None:
        nonlocal out
        if out is None:
            return
        try:
            out.write(json.dumps(rep) + "\n")
            out.flush()
        except (BrokenPipeError, OSError, ValueError):  # the server is gone: keep writing rows, stop reporting
            out = None

    while not eof.wait(0.05):
        rep = _report(log)
        if rep != last:
            say(rep)
            last = rep
    log.close(cfg["close_timeout"], wait=None)  # every row held is written (or the store given up on)
    say(_report(log, final=True))
    store.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
