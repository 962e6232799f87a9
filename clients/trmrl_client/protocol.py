"""The session protocol without I/O: step numbering, history, retries' bookkeeping and recovery.

Every transport (sync HTTP, async HTTP, WebSocket) runs the same *flows*: generators that yield
:class:`Call` objects and receive :class:`Reply` objects (or have a :class:`ServiceUnavailable`
thrown in). A transport only moves bytes; what to send after a ``404 unknown_session`` or a
``409 step_conflict`` is decided here, once.

Recovery rests on the service's design: a session's memory is its last N working memories. The
client keeps the last N + 1 transitions it sent (with the action the robot really executed before
each). After a 404 it restores the snapshot it last fetched under the session's id (``PUT
/v1/sessions/{id}/state``) and replays the transitions the snapshot does not cover; without a usable
snapshot it creates a new session and replays all N + 1 of them (the first one only rebuilds the
previous action, since a new session's first step is an episode start). Replayed steps carry
``applied_action`` so the service's memory holds the actions the original session held, and the next
action equals an uninterrupted session's (deterministic sessions; a sampled session keeps its seed,
and its noise stream continues exactly only after a snapshot restore).
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from trmrl_client import routes
from trmrl_client.codec import INPUT_LIMIT, within_limit
from trmrl_client.errors import ServiceError, ServiceUnavailable
from trmrl_client.routes import Route

FloatArray = NDArray[np.float32]
Scope = Literal["episode", "trial"]

#: How many times one step may go through recovery or catch-up before the client gives up.
MAX_RESYNCS = 3


@dataclass(frozen=True)
class ModelInfo:
    """A model the service has loaded (one entry of ``GET /v1/models``).

    Example:
        >>> info = ModelInfo.from_json({"name": "point-nav", "version": "14bab6437390",
        ...     "task_family": "point-nav", "obs_dim": 2, "act_dim": 2, "action_low": [-1, -1],
        ...     "action_high": [1, 1], "window": 5, "memory_scope": "episode"})
        >>> (info.window, info.task_params_in_obs)
        (5, None)
    """

    name: str
    version: str
    task_family: str
    obs_dim: int
    act_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    window: int
    memory_scope: str
    metrics: dict[str, Any] = field(default_factory=dict)
    default: bool = False
    task_params_in_obs: bool | None = None
    """Whether the model expects the task parameters appended to each observation (an oracle);
    ``None`` when the service does not say."""
    active: bool = True
    """This version gets the model's new sessions (a service may serve several versions of a model)."""
    canary_share: float = 0.0
    """Share of the model's new sessions this version gets as a canary."""
    policy: str | None = None
    """The network: ``"trmrl"`` or ``"rl2"`` (the recurrent baseline); ``None`` when the service does not
    say."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        """Parse one model entry of the service's reply."""
        oracle = data.get("task_params_in_obs")
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            task_family=str(data["task_family"]),
            obs_dim=int(data["obs_dim"]),
            act_dim=int(data["act_dim"]),
            action_low=tuple(float(x) for x in data["action_low"]),
            action_high=tuple(float(x) for x in data["action_high"]),
            window=int(data["window"]),
            memory_scope=str(data["memory_scope"]),
            metrics=dict(data.get("metrics") or {}),
            default=bool(data.get("default", False)),
            task_params_in_obs=None if oracle is None else bool(oracle),
            active=bool(data.get("active", True)),
            canary_share=float(data.get("canary_share", 0.0)),
            policy=None if data.get("policy") is None else str(data["policy"]),
        )


ROUTE_HEADER = "X-Session-Key"
"""Request header a session-aware router hashes to pick the replica (see docs/deploy.md)."""


