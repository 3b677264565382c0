"""Request logs under load, and after `kill -9`: requests/s and p95 latency with --log off/metadata/redacted/full
(and redacted with the writer as a thread in the server, as before the writer process), then rows in the database
vs requests answered when the server is killed mid-load.

A tiny random Llama (the test suite's shape, SmolLM2's tokenizer) so that the server answers many requests per
second and the logger, not the model, is what is stressed. Each request's prompt carries a unique marker and
personal data. Load starts once the writer reports ready (its redactor loaded). Kill scenarios (--log redacted):
`server`: kill -9 of the server process only (the writer process outlives it and drains its pipe); `group`:
kill -9 of the server's whole process group (server and writer: an OOM kill of both, a machine crash);
`thread`: kill -9 of a server whose writer is a thread. After each, the SQLite file is checked: integrity, rows,
markers of answered requests that have a row, rows whose answer never reached the client, raw personal data.

    /tmp/cpuq kill9 .venv/bin/python benchmarks/privacy/kill9.py --out runs/privacy-kill9
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

KEY, ADMIN = "sk-kill9", "sk-kill9-admin"
PII = "Hallo, met Jan de Vries, mail jan.devries@example.nl, IBAN NL91ABNA0417164300, bel +49 30 12345678"


def tiny_model(out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tunekit.models import load_tokenizer

    if (out / "config.json").exists():
        return out
    tok = load_tokenizer("smollm2-135m")
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, log: str, db: Path, port: int, writer: str = "process") -> subprocess.Popen:
    """The server in its own session (process group: the `group` kill), once the log writer is ready."""
    env = {**os.environ, "TUNEKIT_API_KEYS": KEY, "TUNEKIT_ADMIN_KEYS": ADMIN, "TUNEKIT_CACHE": str(db.parent / "cache")}
    cmd = [sys.executable, "-m", "tunekit.cli", "serve", "--model", str(model), "--port", str(port), "--dtype",
           "float32", "--threads", "1", "--log", log, "--log-db", f"sqlite:///{db}", "--max-queue", "1024",
           "--log-writer", writer] + (["--log-full-consent"] if log == "full" else [])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(db.with_suffix(".log"), "w"),
                            start_new_session=True)
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                if log == "off" or log_stats(port).get("ready"):
                    return proc
            time.sleep(0.3)
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start; see {db.with_suffix('.log')}")


def log_stats(port: int) -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/v1/admin/logs", headers={"Authorization": f"Bearer {ADMIN}"},
                     timeout=5).json()


async def load(port: int, seconds: float, concurrency: int, answered: list, model: str, kill=None,
               latencies: list | None = None):
    import httpx

    stop_at = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def worker(client):
        while time.monotonic() < stop_at:
            i = next(counter)
            body = {"model": model, "messages": [{"role": "user", "content": f"req-{i:07d} {PII}"}], "max_tokens": 4,
                    "temperature": 0}
            t0 = time.perf_counter()
            try:
                r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                      headers={"Authorization": f"Bearer {KEY}", "X-User-Id": f"user-{i % 50}"})
                if r.status_code == 200:
                    answered.append(i)
                    if latencies is not None:
                        latencies.append(time.perf_counter() - t0)
            except httpx.HTTPError:
                if kill is not None:
                    return

    async with httpx.AsyncClient(timeout=30) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        if kill is not None:
            await asyncio.sleep(seconds * 0.999)
            kill()
        await asyncio.gather(*tasks)


def model_name(port: int) -> str:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()[
        "data"][0]["id"]


def rows_of(db: Path) -> dict:
    con = sqlite3.connect(db)
    integrity = con.execute("pragma integrity_check").fetchone()[0]
    prompts = [r[0] for r in con.execute("select prompt from request_log")]
    con.close()
    return {"integrity": integrity, "prompts": prompts}


def kill_scenario(model: Path, out: Path, how: str, seconds: float, concurrency: int) -> dict:
    db = out / f"kill9-{how}.db"
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        p.unlink(missing_ok=True)
    port = free_port()
    proc = start(model, "redacted", db, port, "thread" if how == "thread" else "process")
    name = model_name(port)
    writer_pid = log_stats(port).get("writer_pid")
    answered: list = []
    at_kill = {}

    def kill():
        at_kill["answered"] = len(answered)
        if how == "group":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        at_kill["rows"] = len(rows_of(db)["prompts"])

    asyncio.run(load(port, seconds, concurrency, answered, name, kill))
    proc.wait(30)
    t0 = time.monotonic()
    while writer_pid and time.monotonic() - t0 < 600:  # the orphaned writer drains its pipe, then exits
        try:
            os.kill(writer_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    drained_s = time.monotonic() - t0
    r = rows_of(db)
    logged = {int(p.split("req-")[1][:7]) for p in r["prompts"] if p and "req-" in p}
    ans = set(answered)
    leaked = sum(any(v in (p or "") for v in ("jan.devries@example.nl", "NL91ABNA0417164300", "12345678"))
                 for p in r["prompts"])
    return {"kill": how, "answered_before_kill": len(ans), "rows_at_kill": at_kill.get("rows"),
            "rows": len(r["prompts"]), "writer_drained_s": round(drained_s, 1) if how == "server" else None,
            "integrity_check": r["integrity"], "answered_with_row": len(ans & logged),
            "answered_without_row": len(ans - logged), "rows_not_answered": len(logged - ans),
            "rows_with_raw_pii": leaked, "concurrency": concurrency, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/privacy-kill9")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--json", default="docs/privacy-kill9.json")
    ap.add_argument("--modes", nargs="*", default=["off", "metadata", "redacted", "full", "redacted-thread"])
    ap.add_argument("--kills", nargs="*", default=["server", "group", "thread"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(out / "tiny-model")
    results = {"throughput": {}, "kill9": {}}
    for mode in args.modes:
        log, writer = (mode.split("-") + ["process"])[:2]
        db = out / f"tput-{mode}.db"
        db.unlink(missing_ok=True)
        port = free_port()
        proc = start(model, log, db, port, writer)
        answered, lat = [], []
        asyncio.run(load(port, args.seconds, args.concurrency, answered, model_name(port), latencies=lat))
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
        rows = sqlite3.connect(db).execute("select count(*) from request_log").fetchone()[0] if log != "off" else 0
        lat.sort()
        results["throughput"][mode] = {"answered": len(answered), "req_per_s": len(answered) / args.seconds,
                                       "p50_ms": 1000 * lat[len(lat) // 2], "p95_ms": 1000 * lat[int(len(lat) * 0.95)],
                                       "rows_after_clean_shutdown": rows}
        print(mode, results["throughput"][mode], flush=True)
    for how in args.kills:
        results["kill9"][how] = kill_scenario(model, out, how, args.seconds, args.concurrency)
        print("kill9", results["kill9"][how], flush=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
