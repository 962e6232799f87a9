"""A safe MessagePack codec for numpy arrays, shared by the client and the service.

Arrays travel either as plain lists or as the msgpack-numpy map used across the robot-policy
ecosystem (openpi-client)::

    {"__ndarray__": True, "data": <raw bytes>, "dtype": "<f4", "shape": [2, 3]}

Only numeric and boolean dtypes are accepted. Object dtypes are refused, and nothing is ever
unpickled, so a hostile peer can at worst send wrong numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_ALLOWED_KINDS = frozenset("biuf")  # bool, signed, unsigned, float

INPUT_LIMIT = 1e6
"""The largest magnitude of a number that enters a session's memory (observation, reward, action).

The forward pass squares activations, so inputs from about 1e18 on overflow float32 and a session's
actions turn NaN for as long as that step stays in its window; 1e6 leaves twelve orders of magnitude
for the observation statistics' scale, and no sensor or reward comes near it. The one rule client
and service share: a number the client accepts, the service accepts.
"""


class CodecError(ValueError):
    """A payload that cannot be decoded safely; the message says why.

    Example:
        >>> unpackb(packb({"__ndarray__": True, "data": b"", "dtype": "|O", "shape": [0]}))
        Traceback (most recent call last):
        ...
        trmrl_client.codec.CodecError: dtype '|O' is not allowed (numeric and boolean arrays only)
    """


def _check_dtype(dtype: np.dtype[Any]) -> None:
    if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject:
        raise CodecError(f"dtype {dtype.str!r} is not allowed (numeric and boolean arrays only)")


def _encode_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return {
            b"__ndarray__": True,
            b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": list(obj.shape),
        }
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _decode_hook(obj: dict[Any, Any]) -> Any:
    marker = obj.get(b"__ndarray__", obj.get("__ndarray__"))
    if marker is None:
        return obj
    get = lambda key: obj.get(key.encode(), obj.get(key))  # noqa: E731 -- bytes or str keys
    data, dtype_str, shape = get("data"), get("dtype"), get("shape")
    if not isinstance(data, bytes) or not isinstance(dtype_str, str) or not isinstance(shape, list | tuple):
        raise CodecError("malformed array: needs bytes 'data', a string 'dtype' and a list 'shape'")
    try:
        dtype = np.dtype(dtype_str)
    except TypeError as exc:
        raise CodecError(f"unknown dtype {dtype_str!r}") from exc
    _check_dtype(dtype)
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CodecError(f"malformed array shape {shape!r}")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise CodecError(
            f"array data holds {len(data)} bytes, shape {list(shape)} of {dtype.str} needs "
            f"{count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def within_limit(values: Any) -> np.ndarray:
    """Which values (last axis reduced: which rows) are numbers within ``INPUT_LIMIT``.

    Example:
        >>> within_limit(np.array([[0.0, 2e6], [1.0, -3.0]])).tolist()
        [False, True]
        >>> within_limit(np.array([1.0, float("nan")])).tolist()
        [True, False]
    """
    array = np.asarray(values)
    ok = np.abs(array) <= INPUT_LIMIT  # NaN compares False
    return np.asarray(ok.all(axis=-1) if ok.ndim > 1 else ok)


def jsonable(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with its numpy arrays (a columnar tick's) as nested lists, for JSON.

    Example:
        >>> jsonable({"steps": np.arange(2), "model": "m"})
        {'steps': [0, 1], 'model': 'm'}
    """
    if not any(isinstance(v, np.ndarray) for v in body.values()):
        return body
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in body.items()}


def packb(obj: Any) -> bytes:
    """Encode ``obj`` (dicts, lists, numbers, strings, numpy arrays) as MessagePack.

    Example:
        >>> unpackb(packb({"observation": np.zeros(3, np.float32)}))["observation"].tolist()
        [0.0, 0.0, 0.0]
    """
    import msgpack

    packed: bytes = msgpack.packb(obj, default=_encode_hook, use_bin_type=True)
    return packed


def unpackb(data: bytes, *, max_bytes: int = 16 * 1024 * 1024) -> Any:
    """Decode MessagePack safely: arrays become numpy arrays, anything unsafe raises :class:`CodecError`.

    Example:
        >>> unpackb(packb({"steps": np.arange(3)}))["steps"].tolist()
        [0, 1, 2]
    """
    import msgpack

    if len(data) > max_bytes:
        raise CodecError(f"payload of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return msgpack.unpackb(
            data,
            object_hook=_decode_hook,
            raw=False,
            strict_map_key=False,
        )
    except CodecError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CodecError(f"malformed MessagePack: {exc}") from exc