def new_route_key() -> str:
    """A fresh, random routing key for one session.

    Example:
        >>> len(new_route_key())
        32
    """
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Call:
    """One request a flow wants sent: method, path, JSON-able body, and an optional deadline.

    Flows build calls from their :class:`~trmrl_client.routes.Route` (:meth:`to`), and transports
    choose by ``route``; a call built by hand from a method and a path has no route and travels as a
    plain JSON request.

    Example:
        >>> Call("GET", "/v1/models").method
        'GET'
        >>> Call.to(routes.SESSION_INFO, session_id="abc").path
        '/v1/sessions/abc'
    """

    method: str
    path: str
    body: dict[str, Any] | None = None
    deadline: float | None = None
    """``time.monotonic()`` by which the reply must be in, retries included (``None``: no deadline)."""
    route_key: str | None = None
    """Sent as the :data:`ROUTE_HEADER` header: one key per session, so a router sends every request
    of the session, creation and recoveries included, to the same replica."""
    route: Route | None = None
    """The route the call is for (``None``: a call built by hand, sent as a plain request)."""

    @classmethod
    def to(
        cls,
        route: Route,
        body: dict[str, Any] | None = None,
        deadline: float | None = None,
        route_key: str | None = None,
        **params: str,
    ) -> Call:
        """A call of ``route``, its path filled in with ``params``."""
        return cls(route.method, route.path(**params), body, deadline, route_key, route)


TRANSIENT = (429, 503)
"""Statuses of a refusal for now: the same call may be sent again after the wait the service asks."""


@dataclass(frozen=True)
class Reply:
    """A reply: the service's answer to one call -- its HTTP status and decoded body (``None`` when
    empty). A batch item or a stream frame becomes one too, with the status its error code stands for.

    Example:
        >>> Reply(404, {"error": {"code": "unknown_session", "message": "gone"}}).error().code
        'unknown_session'
    """

    status: int
    body: Any
    retry_after: float | None = None
    """Seconds to wait before sending the call again, for a transient refusal (``429``/``503``);
    ``None``: the reply stands."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error(self) -> ServiceError:
        return ServiceError.from_body(self.status, self.body)


@dataclass(frozen=True)
class Transition:
    """One step as the client sent it: enough to send it again to a new session.

    Example:
        >>> Transition(0, 0, (0.0, 0.0), 0.0, True, None).episode_start
        True
    """

    index: int
    """The client's own count of transitions in this session (never renumbered)."""
    step: int
    """The service's step number it was sent as (renumbered when replayed into a new session)."""
    observation: tuple[float, ...]
    reward: float
    episode_start: bool
    previous_action: tuple[float, ...] | None
    """The action the robot executed before ``observation``; ``None`` before the first step."""


Flow = Generator[Call, Reply, Any]


def as_vector(values: ArrayLike, length: int, what: str) -> tuple[float, ...]:
    """A flat tuple of ``length`` finite floats, or a clear ``ValueError``.

    Example:
        >>> as_vector(np.array([1, 2], np.float32), 2, "observation")
        (1.0, 2.0)
    """
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.shape[0] != length:
        raise ValueError(f"{what} must hold {length} numbers, got {array.shape[0]}")
    if not within_limit(array).all():
        raise ValueError(f"{what} holds NaN, an infinite value or a number beyond ±{INPUT_LIMIT:g}")
    return tuple(array.tolist())


