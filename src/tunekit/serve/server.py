"""`tunekit serve`: build the engine, load the adapters folder, print how to connect, run uvicorn."""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path

import torch

from .adapters import AdapterError
from .engine import Engine, ServeOptions, serving_dtype


def adapter_folders(root: str | Path) -> dict[str, Path]:
    """{name: folder} of every adapter / run folder directly under `root` (named by folder)."""
    root = Path(root)
    if not root.is_dir():
        raise AdapterError(f"--adapters {root}: not a folder")
    found = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if (sub / "adapter_config.json").exists() or (sub / "tunekit_method.json").exists() \
                or (sub / "config.yaml").exists():
            found[sub.name] = sub
    return found


def vllm_command(engine: Engine, host_model: str | None = None) -> tuple[str, list[str]]:
    """The `vllm serve` line for the same base and batched adapters, and the adapters vLLM cannot take."""
    lora = {n: a for n, a in engine.adapters.items() if a.kind == "batched"}
    skipped = [f"{n} ({a.info.get('method', a.kind)}: merge it with `tunekit merge` and serve it as its own model)"
               for n, a in engine.adapters.items() if a.kind != "batched"]
    model = host_model or engine.model_name
    args = ["vllm", "serve", model]
    if lora:
        max_rank = max(a.info["max_rank"] for a in lora.values())
        supported = next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= max_rank)  # vLLM's allowed values
        args += ["--enable-lora", "--max-loras", str(len(lora)), "--max-lora-rank", str(supported), "--lora-modules"]
        args += [f"{n}={a.path}" for n, a in lora.items()]
    args += ["--max-model-len", str(engine.max_len)]
    return " ".join(shlex.quote(a) for a in args), skipped


def client_snippet(url: str, model: str) -> str:
    return (f'from openai import OpenAI\n'
            f'client = OpenAI(base_url="{url}/v1", api_key="<your key>")\n'
            f'reply = client.chat.completions.create(model="{model}", '
            f'messages=[{{"role": "user", "content": "Hello"}}])\n'
            f'print(reply.choices[0].message.content)')


def run(opts: ServeOptions, adapters_dir: str | None = None, host: str = "127.0.0.1", port: int = 8000,
        api_keys: str | None = None, embedding_model: str | None = None, print_vllm: bool = False,
        pin: list[str] | None = None, max_body_bytes: int = 1 << 20, max_tokens: int = 2048,
        log: str = "metadata", log_db: str | None = None, retention_days: float | None = None,
        log_full_consent: bool = False, rag_store: str | None = None, log_writer: str = "process") -> int:
    """rag_store: the RAG store's URL or folder (None: $TUNEKIT_RAG_STORE, else $TUNEKIT_CACHE/rag, opened on first
    use); one given here is opened before the model loads, so a bad URL or an unreachable server fails at once."""
    import uvicorn

    from .api import Limits, build_app
    from .embeddings import Embedder
    from .metrics import Metrics
    from .security import KeyStore

    keys = KeyStore.from_sources(api_keys)
    if opts.quantize == "int8" and serving_dtype(opts.dtype) != torch.bfloat16:
        print("[tunekit] warning: --quantize int8 with float32 activations (this CPU has no native bf16, or --dtype "
              "float32): torch's int8 weight kernel is 4-40x slower than float32 linears there (measured on SmolLM2's "
              "shapes, docs/serving.md); it saves memory, not time", file=sys.stderr, flush=True)
    metrics = Metrics()
    request_log = None if print_vllm else open_request_log(log, log_db, retention_days, log_full_consent,
                                                           metrics.registry, log_writer)  # a bad store fails before loading
    if rag_store and not print_vllm:
        from ..rag.stores import open_store

        open_store(rag_store).close()  # RagError: unknown URL, cannot connect, bad option
    print(f"[tunekit] loading {opts.model} ...", file=sys.stderr, flush=True)
    engine = Engine(opts, metrics=metrics)
    for name, path in (adapter_folders(adapters_dir) if adapters_dir else {}).items():
        try:
            entry = engine.load_adapter(name, path, pin=name in (pin or []))
            print(f"[tunekit] adapter {name}: {entry.kind} ({path})", file=sys.stderr, flush=True)
        except AdapterError as e:
            print(f"[tunekit] skipped adapter {name}: {e}", file=sys.stderr, flush=True)
    if print_vllm:
        line, skipped = vllm_command(engine)
        print(line)
        for s in skipped:
            print(f"# not servable by vLLM as a LoRA: {s}")
        return 0
    generated = None
    if not keys.keys:
        generated = keys.generate()
    app = build_app(engine, keys, metrics, Embedder(embedding_model), Limits(max_body_bytes=max_body_bytes,
                                                                              max_tokens=max_tokens),
                    request_log=request_log, rag_store=rag_store)
    url = f"http://{host}:{port}"
    print(f"\ntunekit serve: {url}  (base {engine.model_name}, {str(engine.dtype).replace('torch.', '')}"
          f"{', int8 weights' if opts.quantize else ''}; {len(engine.adapters)} adapter(s): "
          f"{', '.join(engine.adapters) or 'none'})", flush=True)
    if generated:
        print(f"no --api-keys given: generated keys for this run only\n  user key:  {generated[0]}\n"
              f"  admin key: {generated[1]}", flush=True)
    print("\n" + client_snippet(url, next(iter(engine.adapters), engine.model_name)) + "\n", flush=True)
    # HTTP in a thread, the engine on this one (the thread that loaded the model: see Engine.run). Ctrl-C asks
    # uvicorn to stop accepting and finish in-flight requests (30 s at most); the engine serves them until then.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=30))
    http = threading.Thread(target=server.run, name="tunekit-http", daemon=True)

    def on_signal(signum, frame):
        print("[tunekit] shutting down: finishing in-flight requests", file=sys.stderr, flush=True)
        server.should_exit = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    http.start()
    try:
        engine.run(until=lambda: not http.is_alive())
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if request_log is not None:
            st = request_log.close()
            print(f"[tunekit] request log: {st['written']} row(s) written, {st['dropped']} dropped", file=sys.stderr,
                  flush=True)
    return 0 if server.started else 1


def open_request_log(mode: str, url: str | None, retention_days: float | None, full_consent: bool, registry,
                     writer: str = "process"):
    """The request log of `tunekit serve --log MODE` (None for off); an unreachable store is an error here."""
    if mode == "off":
        return None
    from ..privacy.logstore import LogStore, LogStoreError, redact_url
    from ..privacy.logwriter import ProcessRequestLog
    from ..privacy.requestlog import RequestLog

    if mode == "full":
        if not full_consent:
            raise LogStoreError("--log full stores prompts and answers with their personal data unredacted; add "
                                "--log-full-consent to confirm that this deployment has a lawful basis for it "
                                "(or use --log redacted)")
        print("[tunekit] WARNING: --log full: prompts and answers are stored as sent, personal data included",
              file=sys.stderr, flush=True)
    store = LogStore(url)
    print(f"[tunekit] request log: {mode} -> {redact_url(store.url)}"
          f"{f', rows kept {retention_days:g} days' if retention_days else ''}", file=sys.stderr, flush=True)
    log_class = ProcessRequestLog if writer == "process" else RequestLog  # process: redaction off our GIL
    return log_class(store, mode, retention_days=retention_days, registry=registry)
