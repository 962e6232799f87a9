"""API keys: who is calling, checked the same way on the fast path, the FastAPI routes and the streams.

A caller is identified by a *principal*: a short digest of its key, never the key itself, so that
session ownership can be stored (and written to the state directory) without writing secrets. With
no keys configured every caller is the anonymous principal ``None`` and sees every session.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import Scope

from service.core.errors import ServiceError

_BEARER = b"bearer "
_API_KEY = b"api-key "


def principal_of(key: bytes) -> str:
    """The owner tag stored with a session created under ``key``."""
    return hashlib.sha256(key).hexdigest()[:24]


def unauthorized(reason: str) -> ServiceError:
    return ServiceError("unauthorized", f"{reason}: send 'Authorization: Bearer <api key>'.")


class Authenticator:
    """The configured keys; :meth:`check` maps a request's headers to its principal or raises 401.

    Admin keys (:meth:`check_admin`) are a separate set: they open the admin routes only, and a user
    key there gets 403.
    """

    def __init__(self, keys: list[str], admin_keys: list[str] | None = None) -> None:
        self._keys = [key.encode() for key in dict.fromkeys(keys)]
        self._principals = {key: principal_of(key) for key in self._keys}
        self._admin = [key.encode() for key in dict.fromkeys(admin_keys or [])]

    @property
    def admin_enabled(self) -> bool:
        return bool(self._admin)

    def check_admin(self, scope: Scope) -> None:
        """Let an admin key through; 404 when no admin keys are set (the routes do not exist), 403 for
        a user key, 401 otherwise."""
        if not self._admin:
            raise ServiceError("not_found", "Not Found")
        given = _bearer(scope, api_key_scheme=False)
        if _matches(given, self._admin) is not None:
            return
        if _matches(given, self._keys) is not None:
            raise ServiceError("forbidden", "This route needs an admin key; an API key does not open it.")
        raise unauthorized("The admin key is not valid")

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, scope: Scope, *, api_key_scheme: bool = False) -> str | None:
        """The caller's principal (``None`` when keys are off); 401 ``unauthorized`` otherwise.

        ``api_key_scheme``: also accept ``Authorization: Api-Key <key>`` (the openpi client's header).
        """
        if not self._keys:
            return None
        match = _matches(_bearer(scope, api_key_scheme=api_key_scheme), self._keys)
        if match is None:
            raise unauthorized("The API key is not valid")
        return self._principals[match]


def _bearer(scope: Scope, *, api_key_scheme: bool) -> bytes:
    """The key in the ``Authorization`` header (401 when there is none)."""
    header = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            header = value
            break
    if header is None:
        raise unauthorized("This route needs an API key")
    lowered = header[:8].lower()
    if lowered.startswith(_BEARER):
        return header[len(_BEARER) :].strip()
    if api_key_scheme and lowered.startswith(_API_KEY):
        return header[len(_API_KEY) :].strip()
    raise unauthorized("The Authorization header has an unsupported scheme")


def _matches(given: bytes, keys: list[bytes]) -> bytes | None:
    """The key ``given`` equals, if any.

    Compares against every key, without stopping at a match: the time taken says nothing about which
    key (or how much of one) matched.
    """
    match: bytes | None = None
    for key in keys:
        if hmac.compare_digest(given, key):
            match = key
    return match
