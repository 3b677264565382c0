"""Schemathesis fuzzes every route of a live server from its own OpenAPI schema: no 5xx, responses as documented."""

from __future__ import annotations

import pytest

from serve_fixtures import engine_for, live_server

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,  # noqa: E402
                                               status_code_conformance)

ADMIN = "sk-fuzz-admin"


@pytest.fixture(scope="module")
def fuzz_schema(tiny_model_dir):
    from tunekit.serve.api import Limits, build_app
    from tunekit.serve.security import KeyStore

    engine = engine_for(tiny_model_dir, max_num_seqs=4, max_model_len=256)
    # small generation limits: the fuzzer sends thousands of requests; what they ask is checked, not how long
    app = build_app(engine, KeyStore.from_sources(None, env={"TUNEKIT_ADMIN_KEYS": ADMIN}),
                    limits=Limits(max_tokens=8, max_n=2))
    with live_server(engine, app) as live:
        yield schemathesis.openapi.from_url(live.url + "/openapi.json")


def test_every_route_answers_as_documented_and_never_5xx(fuzz_schema):
    from hypothesis import given

    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert len(operations) >= 9
    calls = {}
    for op in operations:
        @given(op.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            calls[op.path] = calls.get(op.path, 0) + 1
            case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60,
                                   checks=[status_code_conformance, content_type_conformance,
                                           response_schema_conformance])

        fuzz()
    assert all(calls[p] >= 20 for p in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")), calls
