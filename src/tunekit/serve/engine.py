"""The serving engine: one resident base model, many adapters, continuous batching, driven by one thread.

    engine = Engine(ServeOptions(model="smollm2-135m"))
    engine.load_adapter("invoices", "runs/demo/lora")
    engine.start()
    seq = engine.submit(prompt_ids, SamplingParams(max_tokens=64), adapter="invoices", on_event=print)

The loop (`run`) reads top to bottom: take new requests and aborts from the inbox, ask each lane's scheduler for
a step, run it through that lane's model runner, sample, report. A lane is one set of weights with its own KV
cache: the base model (with every batched LoRA adapter riding in its batches) and one per merged adapter.
Requests are submitted from any thread (the HTTP server's event loop); the engine thread alone touches the model.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import AdapterBudget, AdapterError, read_lora, same_model, serving_kind, trained_base
from .lora_batch import LoraWeights
from .runner import ModelRunner, Work
from .sampling import SamplingParams, sample_next, token_logprobs
from .scheduler import Scheduler
from .sequence import Event, Sequence, detokenize, visible_text
from .structured import Grammars, allowed_mask


# Seconds without work before the KV caches shrink back to their initial size. Not at once: with one client in a
# closed loop the cache would be regrown for every request (SmolLM2, 64 slots: ~750 MB allocated and copied each
# time, seen as a 240 ms p95 inter-token stall in the benchmark).
IDLE_SHRINK_S = 2.0


class RequestError(ValueError):
    """A request the engine cannot take; `param` names the field, `status` the HTTP status to answer."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class ServeOptions:
    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto: bf16 where the CPU/GPU computes it natively, else float32
    quantize: str | None = None  # int8: weight-only int8 linears
    max_num_seqs: int = 32  # KV-cache slots of the base lane: sequences decoding at once
    merged_slots: int = 8  # slots of each merged adapter's lane
    max_model_len: int = 2048  # prompt + output tokens per sequence
    max_batched_tokens: int = 256  # tokens per step (decodes + prefill chunks)
    max_queue: int = 256  # waiting sequences per lane before 503
    max_adapters: int = 16
    threads: int | None = None


@dataclass
class Adapter:
    name: str
    path: str
    kind: str  # "batched" or "merged"
    lora: LoraWeights | None = None
    lane: "Lane | None" = None
    info: dict = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))


class Lane:
    def __init__(self, runner: ModelRunner, opts: ServeOptions):
        self.runner = runner
        self.scheduler = Scheduler(runner.cache, opts.max_batched_tokens, opts.max_queue)


def serving_dtype(name: str) -> torch.dtype:
    from ..engine.device import pick_device
    from ..inference import inference_dtype

    return inference_dtype(name, pick_device("cpu"))


