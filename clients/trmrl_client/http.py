"""HTTP clients of the policy service: :class:`PolicyClient` (blocking) and :class:`AsyncPolicyClient`.

Both speak the v1 API with httpx and take and return numpy arrays. Underneath each is an HTTP
transport (:class:`HttpTransport`, :class:`AsyncHttpTransport`) that makes one try of a request at a
time; what to send, what to retry (a timeout, a dropped connection, a ``429``/``503``: safe, since
every act carries the session's step number and the service answers a re-sent step with the same
action) and how to recover a session the service lost is decided once, without I/O, in
:mod:`trmrl_client.retry` and :mod:`trmrl_client.protocol`. A client is itself a transport (its
sessions run over it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import httpx
import numpy as np
from numpy.typing import ArrayLike

from trmrl_client import routes
from trmrl_client.codec import jsonable, packb, unpackb
from trmrl_client.errors import ServiceError, ServiceUnavailable
from trmrl_client.protocol import (
    ROUTE_HEADER,
    Call,
    FloatArray,
    Flow,
    ModelInfo,
    Reply,
    Transition,
    batch_flow,
    create_body,
    create_flow,
    models_flow,
    new_route_key,
)
from trmrl_client.retry import MAX_BACKOFF_S, Outcome, RetryPolicy, Try, drive, drive_async, tries
from trmrl_client.session import AsyncSession, Session
from trmrl_client.transport import run as run_flow
from trmrl_client.transport import run_async as run_flow_async
from trmrl_client.vector import AsyncVectorSession, VectorLedger, VectorSession, create_sessions_flow

Encoding = Literal["json", "msgpack"]
MSGPACK = "application/msgpack"


class HttpTransport:
    """One try of a call as one HTTP request over an ``httpx.Client`` (a
    :class:`~trmrl_client.transport.Transport`).

    Act routes' bodies travel as MessagePack with ``encoding="msgpack"``, every other body as JSON.

    Example:
        >>> transport = HttpTransport(httpx.Client(base_url=url), RetryPolicy(10.0, 3))  # doctest: +SKIP
        >>> transport.attempt(Try(Call.to(routes.MODELS), 10.0)).status  # doctest: +SKIP
        200
    """

    def __init__(self, http: httpx.Client, policy: RetryPolicy, encoding: Encoding = "json") -> None:
        self.http = http
        self.policy = policy
        self.encoding = encoding

    def attempt(self, step: Try) -> Outcome:
        """One try of a call, no retry: its reply, or why there was none."""
        try:
            return _reply(self.http.request(**_request(step, self.encoding)))
        except httpx.TransportError as exc:
            return _unavailable(step.call, exc)


class AsyncHttpTransport:
    """One try of a call as one HTTP request over an ``httpx.AsyncClient`` (see :class:`HttpTransport`).

    Example:
        >>> reply = await AsyncHttpTransport(http, policy).attempt(step)  # doctest: +SKIP
    """

    def __init__(self, http: httpx.AsyncClient, policy: RetryPolicy, encoding: Encoding = "json") -> None:
        self.http = http
        self.policy = policy
        self.encoding = encoding

    async def attempt(self, step: Try) -> Outcome:
        """One try of a call, no retry: its reply, or why there was none."""
        try:
            return _reply(await self.http.request(**_request(step, self.encoding)))
        except httpx.TransportError as exc:
            return _unavailable(step.call, exc)


def _check_encoding(encoding: str) -> None:
    if encoding not in ("json", "msgpack"):
        raise ValueError(f"encoding must be 'json' or 'msgpack', got {encoding!r}")
    if encoding == "msgpack":
        import msgpack  # noqa: F401 -- fail now if the stream extra is missing


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _request(step: Try, encoding: Encoding) -> dict[str, Any]:
    """The keyword arguments of ``httpx`` for one try of a call."""
    call = step.call
    headers = {ROUTE_HEADER: call.route_key} if call.route_key else {}
    content: bytes | None = None
    json: Any = None
    if call.body is not None and encoding == "msgpack" and call.route is not None and call.route.binary:
        headers.update({"Content-Type": MSGPACK, "Accept": MSGPACK})
        content = packb(call.body)
    elif call.body is not None:
        json = jsonable(call.body)
    return {
        "method": call.method,
        "url": call.path,
        "headers": headers,
        "content": content,
        "json": json,
        "timeout": step.timeout,
    }


def _reply(response: httpx.Response) -> Reply:
    """The decoded reply, with the wait a transient refusal (capacity, starting, draining) asks for."""
    status = response.status_code
    retry_after = None
    if status in (429, 503):
        try:
            retry_after = min(float(response.headers.get("retry-after", "0.1")), MAX_BACKOFF_S)
        except ValueError:
            retry_after = 0.1
    if not response.content:
        return Reply(status, None, retry_after)
    if response.headers.get("content-type", "").startswith(MSGPACK):
        return Reply(status, unpackb(response.content), retry_after)
    try:
        return Reply(status, response.json(), retry_after)
    except ValueError:
        body = {"error": {"code": "bad_reply", "message": response.text[:200]}}
        return Reply(status, body, retry_after)


def _unavailable(call: Call, exc: httpx.TransportError) -> ServiceUnavailable:
    """The outcome of a try that got no reply."""
    if isinstance(exc, httpx.TimeoutException):
        return ServiceUnavailable("timeout", f"{call.method} {call.path}: no reply in time ({exc})")
    return ServiceUnavailable("unreachable", f"{call.method} {call.path}: {exc}")


def _recreate_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """How one env of a vector is recreated after the service lost it (its own seed is not kept)."""
    return {**{k: v for k, v in body.items() if k != "seed"}, "model": model}


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
        _check_encoding(encoding)
        self._url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self._url, headers=_auth_headers(api_key), timeout=timeout, transport=transport
        )
        self._transport = HttpTransport(self._http, RetryPolicy(timeout, retries), encoding)

    @property
    def url(self) -> str:
        return self._url

    @property
    def policy(self) -> RetryPolicy:
        """The timeout of one try and the number of retries, for every call of this client."""
        return self._transport.policy

    def close(self) -> None:
        """Close the connection pool (sessions on the service stay until deleted or expired)."""
        self._http.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------
    def attempt(self, step: Try) -> Outcome:
        """One try of a call, no retry: its reply, or why there was none."""
        return self._transport.attempt(step)

    def send(self, call: Call) -> Reply:
        """Send one call, retrying transport failures and transient refusals; raise when out of tries."""
        reply: Reply = drive(tries(call, self.policy), self.attempt)
        return reply

    def run(self, flow: Flow) -> Any:
        """Drive a protocol flow to its end over this client."""
        return run_flow(self._transport, flow)

    # -- API -----------------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200 (``False`` if unreachable).

        Example:
            >>> PolicyClient("http://127.0.0.1:9").ready()  # doctest: +SKIP
            False
        """
        try:
            response = self._http.get(routes.READY.path(), timeout=min(self.policy.timeout, 5.0))
        except httpx.TransportError:
            return False
        return response.status_code == 200

    def models(self) -> list[ModelInfo]:
        """The loaded models (``GET /v1/models``).

        Example:
            >>> [m.name for m in client.models()]  # doctest: +SKIP
            ['point-nav', 'point-nav-memoryless', 'point-nav-oracle']
        """
        models: list[ModelInfo] = self.run(models_flow())
        return models

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
        deadline = None if timeout is None else time.monotonic() + timeout
        body = create_body(model, deterministic, seed, ttl_s)
        return Session(self, self.run(create_flow(body, new_route_key(), deadline)))

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
        flow = _batch(sessions, observations, rewards, episode_starts)
        return np.asarray(self.run(flow), np.float32)

    def vector(
        self,
        num_envs: int,
        model: str | None = None,
        *,
        deterministic: bool = True,
        seed: int | None = None,
        ttl_s: float | None = None,
    ) -> VectorSession:
        """Create ``num_envs`` sessions stepped together, one columnar request per tick (arrays in, out).

        Every env gets its own session; with ``seed``, env ``i`` is seeded ``seed + i``.

        Example:
            >>> envs = client.vector(8, "point-nav")  # doctest: +SKIP
            >>> envs.act(np.zeros((8, 2)), episode_starts=np.ones(8, bool)).shape  # doctest: +SKIP
            (8, 2)
        """
        body = create_body(model, deterministic, seed, ttl_s)
        key = new_route_key()
        ids, info = self.run(create_sessions_flow(num_envs, body, key))
        return VectorSession(self, VectorLedger(info, ids, _recreate_body(body, info.name), key))


