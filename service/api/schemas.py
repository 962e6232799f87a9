"""Request and response bodies of the v1 API (``PRODUCT.md`` is the contract; field names are exact).

Request models are strict: a string where a number belongs is a ``wrong_type`` error rather than a
silent conversion, and an unknown field is an ``unknown_field`` error rather than a silently ignored
typo (``"episode_star": true``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.core import records
from service.core.records import SEED_LIMIT

#: The most sessions one ``POST /v1/sessions`` creates.
MAX_CREATE = 65_536
LAST_SECOND = 253_402_300_799.0  # 9999-12-31T23:59:59Z, the last instant an ISO 8601 date can show
SessionId = Annotated[str, Field(min_length=1, max_length=128)]


def _integral(value: object) -> object:
    """An integral float as its integer: JSON Schema's ``integer`` includes ``4.0``, strict mode would not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# The validator wraps the constrained type (rather than sitting beside the constraint) so that the
# constraints stay JSON Schema's ``minimum``/``exclusiveMaximum`` in the document. Counters are
# int64, as the session table holds them (and MessagePack carries no wider integer).
Count = Annotated[Annotated[int, Field(ge=0, lt=1 << 63)], BeforeValidator(_integral)]
Seed = Annotated[Annotated[int, Field(ge=0, lt=SEED_LIMIT)], BeforeValidator(_integral)]


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
    step: Count | None = None
    """The client's step counter: the session's first act is step 0. Omitted: the next step."""
    applied_action: list[float] | None = None
    """What the robot really executed for the previous step, when it differs from the returned action."""


class StreamFrame(_Request):
    """One step on a session's stream: an act request without ``session_id`` (the stream names it)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"observation": [0.12, -0.4], "reward": -0.83, "step": 7}]}
    )

    observation: list[float]
    reward: float = 0.0
    episode_start: bool = False
    step: Count | None = None
    applied_action: list[float] | None = None


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

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "session_id": "4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6",
                            "observation": [0.12, -0.4],
                            "step": 7,
                        },
                        {
                            "session_id": "9d2e7c41aa0b4f6e8c3b1d5f7a9e0c2b",
                            "observation": [0.5, 0.1],
                            "step": 3,
                        },
                    ]
                }
            ]
        }
    )

    items: list[ActRequest]


class ActBatchResponse(BaseModel):
    """One entry per request item, in order: its action or its error."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "session_id": "4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6",
                            "step": 7,
                            "action": [0.031, -0.1],
                            "model_version": "3fa1c09be44d",
                            "server_timing_us": 640,
                        },
                        {
                            "error": {
                                "code": "unknown_session",
                                "message": "No such session: it was deleted, expired or evicted.",
                                "detail": {"session_id": "9d2e7c41aa0b4f6e8c3b1d5f7a9e0c2b"},
                            }
                        },
                    ]
                }
            ]
        }
    )

    items: list[ActResponse | ErrorBody]


_IDS: list[Any] = ["4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6", "9d2e7c41aa0b4f6e8c3b1d5f7a9e0c2b"]


class ActColumnarRequest(_Request):
    """A tick of many sessions as columns: row ``i`` of every array belongs to ``session_ids[i]``.

    Every column sent has as many rows as ``session_ids`` (an optional column sent empty counts as
    not sent).

    In MessagePack every array may be a msgpack-numpy map (``{"__ndarray__": true, "data": <bytes>,
    "dtype": "<f4", "shape": [B, obs_dim]}``), decoded without copying through lists; object dtypes
    are refused. A malformed tick (a missing or unknown field, a wrong dtype or shape, columns of
    different lengths, a session named twice) is refused whole with 422; rows that fail on their own
    are reported in the reply's ``errors``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_ids": _IDS,
                    "observations": [[0.12, -0.4], [0.5, 0.1]],
                    "rewards": [-0.83, -0.2],
                    "episode_starts": [False, False],
                    "steps": [7, 3],
                }
            ]
        }
    )

    model: str | None = None
    """The model of the sessions; omitted: the model of the first session named."""
    session_ids: Annotated[list[SessionId], Field(min_length=1)]
    """B distinct sessions."""
    observations: list[list[float]]
    """``[B, obs_dim]`` float32."""
    rewards: list[float] | None = None
    """``[B]``: the reward each session received for its previous action."""
    episode_starts: list[bool] | None = None
    """``[B]``: the observation is the first of an episode."""
    steps: list[Annotated[int, Field(ge=0)]] | None = None
    """``[B]``: each session's step counter (idempotent retries, as for one session)."""
    applied_actions: list[list[float]] | None = None
    """``[B, act_dim]``: what each robot really executed for its previous step."""


