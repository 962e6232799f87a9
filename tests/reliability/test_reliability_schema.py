"""Schemathesis: requests generated from the app's own OpenAPI schema, in process: no reply is a 5xx.

Runs every documented operation with an API key (so that requests get past authentication);
``TRMRL_LONG=1`` runs ten times the cases. Skipped when schemathesis is not installed.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from reliability_support import A, keyed_settings
from trmrl_client.codec import packb

from service.app import create_app

schemathesis = pytest.importorskip("schemathesis")


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx: Any, value: Any) -> bytes:
    try:
        return packb(value)
    except (TypeError, ValueError, OverflowError):  # integers beyond 64 bits: send a malformed body
        return b"\xc1"


# Schemathesis runs an app's lifespan once and ends it after each operation: every operation gets
# an app of its own (the one the schema is read from is never called).
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", create_app(keyed_settings()))
CASES = 300 if os.environ.get("TRMRL_LONG") == "1" else 30
SEEN: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(f"\nschemathesis: {sum(SEEN.values())} cases, by operation and status {dict(sorted(SEEN.items()))}")


@pytest.fixture
def app() -> Any:
    return create_app(keyed_settings(max_body_bytes=4096))


@SCHEMA.parametrize()
@settings(
    max_examples=CASES,
    deadline=None,
    derandomize=os.environ.get("TRMRL_LONG") != "1",
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_request_gets_a_server_error(case: Any, app: Any) -> None:
    response = case.call(app=app, headers=A)
    SEEN[f"{case.method} {case.path}", response.status_code] += 1
    assert response.status_code < 500, response.content[:500]
