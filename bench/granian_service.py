"""``python -m bench.granian_service``: the service (``python -m service``'s arguments and settings)
served by granian's ASGI interface instead of uvicorn, for :mod:`bench.asgi_servers`.

Granian (``pip install granian``, a bench-only install; see docs/performance.md) runs embedded on a
uvloop event loop in this process, one Rust runtime thread, WebSockets on, so the server's CPU is this
one process's, as with uvicorn. The drain is the same as ``trmrl-serve``'s: on SIGTERM/SIGINT
``/readyz`` fails and new sessions are refused at once, ``TRMRL_DRAIN_GRACE_S`` later granian stops
listening and lets in-flight requests finish, then the app's shutdown saves every session. The process
then exits with the signal's status, as uvicorn does.
"""

from __future__ import annotations

import asyncio
import os
import signal

import uvloop
from granian.constants import Interfaces
from granian.log import LogLevels
from granian.server.common import HTTP1Settings, HTTPModes
from granian.server.embed import Server

from service.app import create_app
from service.cli import parse_args, settings_from
from service.config import Settings


async def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; the signal's number (0 if the server stopped by itself)."""
    app = create_app(settings)
    server = Server(
        app,
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        http=HTTPModes.http1,
        websockets=True,
        runtime_threads=1,
        backlog=2048,
        http1_settings=HTTP1Settings(keep_alive=True),
        log_enabled=True,
        log_level=LogLevels(settings.log_level),
        log_access=False,
    )
    received: list[int] = []

    def on_signal(sig: int) -> None:
        app.state.ready = False
        if app.state.registry is not None:
            app.state.registry.draining = True
        if received:  # a second signal: stop at once
            server.stop()
            return
        received.append(sig)
        asyncio.get_running_loop().call_later(settings.drain_grace_s, server.stop)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.serve()
    return received[0] if received else 0


def main(argv: list[str] | None = None) -> None:
    settings = settings_from(parse_args(argv), "granian_service")
    sig = uvloop.run(serve(settings))
    if sig:
        # Exit as uvicorn does after a signal: with the signal's status.
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)


if __name__ == "__main__":
    main()