class RowError(BaseModel):
    """The error of one row of a columnar tick."""

    row: int
    error: ErrorObject


class ActColumnarResponse(BaseModel):
    """The columnar reply: ``actions[i]`` answers ``session_ids[i]``; failed rows are in ``errors``
    and their actions are NaN (MessagePack) or ``null`` (JSON)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_ids": _IDS,
                    "steps": [7, 3],
                    "actions": [[0.031, -0.1], [None, None]],
                    "model_version": "3fa1c09be44d",
                    "server_timing_us": 95,
                    "errors": [
                        {
                            "row": 1,
                            "error": {
                                "code": "step_conflict",
                                "message": "Step 3 is behind the session: the next step is 4.",
                                "detail": {"expected_step": 4, "got_step": 3},
                            },
                        }
                    ],
                }
            ]
        }
    )

    session_ids: list[str]
    steps: list[int]
    """The step each row answers (a failed row echoes the request's step, or -1)."""
    actions: list[list[float | None]]
    """``[B, act_dim]`` float32, clipped to the model's action bounds."""
    model_version: str
    server_timing_us: int
    errors: list[RowError]
    model_versions: list[str] | None = None
    """Each row's model version, present only when the sessions were on more than one version."""


_MODEL_EXAMPLE: dict[str, Any] = {
    "name": "point-nav",
    "version": "3fa1c09be44d",
    "task_family": "point-nav",
    "obs_dim": 2,
    "act_dim": 2,
    "action_low": [-1.0, -1.0],
    "action_high": [1.0, 1.0],
    "window": 5,
    "memory_scope": "episode",
    "policy": "trmrl",
    "task_params_in_obs": False,
    "metrics": {"test/return": -8.0},
    "default": True,
}


class ModelInfo(BaseModel):
    """A loaded model."""

    model_config = ConfigDict(json_schema_extra={"examples": [_MODEL_EXAMPLE]})

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
    policy: Literal["trmrl", "rl2"] = "trmrl"
    """The network: ``trmrl`` (a transformer over the last ``window`` working memories) or ``rl2`` (the
    recurrent baseline: a session's memory is its hidden state; its ``window`` is 1)."""
    task_params_in_obs: bool
    """True for an oracle reference: each observation must end with the task's parameters."""
    metrics: dict[str, Any]
    """Evaluation metrics recorded in the checkpoint."""
    default: bool
    """Used when a request names no model."""
    active: bool = True
    """This version gets the model's new sessions (the others serve the sessions still on them)."""
    canary_share: float = 0.0
    """Share of the model's new sessions this version gets as a canary (0: none)."""


def model_info(info: records.ModelInfo) -> ModelInfo:
    """The body of the core's facts about a model."""
    return ModelInfo.model_validate(info, from_attributes=True)


class ModelList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"models": [_MODEL_EXAMPLE]}]})

    models: list[ModelInfo]


class CreateSessionRequest(_Request):
    """Options of a new session; every field may be omitted."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "point-nav", "deterministic": True}]})

    model: str | None = None
    """Model name (see ``/v1/models``); omitted: the default model."""
    deterministic: bool = True
    """``true``: actions are the policy mean; ``false``: samples drawn with the session's seed."""
    seed: Seed | None = None
    """Seed of the session's exploration noise; omitted: a random one."""
    ttl_s: Annotated[float, Field(gt=0, le=30 * 86_400)] | None = None
    """Idle time before the session expires; omitted: the service default."""
    record: bool = False
    """Record every step of the session server-side (Parquet in ``TRMRL_RECORD_DIR``)."""
    count: Annotated[Annotated[int, Field(ge=1, le=MAX_CREATE)], BeforeValidator(_integral)] | None = None
    """Create this many sessions with these options in one call (a vectorised simulator's envs); the
    reply then lists their ids in ``session_ids``. All are created or none (429)."""


class SessionInfo(BaseModel):
    """A session's counters and times."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6",
                    "model": "point-nav",
                    "model_version": "3fa1c09be44d",
                    "steps": 8,
                    "episodes": 1,
                    "deterministic": True,
                    "seed": 12345,
                    "ttl_s": 3600.0,
                    "created_at": "2026-11-26T07:40:00.000+00:00",
                    "last_active_at": "2026-11-26T07:40:02.512+00:00",
                }
            ]
        }
    )

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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"session_id": "4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6", "model": _MODEL_EXAMPLE, "ttl_s": 3600.0}
            ]
        }
    )

    session_id: str
    model: ModelInfo
    ttl_s: float


class CreateSessionsResponse(BaseModel):
    """The sessions created by one ``POST /v1/sessions`` with ``count``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_ids": ["4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6", "9d2e7c41aa0b4f6e8c3b1d5f7a9e0c2b"],
                    "model": _MODEL_EXAMPLE,
                    "ttl_s": 3600.0,
                }
            ]
        }
    )

    session_ids: list[str]
    model: ModelInfo
    ttl_s: float


