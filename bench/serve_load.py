"""A light HTTP/1.1 load generator for the act API: one asyncio process, raw keep-alive connections.

The load generator shares the machine's cores with the server it measures, so it does as little as
it can per request: request heads are preformatted, bodies are built with string formatting, and
responses are framed by ``Content-Length`` without a full HTTP parser (the servers under test
always send it). Every session is a closed loop: send a step, wait for its action, send the next.
A request counts if it starts inside the measured window (whenever it ends), so slow replies are
not cut off.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np


class HttpError(RuntimeError):
    pass


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"content-length:")
        length = 0
        if at >= 0:
            eol = head.find(b"\r\n", at)
            length = int(head[at + 15 : eol if eol >= 0 else len(head)])
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        status = int(self.buffer[9:12])
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, body))

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        if self.closed:
            raise HttpError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(head % len(body) + body)
        return await self.waiter


async def connect(host: str, port: int) -> _Connection:
    _, protocol = await asyncio.get_running_loop().create_connection(_Connection, host, port)
    return protocol


def _head(path: str, host: str, content_type: str = "application/json") -> bytes:
    # %d is filled with the body length per request.
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: %d\r\n\r\n"
    ).encode()


@dataclass
class LoadResult:
    """What one load run measured."""

    sessions: int
    endpoint: str
    requests: int
    actions: int
    errors: int
    seconds: float
    latencies_ms: np.ndarray
    measured_from: float = 0.0
    """``time.perf_counter()`` at which the measured window opened (it lasts ``seconds``)."""

    @property
    def actions_per_s(self) -> float:
        return self.actions / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "endpoint": self.endpoint,
            "requests": self.requests,
            "actions": self.actions,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "actions_per_s": round(self.actions_per_s, 1),
            "p50_ms": round(self.percentile(50), 3),
            "p99_ms": round(self.percentile(99), 3),
        }


def _observation(rng: random.Random, obs_dim: int) -> str:
    return "[" + ",".join(f"{rng.uniform(-1, 1):.4f}" for _ in range(obs_dim)) + "]"


async def create_sessions(host: str, port: int, count: int, model: str | None = None) -> list[str]:
    """Create ``count`` sessions over a few connections."""
    body = json.dumps({"model": model} if model else {}).encode()
    head = _head("/v1/sessions", host)
    conns = [await connect(host, port) for _ in range(min(8, count))]
    ids: list[str] = []

    async def worker(conn: _Connection, n: int) -> None:
        for _ in range(n):
            status, reply = await conn.request(head, body)
            if status != 201:
                raise HttpError(f"session creation failed: {status} {reply[:200]!r}")
            ids.append(json.loads(reply)["session_id"])

    shares = [count // len(conns) + (i < count % len(conns)) for i in range(len(conns))]
    await asyncio.gather(*(worker(c, n) for c, n in zip(conns, shares, strict=True)))
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()
    return ids


async def _closed_loop(
    clients: int,
    tick: Callable[[int, int], Awaitable[tuple[int, int]]],
    *,
    sessions: int,
    endpoint: str,
    duration_s: float,
    warmup_s: float,
) -> LoadResult:
    """``clients`` closed loops, each awaiting ``tick(client, step)`` -- its actions answered and failed
    -- again as soon as it returns; the ticks begun ``warmup_s`` after the start, for ``duration_s``,
    are measured."""
    latencies: list[float] = []
    counts = {"requests": 0, "actions": 0, "errors": 0}
    measure_from = time.perf_counter() + warmup_s
    stop_at = measure_from + duration_s

    async def loop(k: int) -> None:
        step = 0
        perf = time.perf_counter
        while (t0 := perf()) < stop_at:
            answered, failed = await tick(k, step)
            step += 1
            if t0 >= measure_from:
                latencies.append(perf() - t0)
                counts["requests"] += 1
                counts["actions"] += answered
                counts["errors"] += failed

    await asyncio.gather(*(loop(k) for k in range(clients)))
    return LoadResult(
        sessions,
        endpoint,
        counts["requests"],
        counts["actions"],
        counts["errors"],
        duration_s,
        np.asarray(latencies) * 1e3,
        measure_from,
    )


def _close(conns: list[_Connection]) -> None:
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()


async def run_act(
    host: str, port: int, sessions: int, obs_dim: int, *, duration_s: float, warmup_s: float, seed: int = 0
) -> LoadResult:
    """``sessions`` closed-loop clients, one connection and one session each, over ``/v1/act``."""
    ids = await create_sessions(host, port, sessions)
    rng = random.Random(seed)
    observations = [_observation(rng, obs_dim) for _ in range(sessions)]
    head = _head("/v1/act", host)
    conns = [await connect(host, port) for _ in range(sessions)]

    async def tick(i: int, step: int) -> tuple[int, int]:
        body = f'{{"session_id":"{ids[i]}","observation":{observations[i]},"reward":0.5,"step":{step}}}'
        status, _ = await conns[i].request(head, body.encode())
        return (1, 0) if status == 200 else (0, 1)

    result = await _closed_loop(
        sessions, tick, sessions=sessions, endpoint="act", duration_s=duration_s, warmup_s=warmup_s
    )
    _close(conns)
    return result


async def run_batch(
    host: str,
    port: int,
    sessions: int,
    obs_dim: int,
    *,
    duration_s: float,
    warmup_s: float,
    simulators: int = 4,
    seed: int = 0,
) -> LoadResult:
    """``simulators`` closed-loop clients, each stepping its share of the sessions in one
    ``/v1/act/batch`` request per tick (how a vectorised simulator drives the service)."""
    ids = await create_sessions(host, port, sessions)
    simulators = max(1, min(simulators, sessions))
    rng = random.Random(seed)
    observations = [_observation(rng, obs_dim) for _ in range(sessions)]
    head = _head("/v1/act/batch", host)
    conns = [await connect(host, port) for _ in range(simulators)]
    groups = [list(range(sessions))[k::simulators] for k in range(simulators)]

    async def tick(k: int, step: int) -> tuple[int, int]:
        members = groups[k]
        items = ",".join(
            f'{{"session_id":"{ids[i]}","observation":{observations[i]},"reward":0.5,"step":{step}}}'
            for i in members
        )
        status, reply = await conns[k].request(head, f'{{"items":[{items}]}}'.encode())
        failed = len(members) if status != 200 else reply.count(b'"error":')
        return len(members) - failed, failed

    result = await _closed_loop(
        simulators, tick, sessions=sessions, endpoint="batch", duration_s=duration_s, warmup_s=warmup_s
    )
    _close(conns)
    return result


async def run_sequential(host: str, port: int, obs_dim: int, steps: int, warmup: int = 200) -> LoadResult:
    """One session, ``steps`` sequential ``/v1/act`` round trips (after ``warmup`` unmeasured ones)."""
    (sid,) = await create_sessions(host, port, 1)
    obs = _observation(random.Random(1), obs_dim)
    head = _head("/v1/act", host)
    conn = await connect(host, port)
    latencies = np.empty(steps)
    errors = 0
    perf = time.perf_counter
    started = 0.0
    for step in range(warmup + steps):
        body = f'{{"session_id":"{sid}","observation":{obs},"reward":0.5,"step":{step}}}'.encode()
        if step == warmup:
            started = perf()
        t0 = perf()
        status, _ = await conn.request(head, body)
        if step >= warmup:
            latencies[step - warmup] = perf() - t0
            errors += status != 200
    seconds = perf() - started
    assert conn.transport is not None
    conn.transport.close()
    return LoadResult(1, "act-sequential", steps, steps - errors, errors, seconds, latencies * 1e3)


async def run_stream(
    host: str,
    port: int,
    sessions: int,
    obs_dim: int,
    *,
    duration_s: float,
    warmup_s: float,
    encoding: str = "json",
    seed: int = 0,
) -> LoadResult:
    """``sessions`` closed-loop clients, one WebSocket stream (``/v1/sessions/{id}/stream``) each.

    ``encoding``: ``json`` (text frames) or ``msgpack`` (binary frames, the observation as a
    msgpack-numpy float32 array).
    """
    from trmrl_client.codec import packb
    from websockets.asyncio.client import connect as ws_connect

    ids = await create_sessions(host, port, sessions)
    rng = random.Random(seed)
    observations = [_observation(rng, obs_dim) for _ in range(sessions)]
    arrays = [np.asarray(json.loads(o), np.float32) for o in observations]
    streams = []
    for sid in ids:
        url = f"ws://{host}:{port}/v1/sessions/{sid}/stream"
        streams.append(await ws_connect(url, compression=None, ping_interval=None, max_size=None))

    async def tick(i: int, step: int) -> tuple[int, int]:
        ws = streams[i]
        if encoding == "json":
            await ws.send(f'{{"observation":{observations[i]},"reward":0.5,"step":{step}}}')
            ok = b'"error"' not in (await ws.recv(decode=False))
        else:
            await ws.send(packb({"observation": arrays[i], "reward": 0.5, "step": step}))
            ok = b"error" not in (await ws.recv(decode=False))[:16]
        return (1, 0) if ok else (0, 1)

    result = await _closed_loop(
        sessions,
        tick,
        sessions=sessions,
        endpoint=f"stream-{encoding}",
        duration_s=duration_s,
        warmup_s=warmup_s,
    )
    await asyncio.gather(*(ws.close() for ws in streams))
    return result


async def create_many(host: str, port: int, count: int) -> list[str]:
    """``count`` sessions in one ``POST /v1/sessions`` (``count``)."""
    conn = await connect(host, port)
    status, reply = await conn.request(_head("/v1/sessions", host), json.dumps({"count": count}).encode())
    if status != 201:
        raise HttpError(f"session creation failed: {status} {reply[:200]!r}")
    assert conn.transport is not None
    conn.transport.close()
    return list(json.loads(reply)["session_ids"])


#: How a reply with no failed rows ends its ``errors`` field, per encoding (cheap to look for).
_NO_ERRORS = {"json": b'"errors":[]', "msgpack": b"\xa6errors\x90"}


def _tick_bodies(ids: list[str], obs: np.ndarray, encoding: str) -> Any:
    """A function of the step number that returns a tick's columnar body in ``encoding``.

    The observations do not change between ticks (the server cannot tell), so their encoding is
    made once: the load generator then costs little per tick next to the server it measures.
    """
    from trmrl_client.codec import packb

    n = len(ids)
    if encoding == "msgpack":
        fixed = {"session_ids": ids, "observations": obs, "rewards": np.full(n, 0.5, np.float32)}
        return lambda step: packb({**fixed, "steps": np.full(n, step, np.int64)})
    prefix = json.dumps({"session_ids": ids, "observations": obs.tolist(), "rewards": [0.5] * n})[:-1]
    return lambda step: f'{prefix},"steps":[{",".join([str(step)] * n)}]}}'.encode()


async def run_columnar(
    host: str,
    port: int,
    sessions: int,
    obs_dim: int,
    *,
    duration_s: float,
    warmup_s: float,
    encoding: str = "msgpack",
    simulators: int = 2,
    stream: bool = False,
    seed: int = 0,
    start_at: float | None = None,
) -> LoadResult:
    """``simulators`` closed-loop vectorised simulators, each stepping its share of the sessions as
    one columnar tick: a ``POST /v1/act/batch`` request, or a frame of ``WS /v1/stream`` (``stream``).

    ``start_at`` (``time.time()``): begin stepping then, once the sessions and connections exist, so
    that several load processes measure the same window."""
    from websockets.asyncio.client import connect as ws_connect

    ids = await create_many(host, port, sessions)
    simulators = max(1, min(simulators, sessions))
    obs = np.random.default_rng(seed).uniform(-1, 1, (sessions, obs_dim)).astype(np.float32)
    groups = [np.arange(sessions)[k::simulators] for k in range(simulators)]
    bodies = [_tick_bodies([ids[i] for i in g.tolist()], obs[g], encoding) for g in groups]
    kind = "application/msgpack" if encoding == "msgpack" else "application/json"
    head = _head("/v1/act/batch", host, kind)
    ok_marker = _NO_ERRORS[encoding]
    conns: list[Any] = []
    for _ in range(simulators):
        if stream:
            url = f"ws://{host}:{port}/v1/stream"
            conns.append(await ws_connect(url, compression=None, ping_interval=None, max_size=None))
        else:
            conns.append(await connect(host, port))
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.time()))

    async def tick(k: int, step: int) -> tuple[int, int]:
        conn, body, size = conns[k], bodies[k](step), len(groups[k])
        if stream:
            await conn.send(body if encoding == "msgpack" else body.decode())
            ok = ok_marker in await conn.recv(decode=False)
        else:
            status, reply = await conn.request(head, body)
            ok = status == 200 and ok_marker in reply
        return (size, 0) if ok else (0, size)

    result = await _closed_loop(
        simulators,
        tick,
        sessions=sessions,
        endpoint=f"{'vstream' if stream else 'columnar'}-{encoding}",
        duration_s=duration_s,
        warmup_s=warmup_s,
    )
    for conn in conns:
        if stream:
            await conn.close()
        else:
            conn.transport.close()
    return result