class AsyncPolicyClient:
    """The asyncio :class:`PolicyClient` (same arguments, awaitable methods).

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
        _check_encoding(encoding)
        self._url = url.rstrip("/")
        self._headers = _auth_headers(api_key)
        self._http = httpx.AsyncClient(
            base_url=self._url,
            headers=self._headers,
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._transport = AsyncHttpTransport(self._http, RetryPolicy(timeout, retries), encoding)

    @property
    def url(self) -> str:
        return self._url

    @property
    def api_key_headers(self) -> dict[str, str]:
        """The authorization header (empty without an API key)."""
        return dict(self._headers)

    @property
    def policy(self) -> RetryPolicy:
        """The timeout of one try and the number of retries, for every transport of this client."""
        return self._transport.policy

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncPolicyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- plumbing ------------------------------------------------------------------------------------
    async def attempt(self, step: Try) -> Outcome:
        """One try of a call, no retry (see :meth:`PolicyClient.attempt`)."""
        return await self._transport.attempt(step)

    async def send(self, call: Call) -> Reply:
        """Send one call with retries (see :meth:`PolicyClient.send`)."""
        reply: Reply = await drive_async(tries(call, self.policy), self.attempt)
        return reply

    async def run(self, flow: Flow) -> Any:
        """Drive a protocol flow to its end over this client."""
        return await run_flow_async(self._transport, flow)

    # -- API -----------------------------------------------------------------------------------------
    async def ready(self) -> bool:
        """Whether ``/readyz`` answers 200.

        Example:
            >>> await client.ready()  # doctest: +SKIP
            True
        """
        try:
            response = await self._http.get(routes.READY.path(), timeout=min(self.policy.timeout, 5.0))
        except httpx.TransportError:
            return False
        return response.status_code == 200

    async def models(self) -> list[ModelInfo]:
        """The loaded models.

        Example:
            >>> models = await client.models()  # doctest: +SKIP
        """
        models: list[ModelInfo] = await self.run(models_flow())
        return models

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
        body = create_body(model, deterministic, seed, ttl_s)
        return AsyncSession(self, await self.run(create_flow(body, new_route_key())))

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
        flow = _batch(sessions, observations, rewards, episode_starts)
        return np.asarray(await self.run(flow), np.float32)

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
        if transport not in ("batch", "stream"):
            raise ValueError(f"transport must be 'batch' or 'stream', got {transport!r}")
        body = create_body(model, deterministic, seed, ttl_s)
        key = new_route_key()
        ids, info = await self.run(create_sessions_flow(num_envs, body, key))
        ledger = VectorLedger(info, ids, _recreate_body(body, info.name), key)
        if transport == "batch":
            return AsyncVectorSession(self, ledger)
        from trmrl_client.websocket import VectorStream

        return AsyncVectorSession(self, ledger, VectorStream(self.url, self.api_key_headers, info.name))


def _batch(
    sessions: Sequence[Session] | Sequence[AsyncSession],
    observations: ArrayLike,
    rewards: ArrayLike | None,
    episode_starts: ArrayLike | None,
) -> Flow:
    """The flow of one ``act_batch``: every session's step validated and numbered first."""
    ledgers = [s.ledger for s in sessions]
    n = len(ledgers)
    obs = np.asarray(observations, dtype=np.float64)
    if obs.ndim != 2 or obs.shape[0] != n:
        raise ValueError(f"observations must be [{n}, obs_dim], got shape {obs.shape}")
    rew = np.zeros(n) if rewards is None else np.asarray(rewards, dtype=np.float64).reshape(n)
    starts = np.zeros(n, bool) if episode_starts is None else np.asarray(episode_starts, bool).reshape(n)
    if len({id(s) for s in ledgers}) != n:
        raise ValueError("a session appears twice in one batch")
    transitions: list[Transition] = [
        ledger.prepare(obs[i], float(rew[i]), bool(starts[i]), None) for i, ledger in enumerate(ledgers)
    ]
    return batch_flow(ledgers, transitions)


__all__ = ["AsyncPolicyClient", "AsyncSession", "PolicyClient", "ServiceError", "Session"]
