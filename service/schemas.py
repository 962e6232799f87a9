"""Request and response bodies of the v1 API (``PRODUCT.md`` is the contract; field names are exact).

Request models are strict: a string where a number belongs is a ``wrong_type`` error rather than a
silent conversion, and an unknown field is an ``unknown_field`` error rather than a silently ignored
typo (``"episode_star": true``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_LIMIT = 1 << 63
SessionId = Annotated[str, Field(min_length=1, max_length=128)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ActRequest(_Request):
    """One step of one session."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6",
                    "observation": [0.12, -0.40],
                    "reward": -0.83,
                    "episode_start": False,
                    "step": 7,
                }
            ]
        }
    )

    session_id: SessionId | None = None
    """The session to step; omitted: a session is created (with ``model`` or the default model)."""
    model: str | None = None
    """Model for the session created when ``session_id`` is omitted (ignored otherwise)."""
    observation: list[float]
    """The new observation, ``obs_dim`` numbers."""
    reward: float = 0.0
    """Reward received for the previous action (ignored at an episode start)."""
    episode_start: bool = False
    """``observation`` is the first of an episode."""
    step: Annotated[int, Field(ge=0)] | None = None
    """The client's step counter: the session's first act is step 0. Omitted: the next step."""
    applied_action: list[float] | None = None
    """What the robot really executed for the previous step, when it differs from the returned action."""


class ActResponse(BaseModel):
    """The action for one step."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6",
                    "step": 7,
                    "action": [0.031, -0.1],
                    "model_version": "3fa1c09be44d",
                    "server_timing_us": 812,
                }
            ]
        }
    )

    session_id: str
    step: int
    """The step this action answers (echoes the request's ``step`` when given)."""
    action: list[float]
    """Clipped to the model's action bounds."""
    model_version: str
    server_timing_us: int
    """Time the service spent on the request, from reading the body to the reply."""


class ErrorObject(BaseModel):
    code: str
    message: str
    detail: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    """Every error reply: ``{"error": {"code", "message", "detail"}}``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "step_conflict",
                        "message": "Step 9 does not follow the session's history: the next step is 8.",
                        "detail": {"expected_step": 8, "got_step": 9},
                    }
                }
            ]
        }
    )

    error: ErrorObject


class ActBatchRequest(_Request):
    """Many sessions' steps in one request (a simulator's tick)."""

    items: list[ActRequest]


class ActBatchResponse(BaseModel):
    """One entry per request item, in order: its action or its error."""

    items: list[ActResponse | ErrorBody]


class ModelInfo(BaseModel):
    """A loaded model."""

    name: str
    version: str
    """Content hash of the checkpoint (12 hex digits)."""
    task_family: str
    obs_dim: int
    act_dim: int
    action_low: list[float]
    action_high: list[float]
    window: int
    """N, the working memories a session holds."""
    memory_scope: Literal["episode", "trial"]
    metrics: dict[str, Any]
    """Evaluation metrics recorded in the checkpoint."""
    default: bool
    """Used when a request names no model."""


class ModelList(BaseModel):
    models: list[ModelInfo]


class CreateSessionRequest(_Request):
    """Options of a new session; every field may be omitted."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "point-nav", "deterministic": True}]})

    model: str | None = None
    """Model name (see ``/v1/models``); omitted: the default model."""
    deterministic: bool = True
    """``true``: actions are the policy mean; ``false``: samples drawn with the session's seed."""
    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)] | None = None
    """Seed of the session's exploration noise; omitted: a random one."""
    ttl_s: Annotated[float, Field(gt=0, le=30 * 86_400)] | None = None
    """Idle time before the session expires; omitted: the service default."""


class SessionInfo(BaseModel):
    """A session's counters and times."""

    session_id: str
    model: str
    model_version: str
    steps: int
    """Steps taken so far, which is also the next step's number."""
    episodes: int
    """Episodes started so far."""
    deterministic: bool
    seed: int
    ttl_s: float
    created_at: str
    """ISO 8601, UTC."""
    last_active_at: str
    """ISO 8601, UTC."""


class CreateSessionResponse(BaseModel):
    session_id: str
    model: ModelInfo
    ttl_s: float


class ResetRequest(_Request):
    """Start a new episode (the window is kept if the model's memory scope is ``trial``) or a new trial."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"scope": "trial"}]})

    scope: Literal["episode", "trial"] = "episode"


class Status(BaseModel):
    status: str
