"""The columnar form of a tick: many sessions' steps as arrays, checked in numpy in one pass.

``POST /v1/act/batch`` and the vectorised stream (``WS /v1/stream``) take a tick as columns::

    {"model"?, "session_ids": [B], "observations": [B, obs_dim], "rewards"?: [B],
     "episode_starts"?: [B], "steps"?: [B], "applied_actions"?: [B, act_dim]}

In MessagePack each array is a msgpack-numpy map, decoded by the shared codec with one
``np.frombuffer`` (object dtypes refused, nothing unpickled); in JSON, or as plain MessagePack lists,
it is a nested list. Either way it becomes one numpy array per column here, and is refused as a
whole (a 4xx for the request or the frame) when the tick itself is malformed: a missing or unknown
field, a wrong dtype or shape, columns of different lengths, a session named twice. Problems of
single rows -- a NaN, an unknown session, a step conflict -- are the core's to report row by row;
see :func:`service.core.acting.act_columnar`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.core.errors import ServiceError
from service.core.records import ColumnarResult, ColumnarTick

#: Every field of a columnar tick; ``session_ids`` and ``observations`` are required.
FIELDS = ("model", "session_ids", "observations", "rewards", "episode_starts", "steps", "applied_actions")
_NUMBER_KINDS = "iuf"
#: Step numbers far beyond any session's life; keeps the engine's int64 arithmetic exact.
MAX_STEP = 1 << 62


def columnar_body(result: ColumnarResult, *, arrays: bool) -> dict[str, Any]:
    """The reply's fields: numpy arrays (``arrays``, for MessagePack) or nested lists (JSON).

    JSON has no NaN, so a failed row's actions are ``null`` there (MessagePack carries NaN).
    """
    errors = [{"row": row, **error.body()} for row, error in result.errors]
    if arrays:
        steps: Any = result.steps
        actions: Any = result.actions
    else:
        steps = result.steps.tolist()
        actions = result.actions.tolist()
        for row, _ in result.errors:
            actions[row] = [None] * result.actions.shape[1]
    body = {
        "session_ids": result.session_ids,
        "steps": steps,
        "actions": actions,
        "model_version": result.model_version,
        "server_timing_us": result.server_timing_us,
        "errors": errors,
    }
    if result.model_versions is not None:
        body["model_versions"] = result.model_versions
    return body


def is_columnar(data: Any) -> bool:
    """Whether a decoded body is a columnar tick (rather than ``{"items": [...]}``)."""
    return (
        isinstance(data, dict) and "items" not in data and ("session_ids" in data or "observations" in data)
    )


def _refuse(code: str, message: str, **detail: Any) -> ServiceError:
    return ServiceError(code, message, detail)


def _column(data: dict[str, Any], name: str, rows: int, ndim: int, kinds: str) -> np.ndarray | None:
    """Column ``name`` as an array of ``rows`` rows and ``ndim`` dimensions, or ``None`` if absent."""
    value = data.get(name)
    if value is None or (isinstance(value, list) and not value and name != "observations"):
        return None  # an optional column left empty is a column not sent
    if isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, list):
        try:
            array = np.asarray(value)
        except ValueError:
            raise _refuse(
                "wrong_shape", f"'{name}' is ragged: its rows differ in length.", field=name
            ) from None
    else:
        raise _refuse("wrong_type", f"'{name}' must be an array, got {type(value).__name__}.", field=name)
    if array.dtype.kind not in kinds:
        want = "booleans" if kinds == "b" else "integers" if kinds == "iu" else "numbers"
        raise _refuse(
            "wrong_type",
            f"'{name}' must hold {want}, got dtype {array.dtype.str!r}.",
            field=name,
            dtype=array.dtype.str,
        )
    if array.ndim != ndim:
        raise _refuse(
            "wrong_shape",
            f"'{name}' must have {ndim} dimension(s), got shape {list(array.shape)}.",
            field=name,
            shape=list(array.shape),
        )
    if array.shape[0] != rows:
        raise _refuse(
            "length_mismatch",
            f"'{name}' has {array.shape[0]} rows but 'session_ids' names {rows} sessions.",
            field=name,
            expected=rows,
            got=int(array.shape[0]),
        )
    return array


def _all_ids(ids: list[Any]) -> bool:
    """Every entry a string of 1 to 128 characters (in C loops: this runs for thousands of ids)."""
    if not ids:
        return True
    if set(map(type, ids)) != {str}:
        return False
    lengths = set(map(len, ids))
    return min(lengths) > 0 and max(lengths) <= 128


def decode_columnar(data: dict[str, Any]) -> ColumnarTick:
    """Check a decoded columnar body as a whole; raises :class:`ServiceError` (422) for a malformed tick."""
    unknown = [key for key in data if key not in FIELDS]
    if unknown:
        raise _refuse(
            "unknown_field",
            f"The body has a field the API does not define: {unknown[0]!r}.",
            field=unknown[0],
        )
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise _refuse("wrong_type", "'model' must be a string.", field="model")
    ids = data.get("session_ids")
    if ids is None:
        raise _refuse("missing_field", "'session_ids' is required.", field="session_ids")
    if not isinstance(ids, list) or not _all_ids(ids):
        raise _refuse(
            "wrong_type",
            "'session_ids' must be a list of session ids (1 to 128 characters).",
            field="session_ids",
        )
    rows = len(ids)
    if rows == 0:
        raise _refuse("invalid_value", "'session_ids' must name at least one session.", field="session_ids")
    if len(set(ids)) != rows:
        seen: set[str] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise _refuse(
            "duplicate_session",
            f"Session {twice} appears twice in one tick; a tick holds one step per session.",
            session_id=twice,
        )
    if data.get("observations") is None:
        raise _refuse("missing_field", "'observations' is required.", field="observations")
    observations = _column(data, "observations", rows, 2, _NUMBER_KINDS)
    assert observations is not None
    steps = _column(data, "steps", rows, 1, "iuf")
    if steps is not None and steps.dtype.kind == "f":
        # JSON Schema's integers include 4.0 (as for one session's ``step``); 4.5 is no step number.
        if not (np.isfinite(steps).all() and (steps == np.floor(steps)).all()):
            raise _refuse("wrong_type", "'steps' must hold integers.", field="steps", dtype=steps.dtype.str)
        if steps.size and float(np.abs(steps).max()) >= MAX_STEP:
            raise _refuse("invalid_value", "'steps' holds a step number out of range.", field="steps")
        steps = steps.astype(np.int64)
    if steps is not None:
        if steps.dtype.kind == "u" and steps.size and int(steps.max()) >= MAX_STEP:
            raise _refuse("invalid_value", "'steps' holds a step number out of range.", field="steps")
        steps = steps.astype(np.int64, copy=False)
        if steps.size and (int(steps.min()) < 0 or int(steps.max()) >= MAX_STEP):
            raise _refuse("invalid_value", "'steps' must hold step numbers >= 0.", field="steps")
    return ColumnarTick(
        session_ids=ids,
        observations=observations,
        rewards=_column(data, "rewards", rows, 1, _NUMBER_KINDS),
        episode_starts=_column(data, "episode_starts", rows, 1, "b"),
        steps=steps,
        applied_actions=_column(data, "applied_actions", rows, 2, _NUMBER_KINDS),
        model=model,
    )
