"""`vllm serve` answering with a `tunekit export --format vllm` folder (vLLM CPU in .vllm-venv).

    python benchmarks/export/vllm_serve_check.py [--adapter runs/demo/lora] [--n 20] [--out docs/export-vllm.json]

Exports the adapter for vLLM (vLLM's own PEFTHelper check included), starts vLLM's OpenAI server with the README's
--enable-lora --max-lora-rank --lora-modules line, asks it the demo's first n test invoices by the adapter's name
(greedy, 96 tokens) with the official openai client, and scores the answers; the same prompts through tunekit's
engine (same dtype) give the reference. Needs benchmarks/serve/install_vllm.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from openai import OpenAI

    from tunekit.bench.serve_quality import generate_all
    from tunekit.demo.invoices import write_demo_dataset
    from tunekit.demo.scoring import score_predictions
    from tunekit.engine.device import cpu_name, isa_label
    from tunekit.export import export
    from tunekit.serve.engine import Engine, ServeOptions, serving_dtype

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default="runs/demo/lora")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--out", default="docs/export-vllm.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tunekit-vllm-check-"))
    card = export(args.adapter, "vllm", str(work / "vllm"))
    print(f"exported: {card['serve_command']}\nvLLM check: {card['verification']}", flush=True)
    test = write_demo_dataset(work / "data", n_test=args.n)["test"]
    records = [json.loads(line) for line in Path(test).read_text().splitlines()][: args.n]
    convs, refs = [r["messages"][:1] for r in records], [r["messages"][1]["content"] for r in records]

    dtype = str(serving_dtype("auto")).replace("torch.", "")
    port = free_port()
    served = json.loads((work / "vllm" / "adapter_config.json").read_text())["base_model_name_or_path"]
    cmd = [str(ROOT / ".vllm-venv/bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", served,
           "--port", str(port), "--dtype", dtype, "--max-model-len", "2048", "--enable-lora",
           "--max-lora-rank", str(card["max_lora_rank"]), "--lora-modules", f"demo={work / 'vllm'}"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_TARGET_DEVICE": "cpu", "VLLM_LOGGING_LEVEL": "WARNING"}
    log = open(work / "vllm.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                sys.exit(f"vLLM exited: see {work / 'vllm.log'}")
            try:
                models = [m.id for m in client.models.list().data]
                break
            except Exception:
                time.sleep(2)
        start_s = time.time() - t0
        answers = [client.chat.completions.create(model="demo", messages=c, max_tokens=96, temperature=0)
                   .choices[0].message.content for c in convs]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    engine = Engine(ServeOptions(model=served, dtype=dtype))
    engine.load_adapter("demo", args.adapter)
    ours, _, _ = generate_all(engine, convs, "demo", None, max_tokens=96)
    result = {"cpu": cpu_name(), "isa": isa_label(), "dtype": dtype, "n": args.n, "models": models,
              "vllm_start_s": round(start_s, 1), "serve_command": card["serve_command"],
              "vllm_check": card["verification"], "vllm": score_predictions(answers, refs),
              "tunekit": score_predictions(ours, refs), "identical_answers": sum(a == b for a, b in zip(answers, ours))}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("models", "vllm_start_s", "identical_answers")}), flush=True)
    print("vLLM exact match", result["vllm"]["exact_match"], "tunekit", result["tunekit"]["exact_match"])


if __name__ == "__main__":
    main()
