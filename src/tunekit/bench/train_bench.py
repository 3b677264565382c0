"""Training speed benchmark: tunekit against the transformers Trainer + peft recipe and TRL's SFTTrainer.

    tunekit bench train [--steps 30] [--ablations] [--out runs/bench]
    tunekit bench train --device cuda --model random:llama-3.2-1b     (GPU: a 1.2B Llama with random weights)
    python benchmarks/train_bench.py ...           (the same)

One run, one machine, the same model, data, LoRA (r=8, alpha=16, q_proj/v_proj, dropout 0.05), learning rate
and token budget. Every tool runs in its own process (so peak RSS is its own, measured by wait4), one after
the other. tunekit runs under the malloc `tunekit train` uses (tcmalloc when installed, tunekit/allocator.py), the
peers under the system's as their users run them; one more Trainer run under tunekit's malloc shows how much of
the difference is the allocator (`--no-peer-malloc` leaves it out). A matmul peak is measured in the same run
for MFU (bf16 only where the device computes it natively; elsewhere MFU is against the fp32 peak, and the table
says so). Eval loss is computed afterwards for every adapter by one shared scorer (fp32, completion tokens of
held-out examples). On CUDA the memory column is each run's torch.cuda.max_memory_allocated (RSS is kept in the
JSON), the matmul peak is an 8192^3 product, and one more Trainer run uses bf16 autocast (`--trainer-bf16`; the
fp32 recipe stays the reference). Writes bench.json, bench.md and bench.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEERS = ["trainer", "trl", "tunekit"]
# Leave-one-out ablation: each variant turns one optimisation of the full engine off.
ABLATIONS = {
    "packing": ("tunekit -packing (padded batches)", {"overrides": {"data.packing": False}}),
    "label-only": ("tunekit -label-only logits", {"full_logits": True}),
    "bf16": ("tunekit -bf16 (fp32)", {"overrides": {"train.precision": "fp32"}}),
    "attention": ("tunekit -per-sequence attention (sdpa mask)", {"overrides": {"model.attn_implementation": "sdpa"}}),
    "fused-lora": ("tunekit -fused LoRA branch (peft's forward)", {"overrides": {"train.fused_lora": False}}),
    "fused-adamw": ("tunekit -fused AdamW", {"unfused_adamw": True}),
    "fused-ops": ("tunekit -fused element-wise ops (eager norm, SiLU, RoPE)", {"overrides": {"train.fused_ops": "off"}}),
    "packed-weights": ("tunekit -packed weights (F.linear)", {"overrides": {"train.packed_weights": False}}),
    "malloc": ("tunekit +malloc tuning (keep freed memory)", {"env": {"TUNEKIT_MALLOC_TUNING": "1"}}),
    "compile": ("tunekit +torch.compile", {"overrides": {"train.compile": "on"}}),
    "tcmalloc": ("tunekit -tcmalloc/jemalloc (system malloc)", {"env": {"TUNEKIT_MALLOC": "system"}}),
}
LABELS = {"trainer": "Trainer + peft (fp32, padded)", "trl": "TRL SFTTrainer (bf16, packing)", "tunekit": "tunekit"}
TRAINER_BF16 = "Trainer + peft (bf16 autocast, padded)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tunekit bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="Base model (default: the packaged SmolLM2-135M; random:<config or preset> for random weights "
                        "of a given shape, e.g. random:llama-3.2-1b).")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="Where every run trains (default: CUDA when there is one).")
    p.add_argument("--trainer-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="Also run the Trainer recipe under bf16 autocast (default: on CUDA only).")
    p.add_argument("--steps", type=int, default=30, help="Optimizer steps for Trainer and tunekit (default 30).")
    p.add_argument("--warmup", type=int, default=3, help="Steps left out of the tokens/s figure (default 3).")
    p.add_argument("--batch-size", type=int, default=8, help="Examples per step (default 8).")
    p.add_argument("--seed", type=int, default=0, help="Seed of every run: weights init, dropout, data order "
                                                        "(default 0).")
    p.add_argument("--lr", type=float, default=5e-4, help="Constant learning rate for every tool (default 5e-4).")
    p.add_argument("--n-train", type=int, default=600, help="Training examples generated (default 600).")
    p.add_argument("--n-test", type=int, default=100, help="Held-out examples for the eval loss (default 100).")
    p.add_argument("--only", nargs="+", choices=PEERS, help="Run only these tools.")
    p.add_argument("--ablations", nargs="*", choices=list(ABLATIONS), default=None,
                   help="Also run leave-one-out ablations of tunekit (all when given without names).")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every run (default: torch's).")
    p.add_argument("--no-peer-malloc", action="store_true",
                   help="Leave out the Trainer run under tunekit's malloc (CPU; never run on CUDA).")
    p.add_argument("--out", default="runs/bench", help="Output folder (default runs/bench).")
    p.add_argument("--reuse", action="store_true",
                   help="Reuse runs of an earlier call in --out that finished with the same settings (an interrupted "
                        "benchmark continues where it stopped).")
    return p.parse_args(argv)


def mean_tokens(path: Path, model: str, max_length: int) -> tuple[float, float]:
    """(mean tokens per example, share of tokens with a loss) of the prepared training data."""
    from .runners import prepared

    _, examples = prepared({"model": model, "train": str(path), "max_length": max_length}, "train")
    n_tok = sum(len(ex.input_ids) for ex in examples)
    n_lab = sum(sum(1 for x in ex.labels[1:] if x != -100) for ex in examples)
    return n_tok / len(examples), n_lab / n_tok


def finished(spec: dict, out: Path) -> tuple[dict, int] | None:
    """(result, peak RSS) of a run in `out` that finished with exactly this spec, else None."""
    try:
        same = json.loads((out / "spec.json").read_text()) == json.loads(json.dumps(dict(spec, out=str(out))))
        if same:
            return json.loads((out / "result.json").read_text()), json.loads((out / "peak_rss.json").read_text())
    except (OSError, ValueError):
        pass
    return None


def run_child(spec: dict, out: Path) -> tuple[dict, int]:
    """Run one runner in a fresh process; returns (its result.json, its peak RSS in bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "peak_rss.json").unlink(missing_ok=True)
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(dict(spec, out=str(out)), indent=1))
    log = open(out / "log.txt", "w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", **spec.get("variant", {}).get("env", {}))
    env.update(malloc_env(spec, env))
    proc = subprocess.Popen([sys.executable, "-m", "tunekit.bench.runners", str(spec_path)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = (out / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"benchmark run {spec['runner']} failed (exit {proc.returncode}); log {out}/log.txt:\n{tail}")
    rss = usage.ru_maxrss * 1024  # bytes
    (out / "peak_rss.json").write_text(str(rss))
    return json.loads((out / "result.json").read_text()), rss


def malloc_env(spec: dict, env: dict) -> dict:
    """LD_PRELOAD for a child: tunekit's runs (and a peer run marked `tunekit_malloc`) get the allocator the
    `tunekit train` command would use (unless the variant sets TUNEKIT_MALLOC=system); other peers get nothing."""
    from ..allocator import ENV, preload, wanted

    if not (spec["runner"] == "tunekit" or spec.get("tunekit_malloc")) or env.get(ENV) == "system":
        return {}
    w = wanted()
    return {"LD_PRELOAD": preload(w[1], env)} if w else {}


def throughput(result: dict, warmup: int) -> dict:
    times, tokens = result["step_times"][warmup:], result["step_tokens"][warmup:]
    rates = [n / t for n, t in zip(tokens, times)]
    return {"tokens_per_s": sum(tokens) / sum(times), "median_step_tokens_per_s": statistics.median(rates),
            "timed_steps": len(times), "tokens_seen": sum(result["step_tokens"])}


def measure_peaks(threads: int | None, device: str = "cpu", shapes: dict | None = None) -> dict:
    """fp32 and bf16 matmul peaks, measured in a child like the runs (same thread count): an n^3 product at the
    size engine/flops.matmul_peak_size gives the device, and the model's own linear `shapes` ({(out, in): count},
    flops.measure_shape_peak) as fp32_shapes / bf16_shapes. bf16 is None (not measured) where the device has no
    native bf16: emulated, one 2048^3 product takes minutes (Zen 3) and its rate is no peak to measure MFU against."""
    import torch

    from ..engine.device import native_bf16

    bf16 = native_bf16(torch.device(device))
    pairs = [[o, i, c] for (o, i), c in (shapes or {}).items()]
    code = ("import json,torch,sys\nfrom tunekit.engine.flops import measure_matmul_peak, measure_shape_peak\n"
            f"torch.set_num_threads({threads}) if {threads!r} else None\n"
            f"shapes = {{(o, i): c for o, i, c in {pairs!r}}}\n"
            f"def shaped(dt): return measure_shape_peak(shapes, dt, {device!r}, seconds=3) if shapes else None\n"
            f"print(json.dumps({{'fp32': measure_matmul_peak(torch.float32, {device!r}, seconds=3),"
            f" 'bf16': measure_matmul_peak(torch.bfloat16, {device!r}, seconds=3) if {bf16} else None,"
            f" 'fp32_shapes': shaped(torch.float32), 'bf16_shapes': shaped(torch.bfloat16) if {bf16} else None}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mfu_peak(peak: dict) -> str:
    """Which peak the table's MFU column is against: bf16 where it was measured, else fp32."""
    return "bf16" if peak.get("bf16") else "fp32"


def gflops(rate: float | None) -> str:
    return "not measured" if rate is None else f"{rate / 1e9:.0f} GFLOP/s"


def model_flops(model: str, label_fraction: float, mean_len: float) -> tuple[float, dict]:
    """(model FLOPs per trained token for LoRA, {(out, in): count} of the decoder's linear shapes)."""
    from ..engine.flops import ModelShape, base_linear_weights, flops_per_token, linear_shapes
    from ..models import load_model

    base = load_model(model).requires_grad_(False)  # LoRA: every base weight frozen
    return (flops_per_token(ModelShape.from_model(base), label_fraction, mean_len),
            linear_shapes(base_linear_weights(base)))


def memory_label(device: str) -> str:
    return "peak CUDA alloc GiB" if device == "cuda" else "peak RSS GiB"


def format_markdown(rows: list[dict], meta: dict) -> str:
    from ..engine.flops import SHAPE_PEAK_TOKENS

    device = meta.get("device", "cpu")
    ref = mfu_peak(meta["peak"])
    shaped = bool(meta["peak"].get(f"{ref}_shapes"))
    head = (f"| run | malloc | tokens/s | x Trainer | {memory_label(device)} | x Trainer | eval loss | "
            f"MFU ({ref} peak) | " + (f"MFU ({ref}, model shapes) | " if shaped else "") + "tokens |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if shaped else "") + "---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['name']} | {r.get('malloc') or '-'} | {r['tokens_per_s']:.0f} | "
                     f"{r.get('speed_ratio', float('nan')):.2f} | "
                     f"{r.get('peak_memory_bytes', r['peak_rss_bytes']) / 2**30:.2f} | "
                     f"{r.get('memory_ratio', float('nan')):.2f} | "
                     f"{r['eval_loss']:.4f} | {100 * r[f'mfu_{ref}']:.1f}% | "
                     + (f"{100 * r[f'mfu_{ref}_shapes']:.1f}% | " if shaped else "") + f"{r['tokens_seen']:,} |")
    lines.append("")
    no_bf16 = ("" if meta["peak"].get("bf16") else
               f" (this {'GPU' if device == 'cuda' else 'CPU'} has no native bf16 matmul, it would be emulated; "
               "MFU is against the fp32 peak)")
    shapes_note = (f"; on the model's own linear shapes ({SHAPE_PEAK_TOKENS} rows each, engine/flops.py "
                   f"measure_shape_peak): fp32 {gflops(meta['peak'].get('fp32_shapes'))}, bf16 "
                   f"{gflops(meta['peak'].get('bf16_shapes'))}" if shaped else "")
    cpu = f" ({meta['cpu']}, {meta['isa']})" if meta.get("cpu") and device == "cpu" else ""
    lines.append(f"Device: {device}{cpu}. Matmul peak measured in this run ({meta.get('peak_n', 2048)}^3): fp32 "
                 f"{gflops(meta['peak']['fp32'])}, bf16 {gflops(meta['peak'].get('bf16'))}{shapes_note}{no_bf16}. "
                 f"{meta['formula']}; F/token here = "
                 f"{meta['flops_per_token'] / 1e6:.0f} MFLOP (mean example {meta['mean_len']:.0f} tokens, "
                 f"{100 * meta['label_fraction']:.0f}% with a loss). Base eval loss {meta['base_eval_loss']:.4f}. "
                 f"tokens/s = real (non-padding) tokens / time over steps after {meta['warmup']} warm-up steps.")
    planned = [f"{r['name']} {r['planned_peak_bytes'] / r['peak_memory_bytes'] - 1:+.0%}" for r in rows
               if r.get("planned_peak_bytes")]
    if planned:
        lines.append(f"tunekit plan's prediction against the measured peak: {', '.join(planned)}.")
    if meta.get("failed"):
        lines.append(f"Failed and left out (their log.txt says why): {', '.join(meta['failed'])}.")
    reused = [r["name"] for r in rows if r.get("reused")]
    if reused:
        lines.append(f"Reused from an earlier call with the same settings (--reuse): {', '.join(reused)}.")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str = "LoRA r=8 q/v on SmolLM2-135M, CPU: one benchmark run",
         device: str = "cpu") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib not installed: no PNG (pip install tunekit[bench])")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.55 * len(rows) + 1.8))
    names = [r["name"] for r in rows][::-1]
    for ax, key, label in [(axes[0], "tokens_per_s", "real tokens/s (higher is better)"),
                           (axes[1], "peak_memory_bytes", f"{memory_label(device)} (lower is better)")]:
        vals = [r.get(key, r["peak_rss_bytes"]) / (2**30 if key == "peak_memory_bytes" else 1) for r in rows][::-1]
        bars = ax.barh(names, vals, color=["#2b7bba" if n.startswith("tunekit") else "#999999" for n in names])
        ax.bar_label(bars, fmt="%.1f" if key == "peak_memory_bytes" else "%.0f", padding=3)
        ax.set_xlabel(label)
        ax.margins(x=0.15)
    axes[1].set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
    from ..demo.invoices import write_demo_dataset

    args = parse_args(argv)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tunekit bench train --device cuda: torch sees no CUDA device here")
    out = Path(args.out)
    paths = write_demo_dataset(out / "data", n_train=args.n_train, n_test=args.n_test)
    max_length = 512
    mean_len, label_fraction = mean_tokens(paths["train"], args.model, max_length)
    base = {"model": args.model, "train": str(paths["train"]), "test": str(paths["test"]), "max_length": max_length,
            "r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"], "lr": args.lr,
            "max_grad_norm": 1.0,  # the Trainer's and SFTTrainer's default clipping, for every tool
            "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "threads": args.threads,
            "device": device,
            # TRL packs rows of ~batch_size examples and stops at the same token budget as the others.
            "trl_row_tokens": int(-(-args.batch_size * mean_len // 64) * 64),
            "token_budget": int(args.steps * args.batch_size * mean_len)}
    print(f"[bench] data: {args.n_train} examples, mean {mean_len:.0f} tokens, {100 * label_fraction:.0f}% with a "
          f"loss; {args.steps} steps x {args.batch_size} examples", flush=True)
    flops, shapes = model_flops(args.model, label_fraction, mean_len)
    peak = measure_peaks(args.threads, device, shapes)
    print(f"[bench] matmul peak: fp32 {gflops(peak['fp32'])}, bf16 {gflops(peak['bf16'])}; the model's linear "
          f"shapes: fp32 {gflops(peak['fp32_shapes'])}, bf16 {gflops(peak['bf16_shapes'])}"
          + ("" if peak["bf16"] else " (no native bf16 here: emulated, so not timed)"), flush=True)
    runs = [(LABELS[p], dict(base, runner=p)) for p in (args.only or PEERS)]
    from ..allocator import wanted

    malloc = wanted()
    if malloc and not args.no_peer_malloc and device == "cpu" and "trainer" in (args.only or PEERS):
        runs.insert(1, (f"{LABELS['trainer']} under {malloc[0]}", dict(base, runner="trainer", tunekit_malloc=True)))
    trainer_bf16 = args.trainer_bf16 if args.trainer_bf16 is not None else device == "cuda"
    if trainer_bf16 and "trainer" in (args.only or PEERS):
        runs.insert(1, (TRAINER_BF16, dict(base, runner="trainer", trainer_bf16=True)))
    if args.ablations is not None:
        runs += [(ABLATIONS[k][0], dict(base, runner="tunekit", variant=ABLATIONS[k][1]))
                 for k in (args.ablations or ABLATIONS)]
    rows, failed = [], []
    for i, (name, spec) in enumerate(runs):
        print(f"[bench] {i + 1}/{len(runs)} {name} ...", flush=True)
        t = time.perf_counter()
        done = finished(spec, out / f"run{i}") if args.reuse else None
        try:
            result, rss = done or run_child(spec, out / f"run{i}")
        except RuntimeError as e:  # one broken run must not cost the others' results
            print(f"[bench]   FAILED, left out of the table: {e}", flush=True)
            failed.append(name)
            continue
        row = {"name": name, "runner": spec["runner"], "peak_rss_bytes": rss, "precision": result["precision"],
               "peak_memory_bytes": result.get("cuda_peak_bytes", rss),
               "planned_peak_bytes": result.get("planned_peak_bytes"),
               "malloc": result.get("malloc"), "reused": bool(done),
               "wall_s": time.perf_counter() - t, "adapter": str(out / f"run{i}" / "adapter"),
               **throughput(result, args.warmup)}
        print(f"[bench]   {row['tokens_per_s']:.0f} tokens/s, {memory_label(device)} "
              f"{row['peak_memory_bytes'] / 2**30:.2f}, "
              f"malloc {row['malloc']}, {row['tokens_seen']:,} tokens"
              + (" (reused)" if done else f" in {row['wall_s']:.0f} s"), flush=True)
        rows.append(row)
    if not rows:
        raise RuntimeError(f"every benchmark run failed: {', '.join(failed)}")

    print("[bench] scoring every adapter with the shared eval ...", flush=True)
    adapters = {r["name"]: r["adapter"] for r in rows}
    scored, _ = run_child(dict(base, runner="eval", adapters=adapters), out / "eval")
    ref = next((r for r in rows if r["name"] == LABELS["trainer"]), None)  # the fp32 recipe, system malloc
    for r in rows:
        r["eval_loss"] = scored["eval_loss"][r["name"]]
        # None against a peak that was not measured (bf16 where it is emulated)
        mfu = {k: r["tokens_per_s"] * flops / v if v else None for k, v in peak.items()}
        r["mfu_fp32"], r["mfu_bf16"] = mfu["fp32"], mfu["bf16"]
        r["mfu_fp32_shapes"], r["mfu_bf16_shapes"] = mfu.get("fp32_shapes"), mfu.get("bf16_shapes")
        own = "bf16" if r["precision"] == "bf16" else "fp32"
        r["mfu_own_precision"], r["mfu_own_precision_shapes"] = mfu[own], mfu.get(f"{own}_shapes")
        if ref:
            r["speed_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["memory_ratio"] = r["peak_memory_bytes"] / ref["peak_memory_bytes"]
    from ..engine.device import cpu_name, isa_label
    from ..engine.flops import FORMULA, matmul_peak_size

    meta = {"peak": peak, "formula": FORMULA, "flops_per_token": flops, "mean_len": mean_len,
            "label_fraction": label_fraction, "warmup": args.warmup, "steps": args.steps,
            "base_eval_loss": scored["base_eval_loss"], "args": vars(args), "failed": failed, "device": device,
            "peak_n": matmul_peak_size(device), "mfu_peak": mfu_peak(peak), "cpu": cpu_name(), "isa": isa_label()}
    table = format_markdown(rows, meta)
    print("\n" + table + "\n", flush=True)
    (out / "bench.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=2))
    (out / "bench.md").write_text(table + "\n")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    plot(rows, out / "bench.png", f"LoRA r=8 q/v on {args.model}, {where}: one benchmark run", device)
    print(f"[bench] wrote {out}/bench.json, bench.md, bench.png", flush=True)
    return rows


if __name__ == "__main__":
    main()
