"""One socket write per reply: uvicorn's httptools protocol over a transport that coalesces writes.

Uvicorn writes a reply in two calls, the status line and headers at ``http.response.start`` and the
body at ``http.response.body``; on an idle socket each is its own ``send`` system call (a profile of
``POST /v1/act`` put the two at about a third of the server's CPU). :class:`CoalescingTransport`
gathers what one event-loop iteration writes and hands it to the socket at the end of the iteration
(``loop.call_soon``) in one call -- ``writelines`` for several parts, which uvloop sends with one
``writev`` -- so a reply whose messages are sent back to back (every buffered response) costs one
system call.

It flushes at once, before acting, whenever the order or the state of the socket could be seen
otherwise: on ``close``, ``write_eof`` and ``set_protocol``, before reporting the write-buffer size
or changing its limits, and as soon as the pending bytes reach the write buffer's high-water mark (so
a large response still meets uvicorn's flow control). A WebSocket upgrade hands the real transport to
the WebSocket protocol. ``TRMRL_COALESCE_WRITES=false`` serves with uvicorn's own protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport(asyncio.Transport):
    """Writes of one event-loop iteration go to ``transport`` as one write; the rest is delegated."""

    __slots__ = ("_loop", "_pending", "_pending_bytes", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.transport = transport
        self._loop = loop
        self._pending: list[bytes | bytearray | memoryview] | None = None
        self._pending_bytes = 0

    # Writing.
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        pending = self._pending
        if pending is None:
            if self.transport.is_closing():
                self.transport.write(data)  # what the transport does with a late write, unchanged
                return
            self._pending = [data]
            self._pending_bytes = len(data)
            self._loop.call_soon(self.flush)
        else:
            pending.append(data)
            self._pending_bytes += len(data)
        if self._pending_bytes >= HIGH_WATER_LIMIT:
            self.flush()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand the pending bytes to the transport in one write (nothing pending: nothing happens)."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._pending_bytes = 0
        if self.transport.is_closing():
            return  # closed without a flush (aborted, or lost): the bytes had nowhere to go
        if len(pending) == 1:
            self.transport.write(pending[0])
        else:
            self.transport.writelines(pending)  # uvloop: one writev, the parts not copied together

    @property
    def pending_bytes(self) -> int:
        """Bytes written but not yet handed to the transport."""
        return self._pending_bytes

    # Operations that must see every byte written so far.
    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()
        self.transport.set_protocol(protocol)

    def get_write_buffer_size(self) -> int:
        self.flush()
        return self.transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.flush()
        self.transport.set_write_buffer_limits(high, low)

    def abort(self) -> None:
        self._pending = None
        self._pending_bytes = 0
        self.transport.abort()

    # Plain delegation.
    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.transport.get_protocol()

    def is_reading(self) -> bool:
        return self.transport.is_reading()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """Uvicorn's httptools protocol writing through a :class:`CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol gets the socket's own transport (with everything written so far
        # flushed): it writes frames itself, and nothing of it runs through this class.
        transport = self.transport
        if isinstance(transport, CoalescingTransport):
            transport.flush()
            self.transport = transport.transport
        super().handle_websocket_upgrade()
