"""Errors at the edge: the one table from a refusal's code to its HTTP status, and the refusals that only
the wire can cause (a body that is not JSON, too large, of an unknown type, or that fails its schema).

Below the API a refusal is a :class:`~service.core.errors.ServiceError` with a code and no status;
every reply -- an HTTP response, a stream's error frame, a row of a columnar answer -- takes its
status from :data:`STATUS` here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from service.core.errors import ServiceError

#: Every code the service answers with, and its HTTP status.
STATUS: dict[str, int] = {
    # The request itself is unreadable.
    "malformed_json": 400,
    "malformed_msgpack": 400,
    "bad_content_length": 400,
    "unsupported_frame": 400,
    # Who may ask.
    "unauthorized": 401,
    "forbidden": 403,
    "forbidden_path": 403,
    "viewer_key_required": 403,
    "viewer_key_read_only": 403,
    # What it names does not exist.
    "not_found": 404,
    "unknown_model": 404,
    "unknown_version": 404,
    "unknown_session": 404,
    "unknown_checkpoint": 404,
    "method_not_allowed": 405,
    # It conflicts with the state of the service.
    "step_conflict": 409,
    "session_busy": 409,
    "context_full": 409,
    "model_mismatch": 409,
    "model_version_mismatch": 409,
    "incompatible_model": 409,
    "version_exists": 409,
    "version_in_use": 409,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    # It is well formed but not valid.
    "missing_field": 422,
    "unknown_field": 422,
    "wrong_type": 422,
    "invalid_value": 422,
    "non_finite": 422,
    "out_of_range": 422,
    "wrong_observation_length": 422,
    "wrong_action_length": 422,
    "wrong_shape": 422,
    "length_mismatch": 422,
    "duplicate_session": 422,
    "invalid_snapshot": 422,
    "invalid_checkpoint": 422,
    "recording_disabled": 422,
    "invalid_filter": 422,
    # The service cannot take it now.
    "capacity_exhausted": 429,
    "internal_error": 500,
    "overloaded": 503,
    "draining": 503,
    "not_ready": 503,
    "busy": 503,
    "cache_exhausted": 503,
}


def status_of(error: ServiceError) -> int:
    """The HTTP status of a refusal (``http_<status>`` codes carry theirs; an unlisted code is a 500)."""
    status = STATUS.get(error.code)
    if status is not None:
        return status
    if error.code.startswith("http_") and error.code[5:].isdigit():
        return int(error.code[5:])
    return 500


def internal_error() -> ServiceError:
    return ServiceError("internal_error", "The service failed on this request.")


def malformed_json(reason: str) -> ServiceError:
    return ServiceError("malformed_json", f"The request body is not valid JSON: {reason}.")


def malformed_msgpack(reason: str) -> ServiceError:
    return ServiceError("malformed_msgpack", f"The request body is not valid MessagePack: {reason}.")


def body_too_large(limit: int) -> ServiceError:
    return ServiceError(
        "body_too_large", f"The request body exceeds the limit of {limit} bytes.", {"max_bytes": limit}
    )


def unsupported_media_type(content_type: str) -> ServiceError:
    return ServiceError(
        "unsupported_media_type",
        f"Content type {content_type!r} is not supported; send application/json or application/msgpack.",
        {"content_type": content_type},
    )


def not_a_map(data: Any) -> ServiceError:
    return ServiceError("wrong_type", "The body must be a map of fields.", {"got": type(data).__name__})


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


def from_validation(exc: ValidationError) -> ServiceError:
    """Map a pydantic validation failure to one of our codes."""
    return from_validation_errors(list(exc.errors(include_url=False, include_input=False)))


def from_validation_errors(raw: Sequence[Any]) -> ServiceError:
    """Map pydantic error dicts to one refusal; the first error decides the code, all are listed."""
    errors = [
        {
            "loc": ".".join(str(p) for p in e.get("loc", ())),
            "type": str(e.get("type")),
            "msg": str(e.get("msg")),
        }
        for e in raw
    ]
    if not errors:
        return ServiceError("invalid_value", "The request is not valid.")
    first = errors[0]
    if first["type"] == "json_invalid":
        return malformed_json(first["msg"].removeprefix("Invalid JSON: "))
    code = _code_for(first["type"])
    where = first["loc"] or "the body"
    return ServiceError(code, f"{_MESSAGES[code]} ({where}: {first['msg']}).", {"errors": errors})
