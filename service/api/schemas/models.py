"""The model bodies: a loaded model's facts, and the admin routes' load and activate."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from service.api.schemas.common import Request, example
from service.core import records

MODEL_EXAMPLE: dict[str, Any] = {
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

    model_config = example(**MODEL_EXAMPLE)

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
    context: Literal["window", "trial"] = "window"
    """What a ``trmrl`` policy attends over: its last ``window`` working memories, or (``trial``) every
    working memory since the session's trial began, up to ``max_context``; a step past that is refused
    (409 ``context_full``) until a trial reset."""
    max_context: int | None = None
    """``context="trial"``: the most working memories a trial holds (``None`` otherwise)."""


def model_info(info: records.ModelInfo) -> ModelInfo:
    """The body of the core's facts about a model."""
    return ModelInfo.model_validate(info, from_attributes=True)


class ModelList(BaseModel):
    model_config = example(models=[MODEL_EXAMPLE])

    models: list[ModelInfo]


class LoadModelRequest(Request):
    """A checkpoint to load as a new version of a model (admin)."""

    model_config = example(name="halfcheetah-vel", checkpoint="halfcheetah-vel-v2")

    name: Annotated[str, Field(min_length=1, max_length=64)]
    """The model's name: a new one, or one already served (the checkpoint becomes another version)."""
    checkpoint: Annotated[str, Field(min_length=1, max_length=4096)]
    """Path of the checkpoint directory or archive, relative to ``TRMRL_CHECKPOINT_ROOT``."""


class LoadModelResponse(BaseModel):
    model_config = example(
        name="halfcheetah-vel", version="9b1d2c3e4f50", active=False, task_family="halfcheetah-vel"
    )

    name: str
    version: str
    active: bool
    """A new model's first version is active at once; a further version waits for ``activate``."""
    task_family: str


class ActivateRequest(Request):
    """Which version new sessions get, and whether the live sessions move to it (admin)."""

    model_config = example(version="9b1d2c3e4f50", migrate_sessions=True)

    version: Annotated[str, Field(min_length=1, max_length=64)]
    canary: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """Send only this share of new sessions to ``version`` (1 or omitted: all of them)."""
    migrate_sessions: bool = False
    """Move every live session of the model's other versions to ``version``, memory intact."""


class ActivateResponse(BaseModel):
    model_config = example(
        name="halfcheetah-vel",
        active_version="9b1d2c3e4f50",
        canary_version=None,
        canary_share=0.0,
        migrated_sessions=256,
        pause_ms=4.2,
    )

    name: str
    active_version: str
    canary_version: str | None
    canary_share: float
    migrated_sessions: int
    pause_ms: float
    """How long steps of every model were held back while the sessions moved."""
