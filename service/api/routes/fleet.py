"""The fleet page: ``GET /ui`` (a static page shipped in the package) and its feed, ``GET /v1/fleet``.

The page is static HTML, CSS and JavaScript (``service/ui/static``; no CDN, no fonts, no build step):
it holds no data and is served to anyone. It polls the feed, which needs an admin or viewer key when
any key is configured (``Authenticator.check_viewer``); the page asks for one and keeps it in the
tab's ``sessionStorage``. The feed is computed by :class:`service.fleet.Fleet`.
"""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import RegistryDep, error_docs
from service.fleet import Fleet
from service.fleet_query import MAX_SESSIONS_LISTED, parse_query

router = APIRouter(tags=["fleet"])

FLEET_PATH = "/v1/fleet"

#: The page's files and their content types (nothing else under /ui is served).
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "fleet.css": "text/css; charset=utf-8",
    "fleet.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
#: The page may load only its own files and call only its own origin.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class ServiceFacts(BaseModel):
    uptime_s: float
    window_s: float = Field(description="Seconds the current figures (rates, percentiles, errors) span.")
    sample_interval_s: float = Field(description="Seconds between two readings of the counters.")
    draining: bool


class Totals(BaseModel):
    sessions: int
    actions_per_s: float
    requests_per_s: float
    errors_per_s: float
    device_bytes: int = Field(description="Weights and slot pools of every loaded version.")


class CacheRow(BaseModel):
    blocks_held: int = Field(description="Key/value cache blocks held by sessions (16 steps each).")
    blocks_free: int = Field(description="Blocks allocated and free for reuse.")
    budget_blocks: int | None = Field(description="The fixed budget (TRMRL_CACHE_MIB); null: it grows.")
    refused_steps: int = Field(description="Steps refused (503 cache_exhausted) since the version loaded.")


class ModelRow(BaseModel):
    model: str
    version: str
    task_family: str
    active: bool = Field(description="The version new sessions of the model get.")
    canary_share: float = Field(description="Share of new sessions this version gets as a canary.")
    sessions: int
    queued_steps: int
    actions_per_s: float
    forward_passes_per_s: float
    batch_mean: float | None
    batch_p50: float | None
    batch_p99: float | None
    queue_wait_mean_ms: float | None
    queue_wait_p50_ms: float | None
    queue_wait_p99_ms: float | None
    device_bytes: int
    steps_total: int
    reward_first20: float | None = Field(description="Mean reward for an episode's first 20 actions.")
    reward_after20: float | None = Field(description="Mean reward for later actions.")
    cache: CacheRow | None = Field(
        default=None, description="A trial-context model's key/value cache; null for other models."
    )


class RouteRow(BaseModel):
    route: str
    method: str
    count: int
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int


class ErrorRow(BaseModel):
    status: int = Field(description="The HTTP status of the replies.")
    route: str
    method: str
    count: int = Field(description="Replies in the window.")
    per_s: float
    total: int = Field(description="Replies since the service started.")


class DeviceRow(BaseModel):
    device: str
    allocated_bytes: int


class Series(BaseModel):
    at_s: list[float] = Field(
        description="One point per reading interval, oldest first: when it ended, in seconds since the "
        "service started (the last is the newest reading)."
    )
    actions_per_s: dict[str, list[float | None]] = Field(description="Per 'model@version'.")
    requests_per_s: list[float]
    errors_per_s: list[float]
    latency_p50_ms: list[float | None]
    latency_p99_ms: list[float | None]


class AdaptationCurve(BaseModel):
    model: str
    version: str
    first_episode: list[float | None] = Field(
        description="Mean reward for the action at step 1, 2, ... of a session's first episode."
    )
    later_episodes: list[float | None] = Field(description="The same over the session's later episodes.")
    first_rewards: int
    later_rewards: int


class SessionRow(BaseModel):
    id_prefix: str = Field(description="The session id's first 8 characters.")
    model: str
    version: str
    steps: int
    episodes: int
    last_return: float | None = Field(description="Return of the last finished episode.")
    episode_return: float | None = Field(description="Rewards so far in the current episode.")
    idle_s: float


class SessionFilter(BaseModel):
    model: str | None
    version: str | None


class RecentSessions(BaseModel):
    matching: int = Field(description="Sessions the filter matches (all resident ones without a filter).")
    limit: int
    filter: SessionFilter
    rows: list[SessionRow] = Field(description="The most recently active matching sessions, newest first.")