class SessionLedger:
    """A session as the client knows it: id, model, next step number, recent history, snapshot.

    Example:
        >>> ledger = SessionLedger(ModelInfo("m", "v", "point-nav", 2, 2, (-1, -1), (1, 1), 5,
        ...     "episode"), "sid", {"model": "m"})
        >>> tr = ledger.prepare([0.1, 0.2], 0.0, False, None)
        >>> ledger.body(tr)["step"]
        0
    """

    def __init__(
        self,
        model: ModelInfo,
        session_id: str,
        create_body: dict[str, Any],
        route_key: str | None = None,
    ) -> None:
        self.model = model
        self.session_id = session_id
        self.create_body = create_body
        """The body that created the session; a recovered session is created with the same."""
        self.route_key = route_key or new_route_key()
        """Sent with every request of this session (:data:`ROUTE_HEADER`), before and after recovery."""
        self.next_step = 0
        self.transitions = 0
        self.history: deque[Transition] = deque(maxlen=model.window + 1)
        self.last_action: FloatArray | None = None
        self.executed: tuple[float, ...] | None = None
        """What the robot executed after the newest transition, when it told us (``applied_action``)."""
        self.start_next = True
        """The next step starts an episode (a new session, or after a reset)."""
        self.assert_previous = False
        """Send ``applied_action`` with the next step: the service may hold another previous action."""
        self.snapshot: tuple[Any, int] | None = None
        """The snapshot last fetched and the transition count it covers."""
        self.unconfirmed = 0
        """Newest transitions sent without an answer (the service may or may not have them)."""
        self.recoveries = 0
        self.catch_ups = 0

    # -- building and committing steps -----------------------------------------------------------
    def prepare(
        self,
        observation: ArrayLike,
        reward: float,
        episode_start: bool,
        applied_action: ArrayLike | None,
    ) -> Transition:
        """Validate a step's numbers and number it (nothing changes until it is committed)."""
        obs = as_vector(observation, self.model.obs_dim, "observation")
        if not within_limit(np.float64(reward)).all():
            raise ValueError(f"reward is NaN, infinite or beyond ±{INPUT_LIMIT:g}")
        previous: tuple[float, ...] | None
        if applied_action is not None:
            previous = as_vector(applied_action, self.model.act_dim, "applied_action")
        elif self.last_action is not None:
            previous = tuple(self.last_action.astype(np.float64).tolist())
        else:
            previous = None
        return Transition(
            index=self.transitions,
            step=self.next_step,
            observation=obs,
            reward=float(reward),
            episode_start=bool(episode_start) or self.start_next,
            previous_action=previous,
        )

    def body(self, tr: Transition, *, with_previous: bool | None = None) -> dict[str, Any]:
        """The act request for ``tr`` (``with_previous``: send ``applied_action``; default: when needed)."""
        send_previous = self.assert_previous if with_previous is None else with_previous
        body: dict[str, Any] = {
            "session_id": self.session_id,
            "observation": list(tr.observation),
            "reward": tr.reward,
            "episode_start": tr.episode_start,
            "step": tr.step,
        }
        if tr.previous_action is not None and (send_previous or tr.previous_action != self._returned()):
            body["applied_action"] = list(tr.previous_action)
        return body

    def _returned(self) -> tuple[float, ...] | None:
        return None if self.last_action is None else tuple(self.last_action.astype(np.float64).tolist())

    def commit(self, tr: Transition, body: Any) -> FloatArray:
        """Record an answered step (``body``: its reply's body); returns its action."""
        if not isinstance(body, dict) or "action" not in body:
            raise ServiceError(200, "bad_reply", f"the act reply has no action: {str(body)[:200]}")
        action = np.asarray(body["action"], dtype=np.float32).reshape(-1)
        if int(body.get("step", tr.step)) != tr.step:
            raise ServiceError(
                200, "bad_reply", f"the service answered step {body.get('step')}, not step {tr.step}"
            )
        self._append(tr)
        self.last_action = action
        self.assert_previous = False
        self.unconfirmed = 0
        return action

    def record_unanswered(self, tr: Transition) -> None:
        """A step that got no answer: the robot still lived through it, so it joins the history.

        The next step sends it again first, in the same request (:meth:`act_flow`): the step counter
        makes that safe whether or not the service got it.
        """
        self._append(tr)
        self.assert_previous = True
        self.unconfirmed += 1

    def _append(self, tr: Transition) -> None:
        self.history.append(tr)
        self.transitions = tr.index + 1
        self.next_step = tr.step + 1
        self.start_next = False

    def mark_reset(self, scope: Scope) -> None:
        """The service accepted a reset: the next step starts an episode; a trial reset forgets."""
        self.start_next = True
        if scope == "trial":
            self.history.clear()
            self.snapshot = None

    def call(self, route: Route, body: dict[str, Any] | None = None, deadline: float | None = None) -> Call:
        """A request of this session on ``route`` (its id filled in), carrying its routing key."""
        return Call.to(route, body, deadline, self.route_key, session_id=self.session_id)

    # -- flows ---------------------------------------------------------------------------------------
    def act_flow(self, tr: Transition, deadline: float | None = None) -> Flow:
        """Send one step and return its action, recovering from a lost session or a missed step.

        After steps that got no answer, they go first, in the same request: a step the service
        already has is refused as behind (harmless), a missing one is stepped, so a robot whose
        link came back needs one round trip per tick, not three.
        """
        unconfirmed = [t for t in self.history if t.step >= tr.step - self.unconfirmed]
        try:
            if unconfirmed:
                items = [self.body(t, with_previous=True) for t in unconfirmed] + [self.body(tr)]
                batch = yield self.call(routes.ACT_ITEMS, {"items": items}, deadline)
                if not batch.ok:
                    raise batch.error()
                item = batch.body["items"][-1]
                reply = Reply(200 if "error" not in item else status_of_error(item), item)
            else:
                reply = yield self.call(routes.ACT, self.body(tr), deadline)
        except ServiceUnavailable:
            self.record_unanswered(tr)
            raise
        return (yield from self.finish_flow(tr, reply, deadline))

    def finish_flow(self, tr: Transition, reply: Reply, deadline: float | None = None) -> Flow:
        """Turn a reply to ``tr`` into its action, resynchronising and resending while needed."""
        for _ in range(MAX_RESYNCS):
            if reply.ok:
                return self.commit(tr, reply.body)
            error = reply.error()
            if error.code == "unknown_session":
                yield from self.recover_flow()
            elif error.code == "step_conflict":
                yield from self.catch_up_flow(int(error.detail.get("expected_step", -1)), tr.step)
            elif reply.status in TRANSIENT and reply.retry_after is None:
                # A batch item or tick row refused for now (cache_exhausted): resent alone, and that
                # call's tries wait as the service asks.
                pass
            else:
                raise error
            tr = replace(tr, step=self.next_step)
            try:
                reply = yield self.call(routes.ACT, self.body(tr, with_previous=True), deadline)
            except ServiceUnavailable:
                self.record_unanswered(tr)
                raise
        raise ServiceError(reply.status, "resync_failed", f"step {tr.step} kept being refused: {reply.body}")

    def catch_up_flow(self, expected: int, got: int) -> Flow:
        """The service missed steps ``expected..got-1`` (sent without an answer): send them again."""
        missing = [tr for tr in self.history if expected <= tr.step < got]
        if expected < 0 or expected > got or len(missing) != got - expected:
            # Too far behind for the history (or ahead of us): a fresh session rebuilt from the
            # history holds exactly the memory the service should have.
            yield from self.recover_flow()
            return
        self.catch_ups += 1
        yield from self._send_history(missing)

    def recover_flow(self) -> Flow:
        """Bring back a lost session: restore its snapshot under its id, or recreate it; then replay."""
        base: int | None = None
        first = self.history[0].index if self.history else self.transitions
        if self.snapshot is not None and self.snapshot[1] >= first:
            snapshot, covered = self.snapshot
            put = yield self.call(routes.RESTORE_STATE, snapshot)
            if put.ok and isinstance(put.body, dict) and "steps" in put.body:
                base, first = int(put.body["steps"]), covered
            # A refused snapshot (no such route on this service, another model version) is no loss:
            # the replay alone rebuilds the memory.
        if base is None:
            reply = yield self.call(routes.CREATE_SESSIONS, self.create_body)
            if reply.status != 201:
                raise reply.error()
            self.session_id = str(reply.body["session_id"])
            self.snapshot = None  # it names the old id
            base = 0
        self.recoveries += 1
        # One numbering for the whole history: the first replayed transition gets the service's next step.
        self.history = deque(
            (replace(tr, step=base + tr.index - first) for tr in self.history), maxlen=self.history.maxlen
        )
        self.next_step = base + self.transitions - first
        replay = [tr for tr in self.history if tr.index >= first]
        if replay:
            yield from self._send_history(replay)
        self.assert_previous = True

    def _send_history(self, transitions: Sequence[Transition]) -> Flow:
        """Send recorded transitions in order, in one batch request (the service steps them in order)."""
        items = [self.body(tr, with_previous=True) for tr in transitions]
        reply = yield self.call(routes.ACT_ITEMS, {"items": items})
        if not reply.ok:
            raise reply.error()
        for item in reply.body["items"]:
            if "error" in item:
                raise ServiceError.from_body(422, item)
            self.last_action = np.asarray(item["action"], dtype=np.float32)
        self.next_step = transitions[-1].step + 1
        self.start_next = False
        self.unconfirmed = 0

    def info_flow(self) -> Flow:
        """The service's view of the session (``GET /v1/sessions/{id}``)."""
        reply = yield self.call(routes.SESSION_INFO)
        if not reply.ok:
            raise reply.error()
        return reply.body

    def close_flow(self) -> Flow:
        """Delete the session on the service (a session already gone is fine)."""
        reply = yield self.call(routes.DELETE_SESSION)
        if not reply.ok and reply.status != 404:
            raise reply.error()

    def snapshot_flow(self) -> Flow:
        """Fetch and keep the session's snapshot (``GET /v1/sessions/{id}/state``)."""
        reply = yield self.call(routes.SESSION_STATE)
        if not reply.ok:
            raise reply.error()
        self.snapshot = (reply.body, self.transitions)
        return reply.body

    def reset_flow(self, scope: Scope) -> Flow:
        """Start a new episode or trial (``POST /v1/sessions/{id}/reset``), recovering a lost session."""
        for _ in range(2):
            reply = yield self.call(routes.RESET, {"scope": scope})
            if reply.ok:
                self.mark_reset(scope)
                return None
            error = reply.error()
            if error.code != "unknown_session":
                raise error
            yield from self.recover_flow()
        raise reply.error()


