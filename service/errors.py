"""API errors: one exception type, one JSON shape, ``{"error": {"code", "message", "detail"}}``.

The engine and the session table raise :class:`ApiError` directly, so every transport (HTTP now,
streams later) reports the same code for the same problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

FLOAT32_MAX = 3.4028234663852886e38


class ApiError(Exception):
    """A request the service refuses: an HTTP status, a snake_case code and a human sentence."""

    def __init__(self, status: int, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail or {}

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return {"error": {"code": self.code, "message": self.message, "detail": self.detail}}


def malformed_json(reason: str) -> ApiError:
    return ApiError(400, "malformed_json", f"The request body is not valid JSON: {reason}.")


def malformed_msgpack(reason: str) -> ApiError:
    return ApiError(400, "malformed_msgpack", f"The request body is not valid MessagePack: {reason}.")


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        413, "body_too_large", f"The request body exceeds the limit of {limit} bytes.", {"max_bytes": limit}
    )


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        415,
        "unsupported_media_type",
        f"Content type {content_type!r} is not supported; send application/json or application/msgpack.",
        {"content_type": content_type},
    )


def unknown_model(name: str, known: list[str]) -> ApiError:
    return ApiError(
        404, "unknown_model", f"No model named {name!r} is loaded.", {"model": name, "known": known}
    )


def unknown_session(session_id: str) -> ApiError:
    return ApiError(
        404,
        "unknown_session",
        "No such session: it never existed, was deleted, expired or was evicted.",
        {"session_id": session_id},
    )


def step_conflict(expected: int, got: int) -> ApiError:
    return ApiError(
        409,
        "step_conflict",
        f"Step {got} does not follow the session's history: the next step is {expected} "
        f"(re-sending step {expected - 1} repeats its action).",
        {"expected_step": expected, "got_step": got},
    )


def capacity_exhausted(capacity: int) -> ApiError:
    return ApiError(
        429,
        "capacity_exhausted",
        "The model holds as many sessions as it can and none is idle long enough to evict; retry later.",
        {"max_sessions": capacity},
    )


def overloaded(limit: int) -> ApiError:
    return ApiError(
        503,
        "overloaded",
        f"The model has {limit} steps waiting for a forward pass, its limit; retry shortly.",
        {"max_queued_steps": limit},
    )


def draining() -> ApiError:
    return ApiError(
        503, "draining", "The service is shutting down and takes no new sessions; retry elsewhere."
    )


def model_version_mismatch(model: str, expected: str, got: str) -> ApiError:
    return ApiError(
        409,
        "model_version_mismatch",
        f"The snapshot was taken with version {got} of model {model!r}; this service runs {expected}.",
        {"model": model, "expected_version": expected, "got_version": got},
    )


def invalid_snapshot(reason: str, detail: dict[str, Any] | None = None) -> ApiError:
    return ApiError(422, "invalid_snapshot", f"The snapshot does not fit the model: {reason}.", detail)


def session_busy(session_id: str) -> ApiError:
    return ApiError(
        409,
        "session_busy",
        "The session has steps in flight; restore its state once they are answered.",
        {"session_id": session_id},
    )


def wrong_length(field: str, expected: int, got: int) -> ApiError:
    code = "wrong_observation_length" if field == "observation" else "wrong_action_length"
    return ApiError(
        422,
        code,
        f"'{field}' must hold {expected} numbers, got {got}.",
        {"field": field, "expected": expected, "got": got},
    )


def non_finite(field: str) -> ApiError:
    return ApiError(
        422,
        "non_finite",
        f"'{field}' holds NaN or an infinite value (float32 range).",
        {"field": field},
    )


def out_of_range(field: str, values: Sequence[float], limit: float) -> ApiError:
    """A number of ``field`` beyond ``limit``: ``non_finite`` if it is NaN, infinite or beyond float32."""
    if not all(-FLOAT32_MAX <= v <= FLOAT32_MAX for v in values):
        return non_finite(field)
    return ApiError(
        422,
        "out_of_range",
        f"'{field}' holds a number beyond ±{limit:g}, more than the model can take in float32.",
        {"field": field, "limit": limit},
    )


# Pydantic error types -> our codes; anything not listed is a value outside its allowed range or set.
_MISSING = {"missing"}
_UNKNOWN = {"extra_forbidden"}
_NON_FINITE = {"finite_number"}


def _code_for(error_type: str) -> str:
    if error_type in _MISSING:
        return "missing_field"
    if error_type in _UNKNOWN:
        return "unknown_field"
    if error_type in _NON_FINITE:
        return "non_finite"
    if error_type.endswith(("_type", "_parsing")) or error_type in {
        "int_from_float",
        "model_attributes_type",
    }:
        return "wrong_type"
    return "invalid_value"


_MESSAGES = {
    "missing_field": "A required field is missing",
    "unknown_field": "The body has a field the API does not define",
    "non_finite": "A number is NaN or infinite",
    "wrong_type": "A field has the wrong type",
    "invalid_value": "A field has a value outside what the API allows",
}


def from_validation(exc: ValidationError) -> ApiError:
    """Map a pydantic validation failure to one of our codes."""
    return from_validation_errors(list(exc.errors(include_url=False, include_input=False)))


def from_validation_errors(raw: Sequence[Any]) -> ApiError:
    """Map pydantic error dicts to one ApiError; the first error decides the code, all are listed."""
    errors = [
        {
            "loc": ".".join(str(p) for p in e.get("loc", ())),
            "type": str(e.get("type")),
            "msg": str(e.get("msg")),
        }
        for e in raw
    ]
    if not errors:
        return ApiError(422, "invalid_value", "The request is not valid.")
    first = errors[0]
    if first["type"] == "json_invalid":
        return malformed_json(first["msg"].removeprefix("Invalid JSON: "))
    code = _code_for(first["type"])
    where = first["loc"] or "the body"
    return ApiError(422, code, f"{_MESSAGES[code]} ({where}: {first['msg']}).", {"errors": errors})
