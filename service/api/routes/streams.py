"""WebSocket streams: a session's act stream, and the openpi-compatible policy endpoint.

Both run each frame through :func:`service.core.acting.act`, the same call the HTTP act
route makes: same validation, same idempotent step numbers, same batching with every other session.
A bad frame is answered with an error frame and the stream stays open; closing a stream leaves its
session as it is, usable over HTTP. Heartbeats are WebSocket pings sent by the server
(``TRMRL_WS_PING_INTERVAL_S``); a peer that stops answering them is disconnected.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from trmrl_client.codec import packb

from service.api import errors
from service.api.body import decode_msgpack, decode_tick, validate
from service.api.columnar import columnar_body
from service.api.deps import authenticate, registry_of
from service.api.errors import status_of
from service.api.replies import error_reply
from service.api.schemas.act import ActRequest, StreamFrame
from service.api.schemas.sessions import CreateSessionRequest
from service.core import acting
from service.core.errors import ServiceError
from service.core.registry import ModelRegistry
from service.metrics import ServiceMetrics

log = logging.getLogger("trmrl.service")

router = APIRouter(tags=["streams"])


async def refuse(websocket: WebSocket, error: ServiceError) -> None:
    """Turn a handshake down with the HTTP error reply (401, 404, ...), or close it if that is unsupported."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_reply(error))
    else:
        await websocket.close(code=1008, reason=error.code)


def _as_request(session_id: str, frame: StreamFrame) -> ActRequest:
    return ActRequest.model_construct(
        session_id=session_id,
        model=None,
        observation=frame.observation,
        reward=frame.reward,
        episode_start=frame.episode_start,
        step=frame.step,
        applied_action=frame.applied_action,
    )


def _decode_frame(message: Mapping[str, Any], limit: int) -> tuple[StreamFrame, bool]:
    """A received frame as a validated step, and whether it came as MessagePack (binary)."""
    data, text = message.get("bytes"), message.get("text")
    size = len(data) if data is not None else len(text or "")
    if size > limit:
        raise errors.body_too_large(limit)
    if data is not None:
        return validate(StreamFrame, decode_msgpack(data)), True
    try:
        return StreamFrame.model_validate_json(text or ""), False
    except ValidationError as exc:
        raise errors.from_validation(exc) from None


STREAM_ROUTE = "/v1/sessions/{session_id}/stream"
VECTOR_ROUTE = "/v1/stream"
OPENPI_ROUTE = "/v1/openpi"


@router.websocket(STREAM_ROUTE)
async def session_stream(websocket: WebSocket, session_id: str) -> None:
    """Act frames in, actions out: JSON text frames get JSON replies, MessagePack binary ones MessagePack."""
    try:
        owner = authenticate(websocket.scope)
        registry = registry_of(websocket)
        registry.find(session_id, owner)
    except ServiceError as exc:
        await refuse(websocket, exc)
        return
    limit: int = websocket.app.state.settings.max_body_bytes

    async def answer(message: Mapping[str, Any], started: int) -> dict[str, Any]:
        frame, _ = _decode_frame(message, limit)
        result = await acting.act(registry, _as_request(session_id, frame), started, owner)
        return {
            "session_id": result.session_id,
            "step": result.step,
            "action": result.action,
            "model_version": result.model_version,
            "server_timing_us": result.server_timing_us,
        }

    await _serve_frames(websocket, STREAM_ROUTE, "stream", {"session_id": session_id}, answer)


async def _serve_frames(
    websocket: WebSocket,
    route: str,
    kind: str,
    context: dict[str, Any],
    answer: Callable[[Mapping[str, Any], int], Awaitable[dict[str, Any]]],
) -> None:
    """Accept a stream and answer each frame in its own encoding until the peer goes away.

    ``answer(message, started_ns)`` gives a frame's reply or raises :class:`ServiceError`, which becomes
    an error frame: the stream stays open.
    """
    await websocket.accept()
    metrics: ServiceMetrics = websocket.app.state.metrics
    opened = metrics.streams.labels(kind)
    opened.inc()
    log.info("%s opened", kind, extra=context)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            started = time.perf_counter_ns()
            binary = message.get("bytes") is not None
            reply: dict[str, Any]
            status = 200
            try:
                reply = await answer(message, started)
            except ServiceError as exc:
                reply, status = exc.body(), status_of(exc)
            if binary:
                await websocket.send_bytes(packb(reply))
            else:
                await websocket.send_text(json.dumps(reply, separators=(",", ":"), allow_nan=False))
            metrics.observe_request(route, "WS", status, (time.perf_counter_ns() - started) / 1e9)
    except WebSocketDisconnect:
        pass
    finally:
        opened.dec()
        log.info("%s closed", kind, extra=context)


