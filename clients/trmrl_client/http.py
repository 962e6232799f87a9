"""HTTP clients of the policy service: :class:`PolicyClient` (blocking) and :class:`AsyncPolicyClient`.

Both speak the v1 API with httpx, take and return numpy arrays, retry a request after a timeout or
a dropped connection (safe: every act carries the session's step number, and the service answers a
re-sent step with the same action), wait out ``429``/``503`` briefly, and recover sessions the
service lost (see :mod:`trmrl_client.protocol`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import httpx
import numpy as np
from numpy.typing import ArrayLike

from trmrl_client.errors import ServiceError, ServiceUnavailable

if TYPE_CHECKING:
    from trmrl_client.vector import AsyncVectorSession, VectorSession
from trmrl_client.protocol import (
    ROUTE_HEADER,
    Call,
    FloatArray,
    Flow,
    ModelInfo,
    Reply,
    Scope,
    SessionState,
    batch_flow,
    new_route_key,
)

Encoding = Literal["json", "msgpack"]
MSGPACK = "application/msgpack"

#: Longest pause between two tries of a request (backoff doubles from ``BACKOFF_S``).
BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0


class _Transport:
    """What both clients share: base URL, headers, encoding, timeout and retry policy."""

    def __init__(
        self, url: str, api_key: str | None, timeout: float, retries: int, encoding: Encoding
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if encoding not in ("json", "msgpack"):
            raise ValueError(f"encoding must be 'json' or 'msgpack', got {encoding!r}")
        if encoding == "msgpack":
            from trmrl_client import codec  # noqa: F401 -- fail now if the stream extra is missing

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.encoding = encoding
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def encode(self, call: Call) -> tuple[dict[str, str], bytes | None, Any]:
        """Headers, raw content and JSON for one call (one of the last two is ``None``)."""
        headers = {ROUTE_HEADER: call.route_key} if call.route_key else {}
        if call.body is None:
            return headers, None, None
        if self.encoding == "msgpack" and "/act" in call.path:
            from trmrl_client.codec import packb

            return {**headers, "Content-Type": MSGPACK, "Accept": MSGPACK}, packb(call.body), None
        return headers, None, _jsonable(call.body)

    @staticmethod
    def decode(response: httpx.Response) -> Reply:
        if not response.content:
            return Reply(response.status_code, None)
        kind = response.headers.get("content-type", "")
        if kind.startswith(MSGPACK):
            from trmrl_client.codec import unpackb

            return Reply(response.status_code, unpackb(response.content))
        try:
            return Reply(response.status_code, response.json())
        except ValueError:
            return Reply(
                response.status_code, {"error": {"code": "bad_reply", "message": response.text[:200]}}
            )

    def budget(self, call: Call) -> float | None:
        """Seconds left for ``call`` (``None``: no deadline of its own)."""
        return None if call.deadline is None else call.deadline - time.monotonic()

    @staticmethod
    def retry_after(reply: Reply, headers: httpx.Headers) -> float | None:
        """Seconds to wait before resending, for transient refusals (capacity, starting, draining)."""
        if reply.status not in (429, 503):
            return None
        try:
            return min(float(headers.get("retry-after", "0.1")), MAX_BACKOFF_S)
        except ValueError:
            return 0.1

    @staticmethod
    def failure(call: Call, exc: Exception | None) -> ServiceUnavailable:
        if isinstance(exc, httpx.TimeoutException) or exc is None:
            return ServiceUnavailable("timeout", f"{call.method} {call.path}: no reply in time ({exc})")
        return ServiceUnavailable("unreachable", f"{call.method} {call.path}: {exc}")


def _recreate_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """How one env of a vector is recreated after the service lost it (its own seed is not kept)."""
    return {**{k: v for k, v in body.items() if k != "seed"}, "model": model}


def _jsonable(body: dict[str, Any]) -> dict[str, Any]:
    """A body with its numpy arrays (a columnar tick's) as nested lists, for JSON."""
    if not any(isinstance(v, np.ndarray) for v in body.values()):
        return body
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in body.items()}


def _models(reply: Reply) -> list[ModelInfo]:
    if not reply.ok:
        raise reply.error()
    return [ModelInfo.from_json(m) for m in reply.body["models"]]


def _create_body(
    model: str | None, deterministic: bool, seed: int | None, ttl_s: float | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"deterministic": deterministic}
    if model is not None:
        body["model"] = model
    if seed is not None:
        body["seed"] = seed
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    return body