def create_body(
    model: str | None, deterministic: bool, seed: int | None, ttl_s: float | None
) -> dict[str, Any]:
    """The body of ``POST /v1/sessions`` (unset options left to the service).

    Example:
        >>> create_body("point-nav", True, None, None)
        {'deterministic': True, 'model': 'point-nav'}
    """
    body: dict[str, Any] = {"deterministic": deterministic}
    if model is not None:
        body["model"] = model
    if seed is not None:
        body["seed"] = seed
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    return body


def create_flow(body: dict[str, Any], route_key: str, deadline: float | None = None) -> Flow:
    """Create one session (``POST /v1/sessions``); returns its :class:`SessionLedger`.

    Example:
        >>> ledger = client.run(create_flow({"model": "point-nav"}, new_route_key()))  # doctest: +SKIP
    """
    reply = yield Call.to(routes.CREATE_SESSIONS, body, deadline, route_key)
    if reply.status != 201:
        raise reply.error()
    info = ModelInfo.from_json(reply.body["model"])
    return SessionLedger(info, str(reply.body["session_id"]), {**body, "model": info.name}, route_key)


def models_flow() -> Flow:
    """The loaded models (``GET /v1/models``), as :class:`ModelInfo`.

    Example:
        >>> models = client.run(models_flow())  # doctest: +SKIP
    """
    reply = yield Call.to(routes.MODELS)
    if not reply.ok:
        raise reply.error()
    return [ModelInfo.from_json(m) for m in reply.body["models"]]


