"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=schemathesis_hooks``): MessagePack both ways.

Bodies are encoded and replies decoded by the codec client and service share, so the MessagePack
variant of every operation is generated, sent and validated against the document like JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import schemathesis
from trmrl_client.codec import CodecError, packb, unpackb


def _map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` with ``leaf`` applied to everything in it that is neither a dict nor a list."""
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_leaves(v, leaf) for v in value]
    return leaf(value)


def _fits(value: Any) -> Any:
    """``value`` with integers beyond 64 bits as floats: MessagePack has no wider integer, and a
    generated value of any size is schema-valid where the document sets no bound (a batch item)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < 1 << 64:
        return float(value) if abs(value) < 1 << 1023 else math.copysign(math.inf, value)
    return value


@schemathesis.serializer("application/msgpack")
def _encode(ctx: Any, value: Any) -> bytes:
    return packb(_map_leaves(value, _fits))


def _plain(value: Any) -> Any:
    """Decoded arrays (a columnar reply's) as lists, as the document describes them; a failed row's
    NaN actions are ``null``, as JSON writes them (JSON Schema has no NaN)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            return np.where(np.isnan(value), None, value.astype(object)).tolist()
        return value.tolist()
    return value


@schemathesis.deserializer("application/msgpack")
def _decode(ctx: Any, response: Any) -> Any:
    try:
        return _map_leaves(unpackb(response.content), _plain)
    except CodecError as exc:
        raise ValueError(f"the reply is not valid MessagePack: {exc}") from None


@schemathesis.hook
def map_body(ctx: Any, body: Any) -> Any:
    """A columnar tick whose columns have as many rows as it names sessions.

    That rule is in the document's description, not its schema (JSON Schema cannot state it), so the
    generator is told here; every other part of the tick stays as generated.
    """
    if not (
        isinstance(body, dict) and isinstance(body.get("session_ids"), list) and body.get("observations")
    ):
        return body
    rows = min(len(body["session_ids"]), len(body["observations"]))
    fixed = {}
    for key, value in body.items():
        if isinstance(value, list) and key != "model":
            if len(value) < rows:
                continue  # an optional column too short to repair is left out
            value = value[:rows]
        fixed[key] = value
    return fixed