class PolicyClient:
    """A blocking client of the policy service.

    Args:
        url: The service's base URL, e.g. ``http://127.0.0.1:8000``.
        api_key: Sent as ``Authorization: Bearer <key>`` when given.
        timeout: Seconds to wait for one reply.
        retries: Extra tries after a timeout, a dropped connection or a ``429``/``503``.
        encoding: ``json`` or ``msgpack`` bodies for the act routes (``msgpack`` needs the ``stream`` extra).

    Example:
        >>> with PolicyClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
        ...     session = client.session("point-nav")
        ...     action = session.act(np.zeros(2, np.float32), episode_start=True)
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        encoding: Encoding = "json",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._t = _Transport(url, api_key, timeout, retries, encoding)
        self._http = httpx.Client(
            base_url=self._t.url, headers=self._t.headers, timeout=timeout, transport=transport
        )

    @property
    def url(self) -> str:
        return self._t.url

    def close(self) -> None:
        """Close the connection pool (sessions on the service stay until deleted or expired)."""
        self._http.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------
    def send(self, call: Call) -> Reply:
        """Send one call, retrying transport failures and transient refusals; raise when out of tries."""
        headers, content, body = self._t.encode(call)
        last: Exception | None = None
        for attempt in range(self._t.retries + 1):
            budget = self._t.budget(call)
            if budget is not None and budget <= 0:
                break
            timeout = self._t.timeout if budget is None else min(self._t.timeout, budget)
            try:
                response = self._http.request(
                    call.method, call.path, headers=headers, content=content, json=body, timeout=timeout
                )
            except httpx.TransportError as exc:
                last = exc
                pause = min(BACKOFF_S * 2**attempt, MAX_BACKOFF_S)
            else:
                reply = self._t.decode(response)
                pause_or_none = self._t.retry_after(reply, response.headers)
                if pause_or_none is None or attempt == self._t.retries:
                    return reply
                pause, last = pause_or_none, None
            if attempt < self._t.retries:
                budget = self._t.budget(call)
                time.sleep(pause if budget is None else max(0.0, min(pause, budget)))
        raise self._t.failure(call, last)

    def run(self, flow: Flow) -> Any:
        """Drive a protocol flow to its end over this client."""
        reply: Reply | None = None
        failure: ServiceUnavailable | None = None
        while True:
            try:
                call = flow.throw(failure) if failure is not None else flow.send(reply)  # type: ignore[arg-type]
            except StopIteration as stop:
                return stop.value
            failure = None
            try:
                reply = self.send(call)
            except ServiceUnavailable as exc:
                failure, reply = exc, None

    # -- API -----------------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200 (``False`` if unreachable).

        Example:
            >>> PolicyClient("http://127.0.0.1:9").ready()  # doctest: +SKIP
            False
        """
        try:
            return self._http.get("/readyz", timeout=min(self._t.timeout, 5.0)).status_code == 200
        except httpx.TransportError:
            return False

    def models(self) -> list[ModelInfo]:
        """The loaded models (``GET /v1/models``).

        Example:
            >>> [m.name for m in client.models()]  # doctest: +SKIP
            ['point-nav', 'point-nav-memoryless', 'point-nav-oracle']
        """
        return _models(self.send(Call("GET", "/v1/models")))

    def session(
        self,
        model: str | None = None,
        *,
        deterministic: bool = True,
        seed: int | None = None,
        ttl_s: float | None = None,
        timeout: float | None = None,
    ) -> Session:
        """Create a session of ``model`` (default: the service's default model).

        ``timeout``: seconds the creation may take, retries included (default: the client's policy).

        Example:
            >>> session = client.session("point-nav", seed=3)  # doctest: +SKIP
            >>> session.model.window  # doctest: +SKIP
            5
        """
        body = _create_body(model, deterministic, seed, ttl_s)
        deadline = None if timeout is None else time.monotonic() + timeout
        key = new_route_key()
        reply = self.send(Call("POST", "/v1/sessions", body, deadline, key))
        if reply.status != 201:
            raise reply.error()
        info = ModelInfo.from_json(reply.body["model"])
        state = SessionState(info, str(reply.body["session_id"]), {**body, "model": info.name}, key)
        return Session(self, state)

    def act_batch(
        self,
        sessions: Sequence[Session],
        observations: ArrayLike,
        rewards: ArrayLike | None = None,
        episode_starts: ArrayLike | None = None,
    ) -> FloatArray:
        """Step many sessions in one request (``POST /v1/act/batch``); returns ``[len(sessions), act_dim]``.

        A session the service lost is recovered and its step resent, without disturbing the others.

        Example:
            >>> envs = [client.session("point-nav") for _ in range(4)]  # doctest: +SKIP
            >>> client.act_batch(envs, np.zeros((4, 2))).shape  # doctest: +SKIP
            (4, 2)
        """
        states, transitions = _prepare_batch(
            [s.state for s in sessions], observations, rewards, episode_starts
        )
        return np.asarray(self.run(batch_flow(states, transitions)), np.float32)

    def vector(
        self,
        num_envs: int,
        model: str | None = None,
        *,
        deterministic: bool = True,
        seed: int | None = None,
        ttl_s: float | None = None,
    ) -> VectorSession:
        """``num_envs`` sessions created in one call and stepped together, one columnar request a tick.

        ``seed``: env ``i`` gets ``seed + i``.

        Example:
            >>> envs = client.vector(8, "point-nav")  # doctest: +SKIP
            >>> envs.act(np.zeros((8, 2)), episode_starts=np.ones(8, bool)).shape  # doctest: +SKIP
            (8, 2)
        """
        from trmrl_client.vector import VectorSession, VectorState, create_sessions_flow

        body = _create_body(model, deterministic, seed, ttl_s)
        key = new_route_key()
        ids, info = self.run(create_sessions_flow(num_envs, body, key))
        return VectorSession(self, VectorState(info, ids, _recreate_body(body, info.name), key))


