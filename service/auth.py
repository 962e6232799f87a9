"""API keys: who is calling, checked the same way on the fast path, the FastAPI routes and the streams.

A caller is identified by a *principal*: a short digest of its key, never the key itself, so that
session ownership can be stored (and written to the state directory) without writing secrets. With
no keys configured every caller is the anonymous principal ``None`` and sees every session.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import Scope

from service.errors import ApiError

_BEARER = b"bearer "
_API_KEY = b"api-key "


def principal_of(key: bytes) -> str:
    """The owner tag stored with a session created under ``key``."""
    return hashlib.sha256(key).hexdigest()[:24]


def unauthorized(reason: str) -> ApiError:
    return ApiError(401, "unauthorized", f"{reason}: send 'Authorization: Bearer <api key>'.")


class Authenticator:
    """The configured keys; :meth:`check` maps a request's headers to its principal or raises 401."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [key.encode() for key in dict.fromkeys(keys)]
        self._principals = {key: principal_of(key) for key in self._keys}

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, scope: Scope, *, api_key_scheme: bool = False) -> str | None:
        """The caller's principal (``None`` when keys are off); 401 ``unauthorized`` otherwise.

        ``api_key_scheme``: also accept ``Authorization: Api-Key <key>`` (the openpi client's header).
        """
        if not self._keys:
            return None
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        if header is None:
            raise unauthorized("This route needs an API key")
        lowered = header[:8].lower()
        if lowered.startswith(_BEARER):
            given = header[len(_BEARER) :].strip()
        elif api_key_scheme and lowered.startswith(_API_KEY):
            given = header[len(_API_KEY) :].strip()
        else:
            raise unauthorized("The Authorization header has an unsupported scheme")
        # Compare against every key, without stopping at a match: the time taken says nothing about
        # which key (or how much of one) matched.
        match: bytes | None = None
        for key in self._keys:
            if hmac.compare_digest(given, key):
                match = key
        if match is None:
            raise unauthorized("The API key is not valid")
        return self._principals[match]