_V1, _V2 = "9b1d4e7a" + "0" * 56, "3fa1c2d9" + "0" * 56
_ROW = {
    "task_family": "halfcheetah-vel",
    "queued_steps": 0,
    "forward_passes_per_s": 310.0,
    "batch_mean": 3.9,
    "batch_p50": 4.0,
    "batch_p99": 8.0,
    "queue_wait_mean_ms": 0.21,
    "queue_wait_p50_ms": 0.15,
    "queue_wait_p99_ms": 1.9,
    "device_bytes": 39_124_992,
}
EXAMPLE: dict[str, Any] = {
    "service": {"uptime_s": 5120.4, "window_s": 10.0, "sample_interval_s": 1.0, "draining": False},
    "totals": {
        "sessions": 256,
        "actions_per_s": 1340.5,
        "requests_per_s": 1342.1,
        "errors_per_s": 0.1,
        "device_bytes": 78_249_984,
    },
    "models": [
        {
            **_ROW,
            "model": "halfcheetah-vel",
            "version": _V1,
            "active": True,
            "canary_share": 0.0,
            "sessions": 230,
            "actions_per_s": 1206.0,
            "steps_total": 4_120_311,
            "reward_first20": -0.41,
            "reward_after20": 0.93,
        },
        {
            **_ROW,
            "model": "halfcheetah-vel",
            "version": _V2,
            "active": False,
            "canary_share": 0.1,
            "sessions": 26,
            "actions_per_s": 134.5,
            "steps_total": 80_412,
            "reward_first20": -0.22,
            "reward_after20": 0.95,
        },
    ],
    "routes": [
        {
            "route": "/v1/act",
            "method": "POST",
            "count": 13405,
            "requests_per_s": 1340.5,
            "p50_ms": 1.4,
            "p99_ms": 7.9,
            "errors": 1,
        }
    ],
    "errors": [{"status": 409, "route": "/v1/act", "method": "POST", "count": 1, "per_s": 0.1, "total": 12}],
    "devices": [],
    "series": {
        "at_s": [5118.4, 5119.4, 5120.4],
        "actions_per_s": {f"halfcheetah-vel@{_V1}": [1190.0, 1212.0, 1206.0]},
        "requests_per_s": [1191.0, 1213.0, 1207.0],
        "errors_per_s": [0.0, 0.0, 1.0],
        "latency_p50_ms": [1.4, 1.3, 1.4],
        "latency_p99_ms": [7.1, 8.2, 7.9],
    },
    "adaptation": [
        {
            "model": "halfcheetah-vel",
            "version": _V1,
            "first_episode": [-1.2, -0.8, -0.5, None],
            "later_episodes": [-0.3, 0.4, 0.8, 0.9],
            "first_rewards": 690,
            "later_rewards": 4_020_000,
        }
    ],
    "sessions": {
        "matching": 256,
        "limit": 25,
        "filter": {"model": None, "version": None},
        "rows": [
            {
                "id_prefix": "5f0c2a91",
                "model": "halfcheetah-vel",
                "version": _V1,
                "steps": 612,
                "episodes": 4,
                "last_return": 183.2,
                "episode_return": 20.5,
                "idle_s": 0.1,
            }
        ],
    },
}


class FleetFeed(BaseModel):
    """What the fleet page shows: every loaded version, the traffic over the window, adaptation curves
    and the recent sessions."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE]})

    service: ServiceFacts
    totals: Totals
    models: list[ModelRow]
    routes: list[RouteRow]
    errors: list[ErrorRow]
    devices: list[DeviceRow]
    series: Series
    adaptation: list[AdaptationCurve]
    sessions: RecentSessions


_QUERY_DOC = [
    {
        "name": "model",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
        "description": "List only sessions of this loaded model (404 `unknown_model` otherwise).",
    },
    {
        "name": "version",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9a-f]{4,64}$"},
        "description": "List only sessions of this loaded version, or of the one version it is a prefix "
        "of (404 `unknown_version` otherwise).",
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_SESSIONS_LISTED, "default": 25},
        "description": "Most sessions listed.",
    },
]


@router.get(
    FLEET_PATH,
    response_model=FleetFeed,
    responses=error_docs(401, 403, 404, 422, 503),
    openapi_extra={"parameters": _QUERY_DOC},
)
async def fleet_feed(request: Request, registry: RegistryDep) -> Response:
    """The fleet page's feed: models and versions (active, canary share, sessions), actions/s, latency
    per route, batch sizes, queue wait, device memory and errors over the last seconds; adaptation curves
    per version; the most recently active sessions (filtered by ``model``, ``version``, ``limit``).

    With keys configured it needs an admin or viewer key; an API key gets 403 ``viewer_key_required``.
    A malformed filter gets 422 ``invalid_filter``.
    """
    request.app.state.auth.check_viewer(request.scope)
    query = parse_query(request.query_params.multi_items(), registry)
    fleet: Fleet = request.app.state.fleet
    return Response(
        fleet.feed_json(query), media_type="application/json", headers={"Cache-Control": "no-store"}
    )


@cache
def _asset(name: str) -> bytes:
    return resources.files("service.ui").joinpath("static", name).read_bytes()


@router.get("/ui", include_in_schema=False)
async def page() -> Response:
    """The fleet page (no data in it: it reads ``/v1/fleet``)."""
    return Response(_asset("index.html"), media_type=ASSETS["index.html"], headers=PAGE_HEADERS)


@router.get("/ui/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS:
        return Response(b"Not Found", status_code=404, media_type="text/plain")
    return Response(_asset(name), media_type=ASSETS[name], headers=PAGE_HEADERS)


def document(schema: dict[str, Any], *, keyed: bool, viewers: bool = False) -> None:
    """The feed's security in the OpenAPI document: an admin or viewer key, when any key is set. With
    viewer keys configured, every other keyed route may answer 403 ``viewer_key_read_only``."""
    paths = schema.get("paths", {})
    operation = paths.get(FLEET_PATH, {}).get("get")
    if operation is None:
        return
    operation["responses"]["200"].get("content", {}).pop("application/msgpack", None)  # JSON only
    if viewers:
        for path, item in paths.items():
            if path == FLEET_PATH or not path.startswith(("/v1/", "/act")):
                continue
            for other in item.values():
                responses = other.get("responses", {})
                refusal = responses.get("401") or responses.get("404")
                if "403" not in responses and refusal is not None:
                    responses["403"] = {
                        **copy.deepcopy(refusal),
                        "description": "Forbidden: a viewer key opens the fleet feed only "
                        "(`viewer_key_read_only`).",
                    }
    if not keyed:
        operation.pop("security", None)
        return
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["fleetKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An admin key (TRMRL_ADMIN_KEYS) or a viewer key (TRMRL_VIEWER_KEYS).",
    }
    operation["security"] = [{"fleetKey": []}]
