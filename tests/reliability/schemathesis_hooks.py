"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=schemathesis_hooks``): MessagePack both ways.

Bodies are encoded and replies decoded by the codec client and service share, so the MessagePack
variant of every operation is generated, sent and validated against the document like JSON.
"""

from __future__ import annotations

import math
from typing import Any

import schemathesis
from trmrl_client.codec import CodecError, packb, unpackb


def _fits(value: Any) -> Any:
    """``value`` with integers beyond 64 bits as floats: MessagePack has no wider integer, and a
    generated value of any size is schema-valid where the document sets no bound (a batch item)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < 1 << 64:
        return float(value) if abs(value) < 1 << 1023 else math.copysign(math.inf, value)
    if isinstance(value, dict):
        return {k: _fits(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fits(v) for v in value]
    return value


@schemathesis.serializer("application/msgpack")
def _encode(ctx: Any, value: Any) -> bytes:
    return packb(_fits(value))


@schemathesis.deserializer("application/msgpack")
def _decode(ctx: Any, response: Any) -> Any:
    try:
        return unpackb(response.content)
    except CodecError as exc:
        raise ValueError(f"the reply is not valid MessagePack: {exc}") from None
