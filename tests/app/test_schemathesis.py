"""Schemathesis over our OpenAPI description (issue 14: no 500s, no schema violations): every operation of
`openapi_document` gets requests generated from its schema (valid ones and, by schemathesis' negative mode,
invalid ones), sent over HTTP to the app on uvicorn over the fake engine; each response must not be a 5xx, must
have a status code, content type and body the document declares for that operation.

Bounded for CI: SCHEMATHESIS_MAX_EXAMPLES (default 25) examples per operation, derandomized (the same cases every
run), no deadline (a 2-core machine is slow at times). A deeper run by hand:
`SCHEMATHESIS_MAX_EXAMPLES=200 .venv/bin/pytest -q tests/app/test_schemathesis.py`."""
from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pie_server.app.openapi import openapi_document
from tests.app.fake_engine import FakeEngine
from tests.app.server_thread import ServerThread

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance,  content_type_conformance, response_headers_conformance,
          response_schema_conformance]

schemathesis.serializer.alias("application/wasm", "application/octet-stream")  # uploads: raw bytes
schema = schemathesis.openapi.from_dict(openapi_document("test"))


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_described(case: schemathesis.Case, fake_server: ServerThread) -> None:
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = FakeEngine.model_name  # a random name is only ever a 404
    case.call_and_validate(base_url=fake_server.url, checks=CHECKS, timeout=30)
