"""The service's refusals: one exception type, a snake_case code, a sentence and details.

The core raises :class:`ServiceError` with a code and nothing else; which HTTP status (or stream
close) a code becomes is decided once, at the edge (:data:`service.api.errors.STATUS`), so every
transport reports the same code for the same problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FLOAT32_MAX = 3.4028234663852886e38


class ServiceError(Exception):
    """A request the service refuses: a snake_case code and a human sentence (and facts in ``detail``)."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail or {}

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return {"error": {"code": self.code, "message": self.message, "detail": self.detail}}


def unknown_model(name: str, known: list[str]) -> ServiceError:
    return ServiceError(
        "unknown_model", f"No model named {name!r} is loaded.", {"model": name, "known": known}
    )


def unknown_session(session_id: str) -> ServiceError:
    return ServiceError(
        "unknown_session",
        "No such session: it never existed, was deleted, expired or was evicted.",
        {"session_id": session_id},
    )


def step_conflict(expected: int, got: int) -> ServiceError:
    return ServiceError(
        "step_conflict",
        f"Step {got} does not follow the session's history: the next step is {expected} "
        f"(re-sending step {expected - 1} repeats its action).",
        {"expected_step": expected, "got_step": got},
    )


def capacity_exhausted(capacity: int) -> ServiceError:
    return ServiceError(
        "capacity_exhausted",
        "The model holds as many sessions as it can and none is idle long enough to evict; retry later.",
        {"max_sessions": capacity},
    )


def overloaded(limit: int) -> ServiceError:
    return ServiceError(
        "overloaded",
        f"The model has {limit} steps waiting for a forward pass, its limit; retry shortly.",
        {"max_queued_steps": limit},
    )


def draining() -> ServiceError:
    return ServiceError(
        "draining", "The service is shutting down and takes no new sessions; retry elsewhere."
    )


def model_version_mismatch(model: str, expected: str, got: str) -> ServiceError:
    return ServiceError(
        "model_version_mismatch",
        f"The snapshot was taken with version {got} of model {model!r}; this service runs {expected}.",
        {"model": model, "expected_version": expected, "got_version": got},
    )


def invalid_snapshot(reason: str, detail: dict[str, Any] | None = None) -> ServiceError:
    return ServiceError("invalid_snapshot", f"The snapshot does not fit the model: {reason}.", detail)


def context_full(session_id: str, max_context: int) -> ServiceError:
    return ServiceError(
        "context_full",
        f"The session's trial is full: its context holds max_context={max_context} working memories and "
        "a trial-context policy does not slide. The step was not taken and the session is unchanged; "
        "a trial reset (POST /v1/sessions/{id}/reset with scope 'trial') starts the trial again.",
        {"session_id": session_id, "max_context": max_context},
    )


def cache_exhausted(blocks: int, needed: int | None = None) -> ServiceError:
    """A trial-context model's fixed key/value cache budget (``TRMRL_CACHE_MIB``) has no free block."""
    detail: dict[str, Any] = {"cache_blocks": blocks}
    if needed is not None:
        detail["needed_blocks"] = needed
    return ServiceError(
        "cache_exhausted",
        f"The model's key/value cache (a fixed budget of {blocks} blocks) has no free block for this; "
        "nothing was taken and the session is unchanged. Blocks come back as sessions end or reset "
        "their trials: retry shortly.",
        detail,
    )


def session_busy(session_id: str) -> ServiceError:
    return ServiceError(
        "session_busy",
        "The session has steps in flight; restore its state once they are answered.",
        {"session_id": session_id},
    )


def wrong_length(field: str, expected: int, got: int) -> ServiceError:
    code = "wrong_observation_length" if field == "observation" else "wrong_action_length"
    return ServiceError(
        code,
        f"'{field}' must hold {expected} numbers, got {got}.",
        {"field": field, "expected": expected, "got": got},
    )


def non_finite(field: str) -> ServiceError:
    return ServiceError(
        "non_finite",
        f"'{field}' holds NaN or an infinite value (float32 range).",
        {"field": field},
    )


def out_of_range(field: str, values: Sequence[float], limit: float) -> ServiceError:
    """A number of ``field`` beyond ``limit``: ``non_finite`` if it is NaN, infinite or beyond float32."""
    if not all(-FLOAT32_MAX <= v <= FLOAT32_MAX for v in values):
        return non_finite(field)
    return ServiceError(
        "out_of_range",
        f"'{field}' holds a number beyond ±{limit:g}, more than the model can take in float32.",
        {"field": field, "limit": limit},
    )


def checked_against_default(error: ServiceError, model: str, loaded: list[str]) -> ServiceError:
    """``error`` of a step that named neither a session nor a model: say which model it was checked
    against (the default) and how to choose another."""
    if error.code not in ("wrong_observation_length", "wrong_action_length"):
        return error
    others = ", ".join(repr(name) for name in loaded if name != model)
    choose = f"name one of {others} in 'model'" if others else "see GET /v1/models"
    return ServiceError(
        error.code,
        f"{error.message.removesuffix('.')} for the default model {model!r} (the request names no "
        f"model); {choose}, or GET /v1/models for each model's sizes.",
        {**error.detail, "model": model, "models": loaded},
    )
