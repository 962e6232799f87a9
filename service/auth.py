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
    key there gets 403. Viewer keys open the fleet page and its feed (:meth:`check_viewer`, which admin
    keys pass too) and nothing else: anywhere else a viewer key gets 403 ``viewer_key_read_only``.
    """

    def __init__(
        self, keys: list[str], admin_keys: list[str] | None = None, viewer_keys: list[str] | None = None
    ) -> None:
        self._keys = [key.encode() for key in dict.fromkeys(keys)]
        self._principals = {key: principal_of(key) for key in self._keys}
        self._admin = [key.encode() for key in dict.fromkeys(admin_keys or [])]
        self._viewer = [key.encode() for key in dict.fromkeys(viewer_keys or [])]

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
        self._refuse_viewer(given)
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
        given = _bearer(scope, api_key_scheme=api_key_scheme)
        match = _matches(given, self._keys)
        if match is None:
            self._refuse_viewer(given)
            raise unauthorized("The API key is not valid")
        return self._principals[match]

    @property
    def viewer_enabled(self) -> bool:
        return bool(self._viewer)

    @property
    def viewer_guarded(self) -> bool:
        """Whether the fleet page's feed needs a key: any key of any kind is configured."""
        return bool(self._keys or self._admin or self._viewer)

    def check_viewer(self, scope: Scope) -> None:
        """Let an admin or viewer key through (anyone, when no keys of any kind are configured); 403
        ``viewer_key_required`` for an API key, 401 otherwise."""
        if not self.viewer_guarded:
            return
        given = _bearer(scope, api_key_scheme=False)
        # Both sets compared in full, whichever matches: the time taken says nothing about which.
        admin, viewer = _matches(given, self._admin), _matches(given, self._viewer)
        if admin is not None or viewer is not None:
            return
        if _matches(given, self._keys) is not None:
            raise ServiceError(
                "viewer_key_required",
                "The fleet feed shows every key's sessions: it needs an admin or viewer key "
                "(TRMRL_ADMIN_KEYS, TRMRL_VIEWER_KEYS), not an API key.",
            )
        raise unauthorized("The admin or viewer key is not valid")

    def _refuse_viewer(self, given: bytes) -> None:
        """403 ``viewer_key_read_only`` for a viewer key: it reads the fleet page and nothing else."""
        if self._viewer and _matches(given, self._viewer) is not None:
            raise ServiceError(
                "viewer_key_read_only",
                "A viewer key opens the fleet page (/ui) and its feed (/v1/fleet) only.",
            )


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
