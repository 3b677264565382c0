"""llama.cpp itself, in process, through the `xllamacpp` wheel (prebuilt llama.cpp with its native server).

tunekit uses it to check what it exports: load a GGUF (and a LoRA GGUF) the way llama.cpp users will, generate
greedily, read the log-probabilities llama.cpp computes, tokenize, and apply the chat template stored in the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from dataclasses import dataclass


class LlamaCppError(RuntimeError):
    """llama.cpp (xllamacpp) is missing or refused the file."""


def available() -> bool:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Greedy:
    tokens: list[int]  # the greedy continuation, token ids
    logprobs: list[float | None]  # llama.cpp's log-probability of each chosen token (None: merged, see greedy)
    tokens_per_s: float  # llama.cpp's own timing of the generation


class LlamaCpp:
    """One llama.cpp server in this process: `with LlamaCpp(path, lora=...) as llm: llm.greedy(ids, 16)`."""

    def __init__(self, model: str, lora: str | None = None, lora_scale: float = 1.0, n_ctx: int = 2048,
                 threads: int | None = None, parallel: int = 1):
        if not available():
            raise LlamaCppError("llama.cpp checks need the `xllamacpp` wheel: pip install xllamacpp")
        import xllamacpp as xlc

        params = xlc.CommonParams()
        params.model.path = model
        params.n_ctx = n_ctx * parallel
        params.n_parallel = parallel
        params.warmup = False
        params.verbosity = -1  # llama.cpp logs every step to stderr otherwise; errors still raise
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads or os.cpu_count() or 1
        if lora:
            adapter = xlc.CommonAdapterLoraInfo(lora, lora_scale)
            params.lora_adapters = [adapter]
        self.params = params
        self.server = None

    def __enter__(self) -> "LlamaCpp":
        import xllamacpp as xlc

        try:
            self.server = xlc.Server(self.params)
        except Exception as e:  # llama.cpp reports a file it cannot load as an exception from the constructor
            raise LlamaCppError(f"llama.cpp could not load {self.params.model.path}: {e}") from e
        return self

    def __exit__(self, *exc) -> None:
        self.server = None  # the server stops when the object is freed

    def greedy(self, prompt: list[int], n: int) -> Greedy:
        """Greedy continuation of token ids, n tokens at most (stops early at an end-of-generation token).

        Read from llama.cpp's native /completion route: its `tokens` field lists every generated id, while the
        probability list merges a token that ends inside a UTF-8 character with the token that completes it (the
        OpenAI-shaped answer then silently drops ids). Log-probabilities are kept for the tokens that have one."""
        out = self._post("/completion", {"prompt": prompt, "n_predict": n, "temperature": 0.0, "top_k": 1,
                                         "samplers": ["top_k"], "n_probs": 1, "return_tokens": True,
                                         "cache_prompt": False})
        tokens = list(out.get("tokens") or [])
        logprobs: list[float | None] = [None] * len(tokens)
        i = 0
        for entry in out.get("completion_probabilities", []):
            while i < len(tokens) and tokens[i] != entry["id"]:
                i += 1
            if i < len(tokens):
                logprobs[i] = entry["logprob"]
                i += 1
        return Greedy(tokens, logprobs, float(out.get("timings", {}).get("predicted_per_second", 0.0)))

    def chat(self, messages: list[dict], max_tokens: int, **extra) -> dict:
        out = self.server.handle_chat_completions({"messages": messages, "max_tokens": max_tokens,
                                                   "temperature": 0.0, **extra})
        if "error" in out:
            raise LlamaCppError(f"llama.cpp chat failed: {out['error']}")
        return out

    def _post(self, route: str, body: dict) -> dict:
        request = urllib.request.Request(self.server.listening_address + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with contextlib.closing(urllib.request.urlopen(request, timeout=60)) as response:
            return json.loads(response.read())

    def apply_template(self, messages: list[dict]) -> str:
        """The prompt llama.cpp builds from the chat template in the GGUF (with the generation prompt)."""
        return self._post("/apply-template", {"messages": messages})["prompt"]

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": False, "parse_special": special})["tokens"]