class Session:
    """One session of a :class:`PolicyClient`: a robot's or environment's memory on the service.

    Example:
        >>> session = client.session("point-nav")  # doctest: +SKIP
        >>> a0 = session.act([0.0, 0.0], episode_start=True)  # doctest: +SKIP
        >>> a1 = session.act([0.01, 0.02], reward=-0.9)  # doctest: +SKIP
    """

    def __init__(self, client: PolicyClient, state: SessionState) -> None:
        self.client = client
        self.state = state

    @property
    def session_id(self) -> str:
        """The service's id of the session (changes when the client recovers a lost session)."""
        return self.state.session_id

    @property
    def model(self) -> ModelInfo:
        return self.state.model

    @property
    def step(self) -> int:
        """The number the next step is sent as."""
        return self.state.next_step

    @property
    def recoveries(self) -> int:
        """How many times the session was recreated after the service lost it."""
        return self.state.recoveries

    def act(
        self,
        observation: ArrayLike,
        reward: float = 0.0,
        episode_start: bool = False,
        applied_action: ArrayLike | None = None,
        *,
        timeout: float | None = None,
    ) -> FloatArray:
        """The action for ``observation``; ``reward`` is the reward for the previous action.

        Args:
            observation: ``obs_dim`` numbers.
            reward: Reward received for the previous action (ignored at an episode start).
            episode_start: ``observation`` is the first of an episode.
            applied_action: What the robot executed for the previous step, if not the action returned.
            timeout: Seconds this call may take in all (retries included); ``None``: the client's policy.

        Raises:
            ServiceUnavailable: No reply in time; the step is kept and sorted out by the next call.
            ServiceError: The service refused the step (bad input, unknown model...).

        Example:
            >>> session.act(np.array([0.1, 0.2]), reward=-0.8).shape  # doctest: +SKIP
            (2,)
        """
        tr = self.state.prepare(observation, reward, episode_start, applied_action)
        deadline = None if timeout is None else time.monotonic() + timeout
        return np.asarray(self.client.run(self.state.act_flow(tr, deadline)), np.float32)

    def reset(self, scope: Scope = "episode") -> None:
        """Start a new episode (memory kept for ``trial``-scope models) or a new trial (memory cleared).

        Example:
            >>> session.reset("trial")  # doctest: +SKIP
        """
        self.client.run(self.state.reset_flow(scope))

    def snapshot(self) -> Any:
        """Fetch the session's portable snapshot; the client keeps it for recovery.

        Example:
            >>> state = session.snapshot()  # doctest: +SKIP
        """
        return self.client.run(self.state.snapshot_flow())

    def info(self) -> dict[str, Any]:
        """The service's view of the session (steps, episodes, times, model version).

        Example:
            >>> session.info()["steps"]  # doctest: +SKIP
            2
        """
        reply = self.client.send(self.state.call("GET", f"/v1/sessions/{self.session_id}"))
        if not reply.ok:
            raise reply.error()
        info: dict[str, Any] = reply.body
        return info

    def close(self) -> None:
        """Delete the session on the service (a session already gone is fine).

        Example:
            >>> session.close()  # doctest: +SKIP
        """
        try:
            reply = self.client.send(self.state.call("DELETE", f"/v1/sessions/{self.session_id}"))
        except ServiceUnavailable:
            return
        if not reply.ok and reply.status != 404:
            raise reply.error()


