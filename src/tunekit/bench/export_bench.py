"""What export costs in quality and what it buys in speed, on the demo task, in llama.cpp and in tunekit.

    tunekit bench export [--adapter runs/demo/lora] [--quants f16 q8_0 q4_k_m q4_0] [--n 100] [--speed-n 10]

For the demo adapter merged into its base: the fp32 PyTorch model (served by tunekit's engine in fp32 and in the
CPU's fast dtype) and GGUF files of it (tunekit export), run by llama.cpp (the xllamacpp wheel). Per variant:
exact match and JSON validity on the demo's test invoices (greedy, the demo's 96 new tokens), perplexity of the
reference answers (teacher-forced; for a GGUF computed in PyTorch on the weights transformers dequantizes from the
file: the values llama.cpp multiplies by), llama.cpp's top-1 agreement with fp32 PyTorch on the export probes,
file size, and single-stream speed (one request at a time, wall clock from submit to last token, prefill included,
the same prompts for every variant). Writes export-quality.json, .md and .png into --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import tempfile
import time
from pathlib import Path

import torch

MAX_NEW_TOKENS = 96  # the demo's budget (demo/pipeline.py)


def answer_perplexity(model, tokenizer, records) -> float:
    """exp(mean NLL) of the reference answers' tokens given their prompts (teacher-forced)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for rec in records:
            prompt = tokenizer.apply_chat_template(rec["messages"][:1], add_generation_prompt=True, tokenize=False)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tokenizer(rec["messages"][1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + a_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p_ids) - 1: -1].float(), -1)
            nll -= float(logp.gather(1, torch.tensor(a_ids)[:, None]).sum())
            count += len(a_ids)
    return math.exp(nll / count)


def llamacpp_outputs(path: str, convs, threads: int, parallel: int = 4) -> list[str]:
    from ..export.llamacpp import LlamaCpp

    with LlamaCpp(path, threads=threads, parallel=parallel, n_ctx=1024) as llm:
        def one(conv):
            out = llm.chat(conv, MAX_NEW_TOKENS)
            return out["choices"][0]["message"]["content"]

        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(one, convs))


def llamacpp_speed(path: str, convs, threads: int) -> float:
    """Generated tokens / wall seconds, one request at a time."""
    from ..export.llamacpp import LlamaCpp

    with LlamaCpp(path, threads=threads, n_ctx=1024) as llm:
        llm.chat(convs[0], 8)  # warm-up
        tokens, wall = 0, 0.0
        for conv in convs:
            t = time.perf_counter()
            out = llm.chat(conv, MAX_NEW_TOKENS)
            wall += time.perf_counter() - t
            tokens += out["usage"]["completion_tokens"]
    return tokens / wall


