"""The `tunekit` command. Each subcommand is a thin layer over a function in tunekit.api."""

from __future__ import annotations

import argparse
import os
import sys

from .config import OPTIMIZERS, Config, ConfigError, config_to_yaml, describe_fields, load_config, parse_value

TRAIN_USAGE = """usage: tunekit train [--config FILE.yaml] [--section.key VALUE ...] [--resume] [--print-config] [--nproc N]

Fine-tune a model. Values come from the defaults, then the YAML file, then flags (`--method.r 8`,
`--train.max_steps=100`, `--method.target_modules '[q_proj, v_proj]'`; values are parsed as YAML).
`--method NAME` picks the method (see --method.name below). `--resume` continues from the last checkpoint
in train.output_dir. `--nproc N` trains on N processes of this machine through torchrun (DDP, or FSDP2 with
--train.parallel fsdp; the same as `torchrun --nproc-per-node N -m tunekit.cli train ...`; docs/scale-out.md).

options:
"""

ALIASES = {"resume": ("train.resume", True), "output": ("train.output_dir", None), "model": ("model.name", None),
           "data": ("data.train", None), "method": ("method.name", None)}


def train_help(usage: str = TRAIN_USAGE) -> str:
    rows = describe_fields(Config)
    width = max(len(k) for k, _, _ in rows) + 2
    lines = [f"  --{k:<{width}} {desc} [default: {default}]" for k, default, desc in rows]
    return usage + "\n".join(lines) + "\n"


def parse_train_argv(argv: list[str]) -> tuple[str | None, dict, bool]:
    """(config path, {dotted key: value}, print_config) from `tunekit train` arguments."""
    config_path, overrides, print_config = None, {}, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_") if "." not in key else ".".join(p.replace("-", "_") for p in key.split("."))
        takes_value = eq or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
        if not eq and takes_value:
            value, i = argv[i + 1], i + 1
        i += 1
        if key == "config":
            config_path = value
        elif key == "print_config":
            print_config = True
        elif key in ALIASES:
            target, implicit = ALIASES[key]
            overrides[target] = parse_value(value) if takes_value else implicit
        elif "." in key:
            overrides[key] = parse_value(value) if takes_value else True
        else:
            raise ConfigError(f"unknown option --{key}; options are --config, --print-config, --resume, and "
                              f"--section.key for sections {', '.join(Config.model_fields)} (see tunekit train --help)")
    return config_path, overrides, print_config


def key_values(items: list[str], where: str) -> dict:
    """['method.fraction=0.05', ...] -> {'method.fraction': 0.05}, values parsed like train flags."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise ConfigError(f"{where} takes SECTION.KEY=VALUE (e.g. method.fraction=0.05), got {item!r}")
        out[key] = parse_value(value)
    return out


DISTILL_USAGE = """usage: tunekit distill --config FILE.yaml [--section.key VALUE ...] [--resume] [--print-config]

Distil a teacher into a student: the run's model is the student, trained with its method (full, lora, ...), and
the distill section names the teacher and the mode (offline, logit, on-policy). Options as for `tunekit train`;
the distill.* keys are listed below with the rest.