@router.websocket(VECTOR_ROUTE)
async def vector_stream(websocket: WebSocket, model: str | None = None) -> None:
    """A whole tick of many sessions per frame: columnar frames in, columnar replies out.

    Each frame is the columnar body of ``POST /v1/act/batch`` (MessagePack binary frames with
    msgpack-numpy arrays, or JSON text frames with nested lists) and is answered with the columnar
    reply in the same encoding; rows that fail are listed in its ``errors``. A malformed frame gets an
    error frame and the stream stays open. ``model`` (query) is the model of frames that name none.
    """
    try:
        owner = authenticate(websocket.scope)
        registry = registry_of(websocket)
        if model is not None:
            registry.engine(model)
    except ServiceError as exc:
        await refuse(websocket, exc)
        return
    limit: int = websocket.app.state.settings.max_body_bytes

    async def answer(message: Mapping[str, Any], started: int) -> dict[str, Any]:
        binary = message.get("bytes") is not None
        raw: bytes | str = message["bytes"] if binary else (message.get("text") or "")
        if len(raw) > limit:
            raise errors.body_too_large(limit)
        result = await acting.act_columnar(registry, decode_tick(raw, binary), started, owner, model)
        return columnar_body(result, arrays=binary)

    await _serve_frames(websocket, VECTOR_ROUTE, "vector", {"model": model}, answer)


def _openpi_session(
    registry: ModelRegistry, model: str | None, session_id: str | None, owner: str | None
) -> str:
    if session_id is not None:
        engine, _ = registry.find(session_id, owner)
        if model is not None and model != engine.name:
            raise ServiceError(
                "model_mismatch",
                f"Session {session_id} runs model {engine.name!r}, not {model!r}.",
                {"session_model": engine.name, "model": model},
            )
        return session_id
    _, created = registry.create_session(CreateSessionRequest(model=model), owner)
    return created


@router.websocket(OPENPI_ROUTE)
async def openpi(websocket: WebSocket, model: str | None = None, session_id: str | None = None) -> None:
    """The openpi websocket policy protocol (``openpi-client``'s ``WebsocketClientPolicy``).

    On connect the server sends the model's metadata (MessagePack, with the ``session_id``); each
    MessagePack frame ``{"observation", "reward"?, "episode_start"?}`` gets
    ``{"actions": float32 [1, act_dim], "server_timing": {...}}``. The connection is one session (a
    new one, or ``session_id``'s); it outlives the connection until its idle TTL, so a robot can
    reconnect to it. Errors come back as text frames, which the openpi client raises as errors.
    """
    try:
        owner = authenticate(websocket.scope, api_key_scheme=True)
        registry = registry_of(websocket)
        sid = _openpi_session(registry, model, session_id, owner)
        engine, _ = registry.find(sid, owner)
    except ServiceError as exc:
        await refuse(websocket, exc)
        return
    await websocket.accept()
    metrics: ServiceMetrics = websocket.app.state.metrics
    limit: int = websocket.app.state.settings.max_body_bytes
    opened = metrics.streams.labels("openpi")
    opened.inc()
    log.info("openpi stream opened", extra={"session_id": sid, "model": engine.name})
    metadata = {"session_id": sid, **dataclasses.asdict(engine.info(default=engine.name == registry.default))}
    try:
        await websocket.send_bytes(packb(metadata))
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            started = time.perf_counter_ns()
            status = 200
            try:
                if message.get("bytes") is None:
                    raise ServiceError(
                        "unsupported_frame", "The openpi endpoint takes MessagePack binary frames only."
                    )
                frame, _ = _decode_frame(message, limit)
                result = await acting.act(registry, _as_request(sid, frame), started, owner)
                reply = {
                    "actions": np.asarray(result.action, np.float32)[None, :],
                    "session_id": sid,
                    "step": result.step,
                    "model_version": result.model_version,
                    "server_timing": {
                        "infer_ms": (time.perf_counter_ns() - started) / 1e6,
                        "server_us": result.server_timing_us,
                    },
                }
                await websocket.send_bytes(packb(reply))
            except ServiceError as exc:
                # A text frame: the openpi client raises it as the server's error.
                status = status_of(exc)
                await websocket.send_text(json.dumps(exc.body(), separators=(",", ":")))
            metrics.observe_request(OPENPI_ROUTE, "WS", status, (time.perf_counter_ns() - started) / 1e9)
    except WebSocketDisconnect:
        pass
    finally:
        opened.dec()
        log.info("openpi stream closed", extra={"session_id": sid, "model": engine.name})
