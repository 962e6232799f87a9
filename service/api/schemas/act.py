"""The act bodies: one step, a batch of items, a columnar tick, and their answers."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from service.api.schemas.common import Count, ErrorBody, ErrorObject, Request, SessionId, example


class ActRequest(Request):
    """One step of one session."""

    model_config = example(
        session_id="4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6",
        observation=[0.12, -0.40],
        reward=-0.83,
        episode_start=False,
        step=7,
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


class StreamFrame(Request):
    """One step on a session's stream: an act request without ``session_id`` (the stream names it)."""

    model_config = example(observation=[0.12, -0.4], reward=-0.83, step=7)

    observation: list[float]
    reward: float = 0.0
    episode_start: bool = False
    step: Count | None = None
    applied_action: list[float] | None = None


class ActResponse(BaseModel):
    """The action for one step."""

    model_config = example(
        session_id="4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6",
        step=7,
        action=[0.031, -0.1],
        model_version="3fa1c09be44d",
        server_timing_us=812,
    )

    session_id: str
    step: int
    """The step this action answers (echoes the request's ``step`` when given)."""
    action: list[float]
    """Clipped to the model's action bounds."""
    model_version: str
    server_timing_us: int
    """Time the service spent on the request, from reading the body to the reply."""


class ActBatchRequest(Request):
    """Many sessions' steps in one request (a simulator's tick)."""

    model_config = example(
        items=[
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
    )

    items: list[ActRequest]


class ActBatchResponse(BaseModel):
    """One entry per request item, in order: its action or its error."""

    model_config = example(
        items=[
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
    )

    items: list[ActResponse | ErrorBody]


_IDS: list[Any] = ["4f9c1e0d2b7a48e5a1c3d6f8b0e2a4c6", "9d2e7c41aa0b4f6e8c3b1d5f7a9e0c2b"]


class ActColumnarRequest(Request):
    """A tick of many sessions as columns: row ``i`` of every array belongs to ``session_ids[i]``.

    Every column sent has as many rows as ``session_ids`` (an optional column sent empty counts as
    not sent).

    In MessagePack every array may be a msgpack-numpy map (``{"__ndarray__": true, "data": <bytes>,
    "dtype": "<f4", "shape": [B, obs_dim]}``), decoded without copying through lists; object dtypes
    are refused. A malformed tick (a missing or unknown field, a wrong dtype or shape, columns of
    different lengths, a session named twice) is refused whole with 422; rows that fail on their own
    are reported in the reply's ``errors``.
    """

    model_config = example(
        session_ids=_IDS,
        observations=[[0.12, -0.4], [0.5, 0.1]],
        rewards=[-0.83, -0.2],
        episode_starts=[False, False],
        steps=[7, 3],
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

    model_config = example(
        session_ids=_IDS,
        steps=[7, 3],
        actions=[[0.031, -0.1], [None, None]],
        model_version="3fa1c09be44d",
        server_timing_us=95,
        errors=[
            {
                "row": 1,
                "error": {
                    "code": "step_conflict",
                    "message": "Step 3 is behind the session: the next step is 4.",
                    "detail": {"expected_step": 4, "got_step": 3},
                },
            }
        ],
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
