"""Request logs under load, and after `kill -9`: throughput with --log off/metadata/redacted, then rows in the
database vs requests answered when the server is killed mid-load.

A tiny random Llama (the test suite's shape, SmolLM2's tokenizer) so that the server answers many requests per
second and the logger, not the model, is what is stressed. Each request's prompt carries a unique marker and
personal data; after the kill the SQLite file is opened and checked: integrity, rows, markers of answered
requests that have a row, rows whose answer never reached the client.

    flock /tmp/tunekit-cpu.lock .venv/bin/python benchmarks/privacy/kill9.py --out runs/privacy-kill9
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

KEY = "sk-kill9"
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


def start(model: Path, log: str, db: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "TUNEKIT_API_KEYS": KEY, "TUNEKIT_CACHE": str(db.parent / "cache")}
    cmd = [sys.executable, "-m", "tunekit.cli", "serve", "--model", str(model), "--port", str(port), "--dtype",
           "float32", "--threads", "1", "--log", log, "--log-db", f"sqlite:///{db}", "--max-queue", "1024"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(db.with_suffix(".log"), "w"))
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start; see {db.with_suffix('.log')}")


async def load(port: int, seconds: float, concurrency: int, answered: list, model: str, kill=None):
    import httpx

    stop_at = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def worker(client):
        while time.monotonic() < stop_at:
            i = next(counter)
            body = {"model": model, "messages": [{"role": "user", "content": f"req-{i:07d} {PII}"}], "max_tokens": 4,
                    "temperature": 0}
            try:
                r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                      headers={"Authorization": f"Bearer {KEY}", "X-User-Id": f"user-{i % 50}"})
                if r.status_code == 200:
                    answered.append(i)
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/privacy-kill9")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--json", default="docs/privacy-kill9.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(out / "tiny-model")
    results = {"throughput": {}}
    for mode in ("off", "metadata", "redacted"):
        db = out / f"tput-{mode}.db"
        db.unlink(missing_ok=True)
        port = free_port()
        proc = start(model, mode, db, port)
        global_model = model_name(port)
        answered: list = []
        asyncio.run(load(port, args.seconds, args.concurrency, answered, global_model))
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        rows = sqlite3.connect(db).execute("select count(*) from request_log").fetchone()[0] if mode != "off" else 0
        results["throughput"][mode] = {"answered": len(answered), "req_per_s": len(answered) / args.seconds,
                                       "rows_after_clean_shutdown": rows}
        print(mode, results["throughput"][mode], flush=True)
    db = out / "kill9.db"
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        p.unlink(missing_ok=True)
    port = free_port()
    proc = start(model, "redacted", db, port)
    name = model_name(port)
    answered: list = []
    killed_at = {}

    def kill():
        killed_at["answered"] = len(answered)
        os.kill(proc.pid, signal.SIGKILL)

    asyncio.run(load(port, args.seconds, args.concurrency, answered, name, kill))
    proc.wait(30)
    con = sqlite3.connect(db)
    integrity = con.execute("pragma integrity_check").fetchone()[0]
    prompts = [r[0] for r in con.execute("select prompt from request_log")]
    logged = {int(p.split("req-")[1][:7]) for p in prompts if p and "req-" in p}
    ans = set(answered)
    leaked = sum(any(v in (p or "") for v in ("jan.devries@example.nl", "NL91ABNA0417164300", "12345678"))
                 for p in prompts)
    results["kill9"] = {"answered_before_kill": len(ans), "rows": len(prompts), "integrity_check": integrity,
                        "answered_with_row": len(ans & logged), "answered_without_row": len(ans - logged),
                        "rows_not_answered": len(logged - ans), "rows_with_raw_pii": leaked,
                        "concurrency": args.concurrency, "seconds": args.seconds}
    print("kill9", results["kill9"], flush=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
