"""Plain records in and out of the core: what a request asks of it and what it answers.

The API validates a request into its own models (``service.api.schemas``); the core reads them through
the small protocols here, and answers with the dataclasses here, which the API turns into its
replies. Field names are the API's, so each concept keeps one name on both sides of the edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.core.errors import ServiceError
from trmrl.graphed import Precision

SEED_LIMIT = 1 << 63
"""Seeds are int64, below this."""


class Step(Protocol):
    """One step of one session (an act request, or a stream frame with its session)."""

    @property
    def session_id(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def observation(self) -> list[float]: ...
    @property
    def reward(self) -> float: ...
    @property
    def episode_start(self) -> bool: ...
    @property
    def step(self) -> int | None: ...
    @property
    def applied_action(self) -> list[float] | None: ...


class NewSession(Protocol):
    """The options of a new session."""

    @property
    def model(self) -> str | None: ...
    @property
    def deterministic(self) -> bool: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def ttl_s(self) -> float | None: ...
    @property
    def record(self) -> bool: ...


@dataclass(frozen=True)
class EngineLimits:
    """The knobs of one engine (from :class:`service.config.Settings`)."""

    max_sessions: int
    max_batch: int
    batch_wait_s: float
    session_ttl_s: float
    evict_idle_s: float
    max_queued_steps: int = 16_384
    precision: Precision = "fp32"
    """Forward-pass precision (``TRMRL_DTYPE``); the slot pool and the actions stay float32."""
    cuda_graphs: bool = True
    """On CUDA, replay captured graphs of the batched step (``TRMRL_CUDA_GRAPHS``)."""
    cache_mib: float = 0.0
    """A trial-context model's fixed key/value cache, MiB (``TRMRL_CACHE_MIB``); 0: grows on demand."""


@dataclass(slots=True)
class ActResult:
    """The action for one step (slots: built once per request, on the hot path)."""

    session_id: str
    step: int
    action: list[float]
    model_version: str
    server_timing_us: int


@dataclass(frozen=True)
class ModelInfo:
    """A loaded version of a model, as ``GET /v1/models`` lists it."""

    name: str
    version: str
    task_family: str
    obs_dim: int
    act_dim: int
    action_low: list[float]
    action_high: list[float]
    window: int
    memory_scope: str
    policy: str
    task_params_in_obs: bool
    metrics: dict[str, Any]
    default: bool
    active: bool = True
    canary_share: float = 0.0
    context: str = "window"
    max_context: int | None = None


@dataclass(frozen=True)
class SessionInfo:
    """A session's counters and times (ISO 8601 dates)."""

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


@dataclass
class SessionState:
    """A portable snapshot of one session: its whole memory and counters."""

    session_id: str
    model: str
    model_version: str
    window: list[list[float]]
    length: int
    prev_action: list[float]
    last_action: list[float]
    steps: int
    episodes: int
    episode_start_pending: bool
    deterministic: bool
    seed: int
    ttl_s: float
    created_at: float
    format: str = "trmrl.session/1"
    context: str = "window"
    """``window``: ``window`` holds the model's N rows; ``trial`` (a trial-context model): its ``length``
    working memories, at most ``max_context``."""


@dataclass
class ColumnarTick:
    """A decoded, structurally valid tick (the numbers themselves are checked per row later)."""

    session_ids: list[str]
    observations: np.ndarray
    """``[B, D]``, numeric; ``D`` is checked against the model when the tick is stepped."""
    rewards: np.ndarray | None = None
    """``[B]``, numeric."""
    episode_starts: np.ndarray | None = None
    """``[B]`` bool."""
    steps: np.ndarray | None = None
    """``[B]`` int64, each ``>= 0``."""
    applied_actions: np.ndarray | None = None
    """``[B, A]``, numeric."""
    model: str | None = None

    @property
    def size(self) -> int:
        return len(self.session_ids)


@dataclass
class ColumnarResult:
    """The answer to a tick: one row per session, in the request's order."""

    session_ids: list[str]
    steps: np.ndarray
    """``[B]`` int64: the step each row answers (a failed row echoes its request's step, or -1)."""
    actions: np.ndarray
    """``[B, act_dim]`` float32; the rows of failed steps are NaN."""
    model_version: str
    server_timing_us: int = 0
    errors: list[tuple[int, ServiceError]] = field(default_factory=list)
    model_versions: list[str] | None = None
    """Each row's version, when the tick's sessions were on more than one version of the model."""
