"""Pieces of the act routes' hot path that replace general ones: each must answer exactly as the
general one did."""

from __future__ import annotations

import math
import random

import pytest
from starlette.responses import Response
from trmrl_client.codec import INPUT_LIMIT

from service.api.replies import JSONBytes
from service.core.engine import all_in_range


@pytest.mark.parametrize("status", [200, 201, 422])
def test_json_bytes_builds_the_headers_starlette_builds(status: int) -> None:
    payload = b'{"action":[0.5,-0.25],"step":3}'
    general = Response(payload, status_code=status, media_type="application/json")
    lean = JSONBytes(payload, status)
    assert lean.raw_headers == general.raw_headers
    assert (lean.status_code, lean.body, lean.background) == (general.status_code, general.body, None)
    assert lean.headers["content-type"] == "application/json"


def test_all_in_range_agrees_with_the_value_by_value_check() -> None:
    def by_value(values: list[float]) -> bool:
        return all(-INPUT_LIMIT <= v <= INPUT_LIMIT for v in values)

    special = [math.nan, math.inf, -math.inf, INPUT_LIMIT, -INPUT_LIMIT, INPUT_LIMIT * 1.0001, 0.0, 1e300]
    rng = random.Random(0)
    for _ in range(20_000):
        values = [
            rng.choice(special) if rng.random() < 0.3 else rng.uniform(-2 * INPUT_LIMIT, 2 * INPUT_LIMIT)
            for _ in range(rng.randint(0, 6))
        ]
        assert all_in_range(values) == by_value(values), values
    # NaN anywhere fails, wherever min and max would leave it out.
    assert not all_in_range([0.0, math.nan, 1.0])
    assert not all_in_range([math.nan, 0.0])
    assert all_in_range([]) and all_in_range([INPUT_LIMIT, -INPUT_LIMIT])