def batch_flow(ledgers: Sequence[SessionLedger], transitions: Sequence[Transition]) -> Flow:
    """Step many sessions in one ``POST /v1/act/batch``; items that failed are resolved one by one.

    Example:
        >>> actions = client.run(batch_flow(ledgers, transitions))  # doctest: +SKIP
    """
    items = [ledger.body(tr) for ledger, tr in zip(ledgers, transitions, strict=True)]
    try:
        reply = yield Call.to(routes.ACT_ITEMS, {"items": items})
    except ServiceUnavailable:
        for ledger, tr in zip(ledgers, transitions, strict=True):
            ledger.record_unanswered(tr)
        raise
    if not reply.ok:
        raise reply.error()
    actions: list[FloatArray] = []
    for ledger, tr, item in zip(ledgers, transitions, reply.body["items"], strict=True):
        status = 200 if "error" not in item else status_of_error(item)
        actions.append((yield from ledger.finish_flow(tr, Reply(status, item))))
    return np.stack(actions) if actions else np.zeros((0, 0), np.float32)


_STATUS_OF_CODE = {
    "unknown_session": 404,
    "unknown_model": 404,
    "step_conflict": 409,
    "context_full": 409,
    "capacity_exhausted": 429,
    "overloaded": 503,
    "cache_exhausted": 503,
}


def status_of_error(item: dict[str, Any]) -> int:
    """The HTTP status an error body stands for (batch items and stream frames carry none).

    Example:
        >>> status_of_error({"error": {"code": "step_conflict"}})
        409
    """
    code = item.get("error", {}).get("code", "")
    return _STATUS_OF_CODE.get(code, 422)