class ResetRequest(_Request):
    """Start a new episode (the window is kept if the model's memory scope is ``trial``) or a new trial."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"scope": "trial"}]})

    scope: Literal["episode", "trial"] = "episode"


class Status(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ready"}]})

    status: str


class SessionState(_Request):
    """A portable snapshot of one session: its whole memory and counters.

    ``PUT`` it back (here, on another replica, or after the session was lost) and the session
    continues exactly where it was: the next step is ``steps`` and re-sending step ``steps - 1``
    returns ``last_action``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "format": "trmrl.session/1",
                    "session_id": "4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6",
                    "model": "point-nav",
                    "model_version": "3fa1c09be44d",
                    "window": [[0.1, -0.2, 0.0, 0.0, 0.0, 0.0], [0.3, 0.1, 0.05, -0.1, -0.8, 0.0]],
                    "length": 2,
                    "prev_action": [0.031, -0.1],
                    "last_action": [0.031, -0.1],
                    "steps": 2,
                    "episodes": 1,
                    "episode_start_pending": False,
                    "deterministic": True,
                    "seed": 12345,
                    "ttl_s": 3600.0,
                    "created_at": 1764144000.0,
                }
            ]
        }
    )

    format: Literal["trmrl.session/1"] = "trmrl.session/1"
    session_id: SessionId
    """The session it was taken from. A ``PUT`` restores it under the path's id: under another id it
    makes a copy of the session."""
    model: str
    model_version: str
    """Content hash of the checkpoint the memory was built with; restoring needs the same."""
    window: list[list[float]]
    """``[N, token_dim]`` the working memories, as the slot pool holds them."""
    length: Count
    """How many rows of ``window`` hold memories."""
    prev_action: list[float]
    """The action that enters the next working memory."""
    last_action: list[float]
    """The action last returned (a retry of step ``steps - 1`` returns it)."""
    steps: Count
    """Steps taken: the next step's number."""
    episodes: Count
    episode_start_pending: bool
    """The next step starts an episode (a fresh session, or one reset since its last step)."""
    deterministic: bool
    seed: Seed
    ttl_s: Annotated[float, Field(gt=0, le=30 * 86_400)]
    created_at: Annotated[float, Field(ge=0, le=LAST_SECOND)]
    """Unix seconds (shown as an ISO 8601 date, so within years 1970 to 9999)."""


class LoadModelRequest(_Request):
    """A checkpoint to load as a new version of a model (admin)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "halfcheetah-vel", "checkpoint": "halfcheetah-vel-v2"}]}
    )

    name: Annotated[str, Field(min_length=1, max_length=64)]
    """The model's name: a new one, or one already served (the checkpoint becomes another version)."""
    checkpoint: Annotated[str, Field(min_length=1, max_length=4096)]
    """Path of the checkpoint directory or archive, relative to ``TRMRL_CHECKPOINT_ROOT``."""


class LoadModelResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "halfcheetah-vel",
                    "version": "9b1d2c3e4f50",
                    "active": False,
                    "task_family": "halfcheetah-vel",
                }
            ]
        }
    )

    name: str
    version: str
    active: bool
    """A new model's first version is active at once; a further version waits for ``activate``."""
    task_family: str


class ActivateRequest(_Request):
    """Which version new sessions get, and whether the live sessions move to it (admin)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"version": "9b1d2c3e4f50", "migrate_sessions": True}]}
    )

    version: Annotated[str, Field(min_length=1, max_length=64)]
    canary: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """Send only this share of new sessions to ``version`` (1 or omitted: all of them)."""
    migrate_sessions: bool = False
    """Move every live session of the model's other versions to ``version``, memory intact."""


class ActivateResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "halfcheetah-vel",
                    "active_version": "9b1d2c3e4f50",
                    "canary_version": None,
                    "canary_share": 0.0,
                    "migrated_sessions": 256,
                    "pause_ms": 4.2,
                }
            ]
        }
    )

    name: str
    active_version: str
    canary_version: str | None
    canary_share: float
    migrated_sessions: int
    pause_ms: float
    """How long steps of every model were held back while the sessions moved."""


def session_state(state: records.SessionState) -> SessionState:
    """The body of a snapshot the core took."""
    return SessionState.model_validate(state, from_attributes=True)


def snapshot_of(body: SessionState) -> records.SessionState:
    """The core's snapshot from a validated body."""
    return records.SessionState(**body.model_dump())
