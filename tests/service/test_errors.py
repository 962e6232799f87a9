"""The one table from error code to HTTP status: every code the service raises is in it, and the core
below the API raises codes only."""

from __future__ import annotations

import re
from pathlib import Path

from service.api.errors import STATUS, status_of
from service.core import errors
from service.core.errors import ServiceError

SERVICE = Path(__file__).resolve().parents[2] / "service"
#: A code where a refusal is built: ``ServiceError("code", ...)`` or the columnar decoder's ``_refuse``.
RAISED = re.compile(r'(?:ServiceError|_refuse)\(\s*"([a-z_]+)"')


def raised_codes() -> set[str]:
    codes = set()
    for path in SERVICE.rglob("*.py"):
        codes |= set(RAISED.findall(path.read_text()))
    return codes


def test_every_code_the_service_raises_has_its_status_in_the_table() -> None:
    codes = raised_codes()
    assert {"unknown_session", "step_conflict", "overloaded", "wrong_type", "forbidden_path"} <= codes
    assert sorted(codes - set(STATUS)) == []


def test_statuses_are_chosen_at_the_edge() -> None:
    assert status_of(errors.unknown_session("s")) == 404
    assert status_of(errors.step_conflict(3, 5)) == 409
    assert status_of(errors.capacity_exhausted(4)) == 429
    assert status_of(errors.overloaded(4)) == 503
    assert status_of(errors.wrong_length("observation", 2, 3)) == 422
    assert status_of(ServiceError("http_418", "teapot")) == 418
    assert status_of(ServiceError("no_such_code", "?")) == 500
    # Below the API a refusal has a code and no status.
    assert not hasattr(errors.unknown_session("s"), "status")
    assert "status" not in (SERVICE / "core" / "errors.py").read_text().replace("HTTP status", "")