def engine_run(model_dir: str, dtype: str, convs, speed_convs, threads: int) -> tuple[list[str], float]:
    """tunekit's serving engine: outputs for convs (batched), then single-stream tokens/s on speed_convs."""
    from ..serve.engine import Engine, ServeOptions
    from .serve_quality import generate_all

    engine = Engine(ServeOptions(model=model_dir, dtype=dtype, threads=threads))
    texts, _, _ = generate_all(engine, convs, None, None, max_tokens=MAX_NEW_TOKENS)
    generate_all(engine, speed_convs[:1], None, None, max_tokens=8)  # warm-up
    tokens, wall = 0, 0.0
    for conv in speed_convs:
        _, n, seconds = generate_all(engine, [conv], None, None, max_tokens=MAX_NEW_TOKENS)
        tokens, wall = tokens + n, wall + seconds
    return texts, tokens / wall


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> dict:
    from ..demo.invoices import write_demo_dataset
    from ..demo.scoring import score_predictions
    from ..engine.device import cpu_name, isa_label
    from ..export import export
    from ..export.verify import compare_llamacpp

    ap = argparse.ArgumentParser(prog="tunekit bench export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default="runs/demo/lora", help="run folder to export (default: make demo's)")
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m", "q4_0"])
    ap.add_argument("--n", type=int, default=100, help="test invoices scored")
    ap.add_argument("--speed-n", type=int, default=10, help="requests timed one at a time per variant")
    ap.add_argument("--threads", type=int, default=None, help="threads for both engines (default: all cores)")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args(argv)
    import os

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="tunekit-export-bench-"))
    test = write_demo_dataset(work / "data", n_test=args.n)["test"]
    records = [json.loads(line) for line in Path(test).read_text().splitlines()][: args.n]
    convs = [r["messages"][:1] for r in records]
    refs = [r["messages"][1]["content"] for r in records]
    speed_convs = convs[: args.speed_n]

    rows = []
    print(f"[bench export] hf fp32 export of {args.adapter}", flush=True)
    hf = export(args.adapter, "hf", str(work / "hf"), threads=threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    reference = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    ppl_ref = answer_perplexity(reference, tokenizer, records)
    for dtype in ("float32", "auto"):
        label = "fp32" if dtype == "float32" else ("bf16" if isa_label() == "avx512_bf16" else "fp32 (auto)")
        print(f"[bench export] tunekit engine {label}: {args.n} invoices + {args.speed_n} timed", flush=True)
        texts, tps = engine_run(str(work / "hf"), dtype, convs, speed_convs, threads)
        score = score_predictions(texts, refs)
        rows.append({"variant": f"tunekit serve, {label} (hf export, fp32 safetensors)", "engine": "tunekit",
                     "file": "hf",
                     "bytes": folder_bytes(work / "hf"), "exact_match": score["exact_match"],
                     "json_valid": score["json_valid"], "perplexity": ppl_ref if dtype == "float32" else None,
                     "top1_vs_fp32": 1.0 if dtype == "float32" else None, "tokens_per_s": tps})
    for quant in args.quants:
        print(f"[bench export] gguf {quant}: export, perplexity, {args.n} invoices in llama.cpp, speed", flush=True)
        card = export(args.adapter, "gguf", str(work / f"gguf-{quant}"), quant=quant, verify=False, threads=threads)
        path = work / f"gguf-{quant}" / card["gguf"]
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=torch.float32).eval()
        ppl = answer_perplexity(loaded, tokenizer, records)
        del loaded
        agreement = compare_llamacpp(str(path), reference, tokenizer, threads=threads)
        texts = llamacpp_outputs(str(path), convs, threads)
        score = score_predictions(texts, refs)
        rows.append({"variant": f"llama.cpp, GGUF {quant}", "engine": "llama.cpp", "file": quant,
                     "tensor_types": card["tensor_types"], "bytes": path.stat().st_size,
                     "exact_match": score["exact_match"], "json_valid": score["json_valid"], "perplexity": ppl,
                     "top1_vs_fp32": agreement.top1_agreement, "tokens_per_s": llamacpp_speed(str(path), speed_convs,
                                                                                              threads)})
    import xllamacpp

    result = {"cpu": cpu_name(), "isa": isa_label(), "threads": threads, "n": args.n, "speed_n": args.speed_n,
              "adapter": args.adapter, "max_new_tokens": MAX_NEW_TOKENS, "xllamacpp": xllamacpp.__version__,
              "llama_cpp_build": xllamacpp.get_system_info().strip(), "rows": rows}
    write(result, Path(args.out))
    return result


def table(result: dict) -> str:
    lines = ["| variant | size | exact match | JSON valid | answer perplexity | top-1 vs fp32 | tokens/s (1 stream) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ppl = f"{r['perplexity']:.4f}" if r["perplexity"] is not None else "–"
        top1 = f"{r['top1_vs_fp32']:.1%}" if r["top1_vs_fp32"] is not None else "–"
        lines.append(f"| {r['variant']} | {r['bytes'] / 1e6:.0f} MB | {r['exact_match']:.1%} | {r['json_valid']:.1%} | "
                     f"{ppl} | {top1} | {r['tokens_per_s']:.1f} |")
    return "\n".join(lines)


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "export-quality.json").write_text(json.dumps(result, indent=2) + "\n")
    text = (f"# Export quality and speed (tunekit bench export)\n\n{result['cpu']} ({result['isa']}), "
            f"{result['threads']} threads; {result['n']} demo test invoices, greedy, {result['max_new_tokens']} new "
            f"tokens; speed: {result['speed_n']} requests one at a time; llama.cpp from xllamacpp "
            f"{result['xllamacpp']} ({result['llama_cpp_build']}).\n\n{table(result)}\n")
    (out / "export-quality.md").write_text(text)
    print(text, flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["variant"].replace(", ", "\n") for r in rows]
    a.barh(names, [100 * r["exact_match"] for r in rows], color="#4c72b0")
    a.set_xlabel("exact match on the demo test set (%)")
    a.invert_yaxis()
    b.barh(names, [r["tokens_per_s"] for r in rows], color="#dd8452")
    b.set_xlabel("tokens/s, one stream")
    b.invert_yaxis()
    b.set_yticklabels([])
    fig.suptitle(f"tunekit export: quality and speed ({result['cpu']}, {result['isa']})")
    fig.tight_layout()
    fig.savefig(out / "export-quality.png", dpi=120)
