"""``trmrl-serve``: run the service under uvicorn (uvloop event loop, httptools parser, one socket write
per reply: :mod:`service.coalesce`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from types import FrameType

import torch
import uvicorn
from fastapi import FastAPI

from service import logs
from service.app import create_app
from service.coalesce import CoalescingHttpToolsProtocol
from service.config import Settings, duplicate_names


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: report not ready and take no new sessions at once, then shut down as uvicorn does.

    Uvicorn then stops listening, lets in-flight requests finish and runs the app's shutdown, which
    finishes queued steps and writes every session to the state directory.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.grace_s = grace_s
        self._grace_started = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.ready = False
        if self.app.state.registry is not None:
            self.app.state.registry.draining = True
        if self.grace_s > 0 and not self._grace_started:
            # Give load balancers time to see readyz fail before connections are refused; a second
            # signal during the grace shuts down at once.
            self._grace_started = True
            asyncio.get_running_loop().call_later(self.grace_s, super().handle_exit, sig, frame)
            return
        super().handle_exit(sig, frame)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="trmrl-serve",
        description="Serve TrMRL checkpoints over HTTP. Other settings: TRMRL_* environment variables.",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        type=Path,
        default=None,
        metavar="[NAME=]DIR",
        help="checkpoint directory or archive to serve (repeatable), as NAME=DIR to serve it under NAME "
        "(default: the directory's name); default: every bundled checkpoint",
    )
    parser.add_argument("--host", default=None, help="interface to bind (default: TRMRL_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port to bind (default: TRMRL_PORT or 8000)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace, prog: str = "trmrl-serve") -> Settings:
    """The settings the command line and the environment give, checked before anything loads (a
    one-line exit otherwise); logging configured and torch's threads set."""
    overrides: dict[str, object] = {}
    if args.checkpoint:
        overrides["models"] = args.checkpoint
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    settings = Settings(**overrides)  # type: ignore[arg-type]
    logs.configure(settings.log_level, settings.log_format)
    if not settings.checkpoint_paths():
        sys.exit(
            f"{prog}: no checkpoints to serve. Pass --checkpoint DIR (or set TRMRL_MODELS); "
            f"no bundled checkpoint was found under {settings.checkpoints_dir}."
        )
    missing = [str(p) for p in settings.checkpoint_paths() if not p.exists()]
    if missing:
        sys.exit(f"{prog}: checkpoint not found: {', '.join(missing)}")
    clash = duplicate_names(settings.named_checkpoints())
    if clash is not None:
        sys.exit(f"{prog}: {clash}")
    # The event loop needs a core of its own: torch threads busy on every core would starve it.
    torch.set_num_threads(settings.forward_threads())
    return settings


def main(argv: list[str] | None = None) -> None:
    settings = settings_from(parse_args(argv))
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=CoalescingHttpToolsProtocol if settings.coalesce_writes else "httptools",
        ws="websockets",
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
        ws_max_size=settings.max_body_bytes,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
    )
    DrainingServer(config, app, settings.drain_grace_s).run()