options:
"""


def cmd_train(argv: list[str], command: str = "train") -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(train_help(TRAIN_USAGE if command == "train" else DISTILL_USAGE))
        return 0
    nproc = None
    if any(a == "--nproc" or a.startswith("--nproc=") for a in argv):
        from .distributed.launch import pop_nproc

        argv, nproc = pop_nproc(argv)
    path, overrides, print_config = parse_train_argv(argv)
    cfg = load_config(path, overrides)
    if print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    if nproc and nproc > 1:
        from .distributed.launch import launch

        return launch(command, argv, nproc, cfg)
    from .api import distill, train

    result = train(cfg) if command == "train" else distill(cfg)
    print(f"run folder: {result.run_dir}  (eval loss {result.eval_loss_before} -> {result.eval_loss_after})")
    return 130 if result.interrupted else 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="base model (alias, folder, .gguf or hub id)")
    p.add_argument("--adapter", default=None, help="a tunekit run folder or PEFT adapter folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="inference dtype; auto = bf16 where the device has native bf16, else fp32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunekit", description="Fine-tune, evaluate and try open LLMs locally.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="fine-tune a model (see `tunekit train --help`)", add_help=False)
    sub.add_parser("distill", help="distil a teacher into a student: offline, logit KD or on-policy (see "
                   "`tunekit distill --help`)", add_help=False)
    sh = sub.add_parser("shrink", help="make a student from a model by keeping a subset of its decoder layers")
    sh.add_argument("--model", default="smollm2-135m", help="the teacher (alias, folder, .gguf or hub id)")
    sh.add_argument("--adapter", default=None, help="run folder / PEFT adapter merged into the teacher first")
    sh.add_argument("--every", type=int, default=None, help="keep round(L/N) layers spread evenly, first and last "
                    "included (3: a third of the layers)")
    sh.add_argument("--layers", default=None, help="explicit layer indices to keep, e.g. 0,5,10,-1")
    sh.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sh.add_argument("--out", required=True, help="folder for the student (transformers model + tokenizer)")
    sub.add_parser("bench", help="`tunekit bench train` (training speed vs the Trainer recipe and TRL), `tunekit bench serve` (serving vs sequential peft), `tunekit bench export` (GGUF quality and speed in llama.cpp)", add_help=False)

    g = sub.add_parser("generate", help="generate a reply for one prompt or a JSONL of conversations")
    _add_model_args(g)
    g.add_argument("--prompt", help="user message")
    g.add_argument("--system", help="system message")
    g.add_argument("--input", help="JSONL/JSON/CSV of chat records; the reply to each is printed as JSONL")

    c = sub.add_parser("chat", help="chat with a model in the terminal")
    _add_model_args(c)
    c.add_argument("--system", help="system message")
    c.set_defaults(temperature=0.7)

    e = sub.add_parser("eval", help="generate on a test file and score exact match / JSON validity")
    _add_model_args(e)
    e.add_argument("--data", required=True, help="test file; the last assistant turn of each record is the answer")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--limit", type=int, default=None, help="score only the first N records")
    e.add_argument("--output", help="write predictions as JSONL here")

    m = sub.add_parser("merge", help="fold an adapter into its base model: a plain transformers model folder")
    m.add_argument("--adapter", required=True, help="a tunekit run folder or PEFT adapter folder")
    m.add_argument("--out", required=True, help="folder for the merged model (safetensors + tokenizer + config)")
    m.add_argument("--model", default=None, help="base model (default: the one the run was trained on)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the merged weights (the merge itself is computed in fp32)")
    m.add_argument("--device", default="cpu")

    a = sub.add_parser("adapters", help="several adapters on one base: `tunekit adapters combine ...`")
    a_sub = a.add_subparsers(dest="adapters_command", metavar="SUBCOMMAND", required=True)
    ac = a_sub.add_parser("combine", help="combine adapters (linear, cat, svd, ties, dare_*) into a new PEFT adapter")
    ac.add_argument("--base", default="smollm2-135m", help="base model the adapters were trained on")
    ac.add_argument("--adapter", action="append", required=True, metavar="NAME=PATH",
                    help="an adapter folder under a name; repeat for each adapter")
    ac.add_argument("--how", default="linear", help="combination: linear, cat, svd, ties, ties_svd, dare_linear, "
                    "dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd")
    ac.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per adapter (default: equal)")
    ac.add_argument("--density", type=float, default=None, help="share of entries kept (ties, dare, magnitude_prune)")
    ac.add_argument("--svd-rank", type=int, default=None, help="rank of the result for *_svd (default: max rank)")
    ac.add_argument("--out", required=True, help="folder for the combined PEFT adapter")
    ac.add_argument("--device", default="cpu")

    pl = sub.add_parser("plan", help="predict the peak memory of a training run from the model config alone")
    pl.add_argument("--model", default="smollm2-135m",
                    help="config.json, model folder, preset (configs/models: llama-3.2-1b, llama-3.1-8b, llama-3.1-70b) "
                         "or packaged alias")
    pl.add_argument("--method", default="lora", help="lora, qlora, dora, full, freeze, select, ia3, bitfit, prefix, "
                                                     "prompt, ptuning, adapter")
    pl.add_argument("--seq-len", type=int, default=512, help="mean tokens per training example")
    pl.add_argument("--batch", type=int, default=8, help="examples per micro-batch (train.batch_size)")
    pl.add_argument("--rank", type=int, default=16, help="LoRA rank")
    pl.add_argument("--target", default="all-linear", help="LoRA/BitFit targets: all-linear, attention, mlp")
    pl.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="auto (default: what tunekit train picks here, bf16 where the CPU/GPU computes it natively), "
                         "bf16 or fp32")
    pl.add_argument("--device", default="cpu", help="cpu or cuda")
    pl.add_argument("--label-fraction", type=float, default=0.5, help="share of tokens with a loss")
    pl.add_argument("--virtual-tokens", type=int, default=20, help="prefix/prompt/ptuning virtual tokens")
    pl.add_argument("--bottleneck", type=int, default=64, help="bottleneck adapter width")
    pl.add_argument("--freeze-layers", type=int, default=1, help="freeze: how many decoder layers train")
    pl.add_argument("--fraction", type=float, default=0.1, help="select: budget as a share of all groups' cost")
    pl.add_argument("--max-params", type=int, default=None, help="select: budget in trainable parameters")
    pl.add_argument("--select-rank", type=int, default=None, help="select: LoRA rank on the selected modules "
                                                                  "(default: full rank)")
    pl.add_argument("--malloc", default=None, choices=["tcmalloc", "jemalloc", "glibc"],
                    help="CPU: the malloc to plan for (default: the one tunekit train would use here)")
    pl.add_argument("--optim", default="adamw", choices=OPTIMIZERS, help="optimizer (optim.name)")
    pl.add_argument("--dropout", type=float, default=0.0, help="LoRA input dropout (method.dropout)")
    pl.add_argument("--no-fused-ops", action="store_true", help="plan for train.fused_ops off")
    pl.add_argument("--no-packed-weights", action="store_true", help="plan for train.packed_weights false")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    cp = sub.add_parser("compare", help="train every method on the demo task with one budget; Markdown + PNG table")
    cp.add_argument("--methods", nargs="+", default=None, help="methods to compare (default: all)")
    cp.add_argument("--model", default="smollm2-135m")
    cp.add_argument("--steps", type=int, default=40, help="optimizer steps per method")
    cp.add_argument("--n-train", type=int, default=1200, help="demo training examples")
    cp.add_argument("--n-test", type=int, default=50, help="test examples for exact match")
    cp.add_argument("--batch-size", type=int, default=8)
    cp.add_argument("--device", default="auto")
    cp.add_argument("--out", default="runs/compare", help="folder for runs, compare.md, compare.json, compare.png")
    cp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every method, e.g. --set method.fraction=0.05 (repeatable)")

    sv = sub.add_parser("serve", help="an OpenAI-compatible server: one base model, many adapters in one batch")
    sv.add_argument("--model", default="smollm2-135m", help="the base model (alias, folder, .gguf or hub id)")
    sv.add_argument("--adapters", default=None, help="folder whose subfolders (run folders / PEFT adapters) are "
                    "loaded at start, each named by its folder")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-keys", default=None, help="YAML/JSON key file (see docs/serving.md); also "
                    "TUNEKIT_API_KEYS / TUNEKIT_ADMIN_KEYS. Without any, keys are generated and printed")
    sv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bf16 where the CPU computes it natively (AVX512-BF16/AMX), else float32")
    sv.add_argument("--quantize", default=None, choices=["int8"], help="weight-only int8 linears")
    sv.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoding at once (KV-cache slots)")
    sv.add_argument("--max-model-len", type=int, default=2048, help="prompt + output tokens per sequence")
    sv.add_argument("--max-batched-tokens", type=int, default=256, help="tokens per engine step (chunked prefill)")
    sv.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 503")
    sv.add_argument("--max-adapters", type=int, default=16, help="adapters held at once (LRU; pinned ones stay)")
    sv.add_argument("--pin", action="append", default=[], help="adapter name never evicted (repeatable)")
    sv.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    sv.add_argument("--embedding-model", default=None, help="sentence-transformers folder for /v1/embeddings "
                    "(default: the packaged all-MiniLM-L6-v2)")
    sv.add_argument("--rag-store", default=None, help="RAG store for chat completions with \"rag\" and "
                    "/v1/rag/search: a folder, faiss:///path[?index=hnsw] or postgresql://... (default "
                    "$TUNEKIT_RAG_STORE, else $TUNEKIT_CACHE/rag); checked at start")
    sv.add_argument("--threads", type=int, default=None, help="torch threads for the engine (default: all cores)")
    sv.add_argument("--print-vllm", action="store_true", help="print the `vllm serve` command for the same base "
                    "and adapters (for a GPU machine) and exit")
    sv.add_argument("--log", default="metadata", choices=["off", "metadata", "redacted", "full"],
                    help="request log: metadata (time, key, user pseudonym, model, tokens, latency, status), redacted "
                    "(+ prompt and answer with personal data replaced), full (as sent; needs --log-full-consent), off")
    sv.add_argument("--log-db", default=None, help="log store URL: sqlite:///PATH or postgresql://... (default "
                    "sqlite under $TUNEKIT_CACHE/logs/requests.db)")
    sv.add_argument("--retention-days", type=float, default=None, help="delete log rows older than this (hourly)")
    sv.add_argument("--log-full-consent", action="store_true", help="confirm --log full (see docs/privacy.md)")
    sv.add_argument("--log-writer", default="process", choices=["process", "thread"], help="where log rows are "
                    "redacted and written: a writer process (off the server's cores and GIL; rows already handed to "
                    "it survive a server crash) or a thread in the server")
    dt = sub.add_parser("data", help="personal data in training files: `tunekit data scan FILE`, "
                        "`tunekit data redact FILE --out FILE2`")
    dt_sub = dt.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    ds = dt_sub.add_parser("scan", help="count personal data per type, with masked examples and file:line:field")
    ds.add_argument("file")
    ds.add_argument("--json", action="store_true", help="print the report as JSON")
    ds.add_argument("--examples", type=int, default=10, help="masked examples to show")
    dr = dt_sub.add_parser("redact", help="write a copy with personal data replaced (.jsonl, .json or .csv)")
    dr.add_argument("file")
    dr.add_argument("--out", required=True)
    dr.add_argument("--operator", default="placeholder", choices=["placeholder", "mask", "hash"],
                    help="<EMAIL> placeholders, j****l masks, or keyed HMAC tokens (secret: $TUNEKIT_PII_SECRET)")
    lg = sub.add_parser("logs", help="the request log: `tunekit logs purge|erase|export|stats` (docs/privacy.md)")
    lg_sub = lg.add_subparsers(dest="logs_command", metavar="SUBCOMMAND", required=True)
    for name, text in (("purge", "delete rows older than --days"), ("erase", "erase every row of --user (GDPR "
                       "Art. 17) and the files exported for them; audited"), ("export", "write the rows of --user "
                       "as JSONL (a data-subject access request)"), ("stats", "rows, erasures")):
        lp = lg_sub.add_parser(name, help=text)
        lp.add_argument("--db", default=None, help="log store URL (default: the one tunekit serve uses)")
        if name == "purge":
            lp.add_argument("--days", type=float, required=True)
        if name in ("erase", "export"):
            lp.add_argument("--user", required=True)
        if name == "erase":
            lp.add_argument("--rag-store", default=None, help="RAG store whose files ingested with --owner USER are "
                            "deleted too (default: the one tunekit serve and tunekit rag use)")
            lp.add_argument("--no-rag", action="store_true", help="erase from the log store only")
        if name == "export":
            lp.add_argument("--out", required=True)

    sub.add_parser("federate", help="federated fine-tuning across data owners on Flower (see `tunekit federate "
                   "--help`)", add_help=False)
    sub.add_parser("rag", help="retrieval: `tunekit rag ingest|search|ask|eval|make-data|list|drop` (see "
                   "`tunekit rag --help`)", add_help=False)
    ex = sub.add_parser("export", help="a run as a merged transformers folder, GGUF (+ Ollama Modelfile), a llama.cpp "
                        "LoRA GGUF or a vLLM adapter, each checked by the tool that consumes it (docs/export.md)")
    ex.add_argument("run", help="tunekit run folder or PEFT adapter folder")
    ex.add_argument("--format", required=True, choices=["hf", "gguf", "ollama", "lora-gguf", "vllm"])
    ex.add_argument("--out", required=True, help="new folder for the export (written under a temporary name, "
                    "renamed when complete)")
    ex.add_argument("--quant", default=None, help="GGUF type: f32 f16 bf16 q8_0 q5_1 q5_0 q4_1 q4_0 q6_k q5_k_m "
                    "q4_k_m (default f16; ollama q8_0; for lora-gguf: the base GGUF written beside the adapter)")
    ex.add_argument("--dtype", default="float32", help="hf: weights dtype (float32, bfloat16, float16)")
    ex.add_argument("--model", default=None, help="base model (default: the one the run was trained on)")
    ex.add_argument("--serve-name", default=None, help="vllm: the base model name vLLM serves "
                    "(base_model_name_or_path; default: the base model's folder)")
    ex.add_argument("--gguf-pre", default=None, help="llama.cpp pre-tokenizer name, for tokenizers tunekit "
                    "does not recognise")
    ex.add_argument("--no-verify", action="store_true", help="skip the checks with transformers, llama.cpp, Go, "
                    "vLLM")
    ex.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ex.add_argument("--threads", type=int, default=None, help="torch / llama.cpp threads for the checks")

    d = sub.add_parser("demo", help="the end-to-end demo: data, base eval, LoRA training, eval, table")
    d.add_argument("--out", default="runs/demo", help="folder for data, run and results")
    d.add_argument("--steps", type=int, default=None, help="override the demo's training steps")
    d.add_argument("--n-test", type=int, default=100)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .allocator import AllocatorError, reexec_under_allocator

    if argv is None:  # the program itself (not a call from Python): training commands run under tcmalloc
        argv = sys.argv[1:]
        try:
            reexec_under_allocator(argv)
        except AllocatorError as e:
            print(f"tunekit: {e}", file=sys.stderr)
            return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if argv and argv[0] in ("train", "distill"):
            return cmd_train(argv[1:], argv[0])
        if argv[:2] == ["bench", "serve-quality"]:
            from .bench.serve_quality import main as bench_serve_quality

            bench_serve_quality(argv[2:])
            return 0
        if argv[:2] == ["bench", "export"]:
            from .bench.export_bench import main as bench_export

            bench_export(argv[2:])
            return 0
        if argv[:2] == ["bench", "serve"]:
            from .bench.serve_bench import main as bench_serve

            bench_serve(argv[2:])
            return 0
        if argv[:1] == ["federate"]:
            from .federated.cli import main as federate_main  # Flower runs from its own venv (federated/runtime.py)

            return federate_main(argv[1:])
        if argv[:1] == ["rag"]:
            from .rag.cli import main as rag_main  # prints its own errors (RagError) as one clean line

            return rag_main(argv[1:])
        if argv[:2] == ["bench", "train"]:
            from .bench.train_bench import main as bench_train

            bench_train(argv[2:])
            return 0
        args = build_parser().parse_args(argv)
        from . import api

        if args.command == "generate":
            if not (args.prompt or args.input):
                raise SystemExit("tunekit generate: give --prompt TEXT or --input FILE")
            for reply in api.generate(args.prompt or args.input, model=args.model, adapter=args.adapter,
                                      system=args.system, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, device=args.device, from_file=bool(args.input),
                                      dtype=args.dtype):
                print(reply)
        elif args.command == "chat":
            api.chat(model=args.model, adapter=args.adapter, system=args.system, device=args.device,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, dtype=args.dtype)
        elif args.command == "eval":
            report = api.evaluate(args.data, model=args.model, adapter=args.adapter, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens, limit=args.limit, output=args.output,
                                  device=args.device, dtype=args.dtype)
            print(report.table())
        elif args.command == "merge":
            result = api.merge(args.adapter, args.out, model=args.model, dtype=args.dtype, device=args.device)
            print(f"merged model: {result.out_dir}  (load with AutoModelForCausalLM.from_pretrained, or "
                  f"tunekit generate --model {result.out_dir})")
        elif args.command == "adapters":
            from .adapters import combine_adapters

            named = {}
            for item in args.adapter:
                name, eq, path = item.partition("=")
                if not eq or not name or not path:
                    raise SystemExit(f"tunekit adapters combine: --adapter takes NAME=PATH, got {item!r}")
                named[name] = path
            out = combine_adapters(args.base, named, args.how, args.weights, args.out, density=args.density,
                                   svd_rank=args.svd_rank, device=args.device)
            print(f"combined adapter: {out}  (use with --adapter {out})")
        elif args.command == "plan":
            result = api.plan(args.model, method=args.method, seq_len=args.seq_len, batch=args.batch, rank=args.rank,
                              target=args.target, precision=args.precision, device=args.device,
                              label_fraction=args.label_fraction, virtual_tokens=args.virtual_tokens,
                              bottleneck=args.bottleneck, freeze_layers=args.freeze_layers, fraction=args.fraction,
                              max_params=args.max_params, select_rank=args.select_rank, malloc=args.malloc,
                              optim=args.optim, dropout=args.dropout, fused_ops=not args.no_fused_ops,
                              packed_weights=not args.no_packed_weights)
            import json

            print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
        elif args.command == "compare":
            api.compare(methods=args.methods, model=args.model, steps=args.steps, n_train=args.n_train,
                        n_test=args.n_test, batch_size=args.batch_size, device=args.device, out=args.out,
                        **key_values(args.set, "tunekit compare --set"))
        elif args.command == "shrink":
            from .distill.shrink import format_report

            layers = [int(x) for x in args.layers.split(",")] if args.layers else None
            if args.every is None and layers is None:
                args.every = 3
            report = api.shrink(args.model, args.out, every=args.every, layers=layers, adapter=args.adapter,
                                dtype=args.dtype)
            print(format_report(report))
            print(f"student: {args.out}  (use as --model.name {args.out})")
        elif args.command == "serve":
            from .serve.engine import ServeOptions
            from .serve.server import run as serve

            opts = ServeOptions(model=args.model, dtype=args.dtype, quantize=args.quantize,
                                max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                max_batched_tokens=args.max_batched_tokens, max_queue=args.max_queue,
                                max_adapters=args.max_adapters, threads=args.threads)
            return serve(opts, args.adapters, host=args.host, port=args.port, api_keys=args.api_keys,
                         embedding_model=args.embedding_model, print_vllm=args.print_vllm, pin=args.pin,
                         max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens, log=args.log,
                         log_db=args.log_db, retention_days=args.retention_days,
                         log_full_consent=args.log_full_consent, rag_store=args.rag_store,
                         log_writer=args.log_writer)
        elif args.command in ("data", "logs"):
            from .privacy.cli import run as privacy_command

            return privacy_command(args)
        elif args.command == "export":
            from .export import export
            from .export.card import _fmt

            card = export(args.run, args.format, args.out, quant=args.quant, model=args.model, dtype=args.dtype,
                          verify=not args.no_verify, gguf_pre=args.gguf_pre, serve_name=args.serve_name,
                          overwrite=args.overwrite, threads=args.threads)
            print(f"exported {args.format}: {card['out']}  ({card['what']})")
            for name, result in card["verification"].items():
                print(f"  verified, {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in result.items()))
            for line in card.get("use", []):
                print(f"  use: {line.replace('<out>', card['out'])}")
        elif args.command == "demo":
            api.demo(out=args.out, steps=args.steps, n_test=args.n_test)
        else:
            build_parser().print_help()
            return 2
        return 0
    except ConfigError as e:
        print(f"tunekit: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # known user errors get one clean line, the rest a traceback
        from .data.errors import DataError
        from .methods import MethodError
        from .models import ModelError
        from .distill.teacher import DistillError
        from .planner import PlanError

        from .serve.adapters import AdapterError
        from .serve.security import KeyFileError
        from .privacy.errors import PrivacyError

        if isinstance(e, PrivacyError):  # log store unreachable, no hash secret, train.pii=refuse, ...
            print(f"tunekit: {e}", file=sys.stderr)
            return 2
        from .export.errors import ExportError
        from .distributed.context import DistributedError
        from .rag.errors import RagError

        if isinstance(e, (DataError, MethodError, ModelError, PlanError, DistillError, FileNotFoundError,
                          AdapterError, KeyFileError, DistributedError, ExportError, RagError)):
            print(f"tunekit: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
