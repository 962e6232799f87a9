"""The session bodies: create, inspect, reset, and the portable snapshot of ``…/state``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field

from service.api.schemas.common import (
    LAST_SECOND,
    MAX_CREATE,
    Count,
    Request,
    Seed,
    SessionId,
    example,
    integral,
    record_body,
)
from service.api.schemas.models import MODEL_EXAMPLE, ModelInfo
from service.core import records


class CreateSessionRequest(Request):
    """Options of a new session; every field may be omitted."""

    model_config = example(model="point-nav", deterministic=True)

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
    count: Annotated[Annotated[int, Field(ge=1, le=MAX_CREATE)], BeforeValidator(integral)] | None = None
    """Create this many sessions with these options in one call (a vectorised simulator's envs); the
    reply then lists their ids in ``session_ids``. All are created or none (429)."""


SessionInfo = record_body(
    records.SessionInfo,
    "A session's counters and times.",
    example(
        session_id="4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6",
        model="point-nav",
        model_version="3fa1c09be44d",
        steps=8,
        episodes=1,
        deterministic=True,
        seed=12345,
        ttl_s=3600.0,
        created_at="2026-11-26T07:40:00.000+00:00",
        last_active_at="2026-11-26T07:40:02.512+00:00",
    ),
)


class CreateSessionResponse(BaseModel):
    model_config = example(session_id="4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6", model=MODEL_EXAMPLE, ttl_s=3600.0)

    session_id: str
    model: ModelInfo
    ttl_s: float


class CreateSessionsResponse(BaseModel):
    """The sessions created by one ``POST /v1/sessions`` with ``count``."""

    model_config = example(
        session_ids=["4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6", "9d2e7c41aa0b4f6e8c3b1d5f7a9e0c2b"],
        model=MODEL_EXAMPLE,
        ttl_s=3600.0,
    )

    session_ids: list[str]
    model: ModelInfo
    ttl_s: float


class ResetRequest(Request):
    """Start a new episode (the window is kept if the model's memory scope is ``trial``) or a new trial."""

    model_config = example(scope="trial")

    scope: Literal["episode", "trial"] = "episode"


class SessionState(Request):
    """A portable snapshot of one session: its whole memory and counters.

    ``PUT`` it back (here, on another replica, or after the session was lost) and the session
    continues exactly where it was: the next step is ``steps`` and re-sending step ``steps - 1``
    returns ``last_action``.
    """

    model_config = example(
        format="trmrl.session/1",
        session_id="4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6",
        model="point-nav",
        model_version="3fa1c09be44d",
        window=[[0.1, -0.2, 0.0, 0.0, 0.0, 0.0], [0.3, 0.1, 0.05, -0.1, -0.8, 0.0]],
        length=2,
        prev_action=[0.031, -0.1],
        last_action=[0.031, -0.1],
        steps=2,
        episodes=1,
        episode_start_pending=False,
        deterministic=True,
        seed=12345,
        ttl_s=3600.0,
        created_at=1764144000.0,
    )

    format: Literal["trmrl.session/1"] = "trmrl.session/1"
    session_id: SessionId
    """The session it was taken from. A ``PUT`` restores it under the path's id: under another id it
    makes a copy of the session."""
    model: str
    model_version: str
    """Content hash of the checkpoint the memory was built with; restoring needs the same."""
    context: Literal["window", "trial"] = "window"
    """The model's kind of memory: ``window`` (its last N working memories, or an RL² hidden state) or
    ``trial`` (every working memory since the trial began, up to the model's ``max_context``). A snapshot
    of one kind does not fit a model of the other."""
    window: list[list[float]]
    """``[N, token_dim]`` the working memories, as the slot pool holds them; for ``context="trial"``
    the trial's ``length`` working memories (``[length, token_dim]``, at most ``max_context`` rows)."""
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


def session_state(state: records.SessionState) -> SessionState:
    """The body of a snapshot the core took."""
    return SessionState.model_validate(state, from_attributes=True)


def snapshot_of(body: SessionState) -> records.SessionState:
    """The core's snapshot from a validated body."""
    return records.SessionState(**body.model_dump())
