"""The service's routes the client uses, named once: every path the client sends to is built here.

A flow asks a :class:`Route` for its :class:`~trmrl_client.protocol.Call`; a transport reads the route
off the call (is it an act? may its body travel as MessagePack? does it go over a stream?) instead of
matching path strings.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    """One route of the service: method, path template and what may travel on it.

    Example:
        >>> SESSION_STATE.path(session_id="abc")
        '/v1/sessions/abc/state'
        >>> (ACT.binary, MODELS.binary)
        (True, False)
    """

    name: str
    method: str
    template: str
    binary: bool = False
    """Its bodies may travel as MessagePack (``encoding="msgpack"``); others are always JSON."""

    def path(self, **params: str) -> str:
        """The path with its ``{...}`` parameters filled in (as given: session ids are URL-safe);
        parameters the template does not name are ignored."""
        return self.template.format(**params)


READY = Route("ready", "GET", "/readyz")
MODELS = Route("models", "GET", "/v1/models")
CREATE_SESSIONS = Route("create_sessions", "POST", "/v1/sessions")
SESSION_INFO = Route("session_info", "GET", "/v1/sessions/{session_id}")
DELETE_SESSION = Route("delete_session", "DELETE", "/v1/sessions/{session_id}")
RESET = Route("reset", "POST", "/v1/sessions/{session_id}/reset")
SESSION_STATE = Route("session_state", "GET", "/v1/sessions/{session_id}/state")
RESTORE_STATE = Route("restore_state", "PUT", "/v1/sessions/{session_id}/state")
ACT = Route("act", "POST", "/v1/act", binary=True)
ACT_ITEMS = Route("act_items", "POST", "/v1/act/batch", binary=True)
"""The batch of items (``{"items": [...]}``): several sessions, or one session's steps in order."""
ACT_COLUMNAR = Route("act_columnar", "POST", "/v1/act/batch", binary=True)
"""The columnar batch (``session_ids``, ``observations [B, obs_dim]``, ...): one tick of a vector."""
SESSION_STREAM = Route("session_stream", "GET", "/v1/sessions/{session_id}/stream")
"""WebSocket: one session's steps, one frame each."""
VECTOR_STREAM = Route("vector_stream", "GET", "/v1/stream")
"""WebSocket (query ``model``): columnar ticks of many sessions, one frame each."""


def websocket_url(base_url: str) -> str:
    """The ``ws://``/``wss://`` form of the service's base URL.

    Example:
        >>> websocket_url("https://policy.example:8443")
        'wss://policy.example:8443'
    """
    return base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