class AsyncPolicyClient:
    """The asyncio twin of :class:`PolicyClient` (same arguments, awaitable methods).

    Example:
        >>> async def main() -> None:  # doctest: +SKIP
        ...     async with AsyncPolicyClient("http://127.0.0.1:8000") as client:
        ...         session = await client.session("point-nav")
        ...         action = await session.act([0.0, 0.0], episode_start=True)
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        encoding: Encoding = "json",
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        self._t = _Transport(url, api_key, timeout, retries, encoding)
        self._http = httpx.AsyncClient(
            base_url=self._t.url,
            headers=self._t.headers,
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    @property
    def url(self) -> str:
        return self._t.url

    @property
    def api_key_headers(self) -> dict[str, str]:
        """The authorization header (empty without an API key)."""
        return dict(self._t.headers)

    @property
    def timeout(self) -> float:
        return self._t.timeout

    @property
    def retries(self) -> int:
        return self._t.retries

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncPolicyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send(self, call: Call) -> Reply:
        """Send one call with retries (see :meth:`PolicyClient.send`)."""
        headers, content, body = self._t.encode(call)
        last: Exception | None = None
        for attempt in range(self._t.retries + 1):
            budget = self._t.budget(call)
            if budget is not None and budget <= 0:
                break
            timeout = self._t.timeout if budget is None else min(self._t.timeout, budget)
            try:
                response = await self._http.request(
                    call.method, call.path, headers=headers, content=content, json=body, timeout=timeout
                )
            except httpx.TransportError as exc:
                last = exc
                pause = min(BACKOFF_S * 2**attempt, MAX_BACKOFF_S)
            else:
                reply = self._t.decode(response)
                pause_or_none = self._t.retry_after(reply, response.headers)
                if pause_or_none is None or attempt == self._t.retries:
                    return reply
                pause, last = pause_or_none, None
            if attempt < self._t.retries:
                budget = self._t.budget(call)
                await asyncio.sleep(pause if budget is None else max(0.0, min(pause, budget)))
        raise self._t.failure(call, last)

    async def run(self, flow: Flow) -> Any:
        """Drive a protocol flow to its end over this client."""
        return await drive_async(flow, self.send)

    async def ready(self) -> bool:
        """Whether ``/readyz`` answers 200.

        Example:
            >>> await client.ready()  # doctest: +SKIP
            True
        """
        try:
            response = await self._http.get("/readyz", timeout=min(self._t.timeout, 5.0))
        except httpx.TransportError:
            return False
        return response.status_code == 200

    async def models(self) -> list[ModelInfo]:
        """The loaded models.

        Example:
            >>> models = await client.models()  # doctest: +SKIP
        """
        return _models(await self.send(Call("GET", "/v1/models")))

    async def session(
        self,
        model: str | None = None,
        *,
        deterministic: bool = True,
        seed: int | None = None,
        ttl_s: float | None = None,
    ) -> AsyncSession:
        """Create a session.

        Example:
            >>> session = await client.session("point-nav")  # doctest: +SKIP
        """
        body = _create_body(model, deterministic, seed, ttl_s)
        key = new_route_key()
        reply = await self.send(Call("POST", "/v1/sessions", body, route_key=key))
        if reply.status != 201:
            raise reply.error()
        info = ModelInfo.from_json(reply.body["model"])
        state = SessionState(info, str(reply.body["session_id"]), {**body, "model": info.name}, key)
        return AsyncSession(self, state)

    async def act_batch(
        self,
        sessions: Sequence[AsyncSession],
        observations: ArrayLike,
        rewards: ArrayLike | None = None,
        episode_starts: ArrayLike | None = None,
    ) -> FloatArray:
        """Step many sessions in one request.

        Example:
            >>> actions = await client.act_batch(sessions, np.zeros((len(sessions), 2)))  # doctest: +SKIP
        """
        states, transitions = _prepare_batch(
            [s.state for s in sessions], observations, rewards, episode_starts
        )
        return np.asarray(await self.run(batch_flow(states, transitions)), np.float32)

    async def vector(
        self,
        num_envs: int,
        model: str | None = None,
        *,
        deterministic: bool = True,
        seed: int | None = None,
        ttl_s: float | None = None,
        transport: Literal["batch", "stream"] = "batch",
    ) -> AsyncVectorSession:
        """As :meth:`PolicyClient.vector`; ``transport="stream"`` sends each tick as one frame of the
        vectorised stream ``WS /v1/stream`` (the ``stream`` extra) instead of an HTTP request.

        Example:
            >>> envs = await client.vector(1024, transport="stream")  # doctest: +SKIP
        """
        from trmrl_client.vector import AsyncVectorSession, VectorState, create_sessions_flow

        if transport not in ("batch", "stream"):
            raise ValueError(f"transport must be 'batch' or 'stream', got {transport!r}")
        body = _create_body(model, deterministic, seed, ttl_s)
        key = new_route_key()
        ids, info = await self.run(create_sessions_flow(num_envs, body, key))
        state = VectorState(info, ids, _recreate_body(body, info.name), key)
        if transport == "batch":
            return AsyncVectorSession(self, state, self.send)
        from trmrl_client.stream import VectorLink

        link = VectorLink(self, info.name, key)
        return AsyncVectorSession(self, state, link.send, link)


class AsyncSession:
    """One session of an :class:`AsyncPolicyClient` (methods as :class:`Session`, awaitable).

    Example:
        >>> action = await session.act([0.0, 0.0], episode_start=True)  # doctest: +SKIP
    """

    def __init__(self, client: AsyncPolicyClient, state: SessionState) -> None:
        self.client = client
        self.state = state

    @property
    def session_id(self) -> str:
        return self.state.session_id

    @property
    def model(self) -> ModelInfo:
        return self.state.model

    @property
    def step(self) -> int:
        return self.state.next_step

    @property
    def recoveries(self) -> int:
        return self.state.recoveries

    async def act(
        self,
        observation: ArrayLike,
        reward: float = 0.0,
        episode_start: bool = False,
        applied_action: ArrayLike | None = None,
        *,
        timeout: float | None = None,
    ) -> FloatArray:
        """The action for ``observation`` (see :meth:`Session.act`).

        Example:
            >>> await session.act([0.1, 0.2], reward=-0.8)  # doctest: +SKIP
        """
        tr = self.state.prepare(observation, reward, episode_start, applied_action)
        deadline = None if timeout is None else time.monotonic() + timeout
        return np.asarray(await self.client.run(self.state.act_flow(tr, deadline)), np.float32)

    async def reset(self, scope: Scope = "episode") -> None:
        """Start a new episode or trial.

        Example:
            >>> await session.reset()  # doctest: +SKIP
        """
        await self.client.run(self.state.reset_flow(scope))

    async def snapshot(self) -> Any:
        """Fetch and keep the session's snapshot.

        Example:
            >>> await session.snapshot()  # doctest: +SKIP
        """
        return await self.client.run(self.state.snapshot_flow())

    async def close(self) -> None:
        """Delete the session on the service.

        Example:
            >>> await session.close()  # doctest: +SKIP
        """
        try:
            reply = await self.client.send(self.state.call("DELETE", f"/v1/sessions/{self.session_id}"))
        except ServiceUnavailable:
            return
        if not reply.ok and reply.status != 404:
            raise reply.error()


async def drive_async(flow: Flow, send: Any) -> Any:
    """Run a protocol flow with an async ``send(call) -> Reply``.

    Example:
        >>> action = await drive_async(session.state.act_flow(tr), client.send)  # doctest: +SKIP
    """
    reply: Reply | None = None
    failure: ServiceUnavailable | None = None
    while True:
        try:
            call = flow.throw(failure) if failure is not None else flow.send(reply)  # type: ignore[arg-type]
        except StopIteration as stop:
            return stop.value
        failure = None
        try:
            reply = await send(call)
        except ServiceUnavailable as exc:
            failure, reply = exc, None


def _prepare_batch(
    states: Sequence[SessionState],
    observations: ArrayLike,
    rewards: ArrayLike | None,
    episode_starts: ArrayLike | None,
) -> tuple[list[SessionState], list[Any]]:
    n = len(states)
    obs = np.asarray(observations, dtype=np.float64)
    if obs.ndim != 2 or obs.shape[0] != n:
        raise ValueError(f"observations must be [{n}, obs_dim], got shape {obs.shape}")
    rew = np.zeros(n) if rewards is None else np.asarray(rewards, dtype=np.float64).reshape(n)
    starts = np.zeros(n, bool) if episode_starts is None else np.asarray(episode_starts, bool).reshape(n)
    if len({id(s) for s in states}) != n:
        raise ValueError("a session appears twice in one batch")
    transitions = [
        state.prepare(obs[i], float(rew[i]), bool(starts[i]), None) for i, state in enumerate(states)
    ]
    return list(states), transitions


__all__ = ["AsyncPolicyClient", "AsyncSession", "PolicyClient", "ServiceError", "Session"]
