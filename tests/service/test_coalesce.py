"""One socket write per reply (``service.coalesce``): the coalescing transport on its own, then uvicorn
with the coalescing protocol on a real port, serving the service (HTTP replies and WebSocket streams)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import websockets
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.app import create_app
from service.coalesce import CoalescingHttpToolsProtocol, CoalescingTransport
from service.config import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),  # the service's loop
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    backend: tuple[str, dict[str, bool]] = request.param
    return backend


class FakeTransport(asyncio.Transport):
    """Records what reaches the socket, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, Any]] = []
        self.closing = False
        self.buffered = 0

    def write(self, data: Any) -> None:
        self.events.append(("write", bytes(data)))
        self.buffered += len(data)

    def close(self) -> None:
        self.events.append(("close", None))
        self.closing = True

    def abort(self) -> None:
        self.events.append(("abort", None))
        self.closing = True

    def write_eof(self) -> None:
        self.events.append(("eof", None))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.events.append(("limits", (high, low)))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def next_iteration() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_iteration_reach_the_socket_as_one_write() -> None:
    raw = FakeTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"")
    transport.write(bytearray(b"{}"))
    assert raw.events == [] and transport.pending_bytes == 40
    await next_iteration()
    assert raw.events == [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")]
    assert transport.pending_bytes == 0
    transport.writelines([b"a", b"b"])
    transport.write(b"c")
    await next_iteration()
    assert raw.events[1:] == [("write", b"abc")]


async def test_close_and_eof_flush_first_and_abort_drops() -> None:
    raw = FakeTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())
    transport.write(b"one")
    transport.write(b"two")
    transport.write_eof()
    transport.write(b"three")
    transport.close()
    assert raw.events == [("write", b"onetwo"), ("eof", None), ("write", b"three"), ("close", None)]
    await next_iteration()  # the scheduled flushes find nothing left
    assert len(raw.events) == 4
    # A write to a closing transport goes straight through (the transport decides what to do with it).
    transport.write(b"late")
    assert raw.events[-1] == ("write", b"late")

    raw = FakeTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())
    transport.write(b"lost")
    transport.abort()
    await next_iteration()
    assert raw.events == [("abort", None)]


async def test_buffer_size_and_limits_see_every_byte_and_large_writes_go_at_once() -> None:
    raw = FakeTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())
    transport.write(b"x" * 10)
    assert transport.get_write_buffer_size() == 10
    assert raw.events == [("write", b"x" * 10)]
    transport.write(b"y")
    transport.set_write_buffer_limits(high=100)
    assert raw.events[1:] == [("write", b"y"), ("limits", (100, None))]
    # Reaching the high-water mark flushes at once, so uvicorn's flow control sees it.
    transport.write(b"z" * (HIGH_WATER_LIMIT - 1))
    assert len(raw.events) == 3
    transport.write(b"z")
    assert raw.events[3] == ("write", b"z" * HIGH_WATER_LIMIT)
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)
    assert transport.is_closing() is False


# -- uvicorn on a real port -------------------------------------------------------------------------------


class WriteLog:
    """A socket transport that records every write reaching it (a ``writelines`` is one write: one
    ``writev`` under uvloop); everything else is delegated."""

    def __init__(self, transport: asyncio.Transport, log: list[bytes]) -> None:
        self._transport = transport
        self._log = log

    def write(self, data: bytes) -> None:
        self._log.append(bytes(data))
        self._transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        self._log.append(b"".join(parts))
        self._transport.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def logging_protocol(base: type[HttpToolsProtocol], log: list[bytes]) -> type[HttpToolsProtocol]:
    class Logged(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(WriteLog(transport, log))

    return Logged


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def uvicorn_serving(app: Any, protocol: type[HttpToolsProtocol]) -> AsyncIterator[int]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=protocol, ws="websockets", log_level="warning", log_config=None
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        await task


async def request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str, body: bytes = b""
) -> tuple[int, bytes]:
    writer.write(
        f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length:"))
    return status, await reader.readexactly(length)


@pytest.fixture
async def service_app(checkpoints: dict[str, Path]) -> Any:
    return create_app(Settings(models=[checkpoints["point-nav"]], torch_threads=1))


@pytest.mark.parametrize("coalesce", [True, False])
async def test_each_reply_is_one_socket_write(service_app: Any, coalesce: bool) -> None:
    """Through uvicorn on a real port: the coalescing protocol writes each reply (headers and body) in
    one write, uvicorn's own in two; what the client reads is the same."""
    log: list[bytes] = []
    base = CoalescingHttpToolsProtocol if coalesce else HttpToolsProtocol
    async with uvicorn_serving(service_app, logging_protocol(base, log)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, body = await request(reader, writer, "POST", "/v1/sessions", b'{"model": "point-nav"}')
        assert status == 201
        sid = json.loads(body)["session_id"]
        act = json.dumps({"session_id": sid, "observation": [0.1, 0.2]}).encode()
        replies = [await request(reader, writer, "POST", "/v1/act", act) for _ in range(3)]
        assert [status for status, _ in replies] == [200, 200, 200]
        assert all(len(json.loads(body)["action"]) == 2 for _, body in replies)
        status, body = await request(reader, writer, "POST", "/v1/act", b'{"observation": "no"}')
        assert status == 422 and json.loads(body)["error"]["code"]
        status, _ = await request(reader, writer, "GET", "/healthz")
        assert status == 200
        writer.close()
        await writer.wait_closed()
    replies_sent = 6
    assert len(log) == (replies_sent if coalesce else 2 * replies_sent)
    if coalesce:
        assert all(data.startswith(b"HTTP/1.1 ") and not data.endswith(b"\r\n\r\n") for data in log)


async def test_websocket_streams_work_through_the_coalescing_protocol(service_app: Any) -> None:
    """The upgrade hands the socket's own transport to the WebSocket protocol: streams answer frame
    after frame, and HTTP on other connections keeps one write per reply."""
    log: list[bytes] = []
    async with uvicorn_serving(service_app, logging_protocol(CoalescingHttpToolsProtocol, log)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, body = await request(reader, writer, "POST", "/v1/sessions", b'{"model": "point-nav"}')
        assert status == 201
        sid = json.loads(body)["session_id"]
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1/sessions/{sid}/stream") as ws:
            for step in range(3):
                await ws.send(json.dumps({"observation": [0.1 * step, 0.2]}))
                answer = json.loads(await ws.recv())
                assert len(answer["action"]) == 2 and answer["session_id"] == sid
            await ws.send("not json")
            assert "error" in json.loads(await ws.recv())
            await ws.send(json.dumps({"observation": [0.0, 0.0]}))
            assert len(json.loads(await ws.recv())["action"]) == 2
        status, body = await request(reader, writer, "GET", f"/v1/sessions/{sid}")
        assert status == 200 and json.loads(body)["steps"] == 4
        writer.close()
        await writer.wait_closed()
    http_replies = [data for data in log if data.startswith(b"HTTP/1.1 ")]
    assert len(http_replies) == 3  # the 101 of the upgrade among them
    assert any(data.startswith(b"HTTP/1.1 101") for data in http_replies)