class Engine:
    def __init__(self, opts: ServeOptions, metrics=None):
        from ..inference import stop_token_ids
        from ..models import load_model, load_tokenizer

        self.opts, self.metrics = opts, metrics
        self.dtype = serving_dtype(opts.dtype)
        self.tokenizer = load_tokenizer(opts.model)
        hf = load_model(opts.model, dtype="float32").eval()
        self.model_name = opts.model
        self.base = Lane(self._runner(hf, opts.max_num_seqs), opts)
        del hf
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.base.runner.vocab_size, self.stop_ids)
        self.adapters: dict[str, Adapter] = {}
        self.budget = AdapterBudget(opts.max_adapters)
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards adapters / lanes against the HTTP threads

    def _runner(self, hf, slots: int) -> ModelRunner:
        return ModelRunner(hf, self.dtype, self.opts.quantize, max_slots=slots, max_len=self.opts.max_model_len)

    @property
    def max_len(self) -> int:
        return self.base.runner.max_len

    # ---- adapters -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path, pin: bool = False) -> Adapter:
        """Read and register an adapter (from any thread; reading happens outside the engine loop)."""
        path = Path(path)
        if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise AdapterError(f"adapter name {name!r}: use letters, digits, '-', '_' or '.'")
        if name == self.model_name or name in self.adapters:
            raise AdapterError(f"a model named {name!r} is already loaded; unload it first or pick another name")
        kind = serving_kind(path)
        base = trained_base(path)
        if base is not None and not same_model(base, self.model_name):
            raise AdapterError(f"{path} was trained on {base!r}, but this server's base model is "
                               f"{self.model_name!r}: an adapter only works on the base it was trained on")
        runner = self.base.runner
        if kind == "batched":
            lora = read_lora(name, path, runner.module_shapes(), len(runner.layers), self.dtype)
            entry = Adapter(name, str(path), kind, lora=lora, lane=self.base, info=lora.info)
        else:
            from ..inference import load_for_inference

            merged, _ = load_for_inference(self.model_name, str(path), device="cpu", dtype="float32", merge=True)
            entry = Adapter(name, str(path), kind, lane=Lane(self._runner(merged, self.opts.merged_slots), self.opts),
                            info={"method": _method_name(path)})
            del merged
        with self._lock:
            victim = self.budget.victim(self._busy_adapters())
            if self.budget.full() and victim is None:
                raise AdapterError(f"the adapter budget ({self.opts.max_adapters}) is full and every loaded adapter "
                                   f"is pinned or in use; unload one first")
            if victim is not None:
                self._unload_locked(victim)
            self.adapters[name] = entry
            self._restack_locked()
            self.budget.touch(name)
            if pin:
                self.budget.pinned.add(name)
        if self.metrics:
            self.metrics.adapter_listed(name)
        return entry

    def _busy_adapters(self) -> set[str]:
        lanes = [self.base] + [a.lane for a in self.adapters.values() if a.kind == "merged"]
        return {s.adapter for lane in lanes for s in list(lane.scheduler.running) + list(lane.scheduler.waiting)
                if s.adapter}

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self.adapters:
                raise KeyError(name)
            if name in self._busy_adapters():
                raise AdapterError(f"adapter {name!r} has requests in flight; retry when they finish")
            self._unload_locked(name)

    def _unload_locked(self, name: str) -> None:
        self.adapters.pop(name)
        self.budget.remove(name)
        self._restack_locked()

    def _restack_locked(self) -> None:
        """Give the base runner the stacked factors of the batched adapters now loaded. A step in flight keeps
        the bank it started with (the runner reads `bank` once per forward)."""
        self.base.runner.set_adapters([a.lora for a in self.adapters.values() if a.lora is not None])

    # ---- requests -------------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
               on_event=lambda e: None, grammar: str | None = None) -> Sequence:
        """Queue a request; RequestError (404 unknown adapter, 400 too long, 503 queue full) when it cannot run."""
        lane = self.base
        if adapter is not None and adapter != self.model_name:
            with self._lock:
                entry = self.adapters.get(adapter)
                if entry is None:
                    valid = ", ".join([self.model_name, *self.adapters])
                    raise RequestError(f"model {adapter!r} does not exist; available: {valid}", "model", 404,
                                       "model_not_found")
                self.budget.touch(adapter)
                lane = entry.lane
        else:
            adapter = None
        if not prompt_ids:
            raise RequestError("the prompt is empty", "messages")
        if len(prompt_ids) >= self.max_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this server's context is {self.max_len} "
                               f"tokens (prompt + output)", "messages", 400, "context_length_exceeded")
        seq = Sequence(prompt_ids, params, adapter, on_event,
                       matcher=self.grammars.matcher(grammar) if grammar else None)
        if len(lane.scheduler.waiting) + sum(1 for k, *_ in list(self._inbox) if k == "add") >= self.opts.max_queue:
            raise RequestError("the request queue is full; retry shortly", None, 503, "queue_full")
        if self.metrics:  # before the engine thread can see it: its first token is timed from here
            self.metrics.submitted(seq, adapter or self.model_name)
        self._inbox.append(("add", seq, lane))
        self._wake.set()
        return seq

    def call(self, fn, *args) -> "concurrent.futures.Future":
        """Run fn(*args) on the engine's thread between two steps (torch work from elsewhere, such as embeddings,
        would otherwise bring a second OpenMP pool: see `run`); returns a future with its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.append(("call", (fn, args, future), None))
        self._wake.set()
        return future

    def abort(self, seq: Sequence) -> None:
        """Cancel a request (client gone): its slot and cache are freed before the next step."""
        self._inbox.append(("abort", seq, None))
        self._wake.set()

    # ---- the loop -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a background thread (for library use and tests; `tunekit serve` runs it on the main
        thread, see `run`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="tunekit-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def run(self, until=None) -> None:
        """The loop, on the calling thread, until stop() or until `until()` is true.

        Run it on the thread that loaded the model: torch's OpenMP pool belongs to the thread that first used it,
        and a second thread doing torch work brings a second pool whose spinning workers compete for the cores.
        Measured here (SmolLM2, one LoRA sequence decoding, 2 cores): 38-52 ms per step on the main thread
        against 67-75 ms from a second thread."""
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        idle_since = time.monotonic()
        while not self._stop and not (until is not None and until()):
            self._drain_inbox()
            busy = [lane for lane in self.lanes() if len(lane.scheduler)]
            if not busy:
                if time.monotonic() - idle_since > IDLE_SHRINK_S:  # a burst is over: give its cache growth back
                    for lane in self.lanes():
                        lane.runner.cache.shrink_if_idle()
                self._wake.wait(timeout=0.2)
                self._wake.clear()
                continue
            idle_since = time.monotonic()
            for lane in busy:
                self.step(lane)

    def lanes(self) -> list[Lane]:
        with self._lock:
            return [self.base] + [a.lane for a in self.adapters.values() if a.kind == "merged"]

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, seq, lane = self._inbox.popleft()
            if kind == "add":
                if seq.finish_reason is None:  # aborted before it was queued
                    lane.scheduler.add(seq)
            elif kind == "call":
                fn, args, future = seq
                try:
                    future.set_result(fn(*args))
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)
            else:
                self._finish(seq, "abort", lanes=self.lanes())

    def step(self, lane: Lane) -> None:
        plan = lane.scheduler.schedule()
        if not plan:
            return
        with self._lock:
            loras = {name: a.lora for name, a in self.adapters.items() if a.lora is not None}
        work = [Work(seq.slot, seq.computed, tokens, loras.get(seq.adapter) if lane is self.base else None,
                     seq.computed + len(tokens) >= len(seq.all_ids)) for seq, tokens in plan]
        t0 = time.perf_counter()
        try:
            logits = lane.runner.forward(work)
        except Exception as e:  # noqa: BLE001 - one bad step must not take the server down
            traceback.print_exc(file=sys.stderr)
            for seq, _ in plan:
                self._finish(seq, "error", error=f"{type(e).__name__}: {e}", lanes=[lane])
            return
        if self.metrics:
            self.metrics.step(time.perf_counter() - t0)
        row = 0
        sampled = []
        for (seq, tokens), w in zip(plan, work):
            seq.computed += len(tokens)
            if w.wants_logits:
                sampled.append((seq, logits[row]))
                row += 1
        if sampled:
            self._sample_and_report(sampled, lane)

    def _sample_and_report(self, rows: list[tuple[Sequence, torch.Tensor]], lane: Lane) -> None:
        logits = torch.stack([r for _, r in rows])
        for i, (seq, _) in enumerate(rows):
            if seq.matcher is not None:
                logits[i].masked_fill_(~allowed_mask(seq.matcher, logits.shape[1]), float("-inf"))
        tokens = sample_next(logits, [s.params for s, _ in rows], [s.generator for s, _ in rows])
        for (seq, raw), token in zip(rows, tokens):
            stop = token in self.stop_ids or token in seq.params.stop_token_ids
            if stop and not seq.params.ignore_eos:
                self._report(seq, [], [], "stop", lane)
                continue
            logprobs = []
            if seq.params.logprobs is not None:
                lp, top = token_logprobs(raw, token, seq.params.logprobs)
                logprobs.append({"token": token, "logprob": lp, "top": top})
            seq.output_ids.append(token)
            if seq.matcher is not None:
                seq.matcher.consume_token(token)
            reason = None
            if seq.matcher is not None and seq.matcher.is_stopped():
                reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or len(seq.all_ids) >= self.max_len:
                reason = "length"
            self._report(seq, [token], logprobs, reason, lane)

    def _report(self, seq: Sequence, new_ids: list[int], logprobs: list[dict], reason: str | None,
                lane: Lane) -> None:
        detokenize(self.tokenizer, seq, final=reason is not None)
        shown, hit_stop = visible_text(seq.text, seq.params.stop, final=reason is not None)
        if hit_stop:
            reason = "stop"
        delta = shown[seq.sent_chars:]
        seq.sent_chars = len(shown)
        if self.metrics and new_ids:
            self.metrics.token(seq)
        if reason is not None:
            self._finish(seq, reason, lanes=[lane], text=delta, new_ids=new_ids, logprobs=logprobs)
        elif delta or new_ids:
            seq.on_event(Event(delta, new_ids, logprobs))

    def _finish(self, seq: Sequence, reason: str, lanes: list[Lane], error: str | None = None, text: str = "",
                new_ids: list[int] | None = None, logprobs: list[dict] | None = None) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        for lane in lanes:
            lane.scheduler.finish(seq)
        if self.metrics:
            self.metrics.finished(seq, reason)
        seq.on_event(Event(text, new_ids or [], logprobs or [], reason, error))


def _method_name(path: Path) -> str:
    from ..methods import method_for_folder

    try:
        return method_for_folder(path).name
    except Exception:  # noqa: BLE001 - a PEFT folder tunekit does not train (e.g. DoRA written by peft)
        return "peft"
