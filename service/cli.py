"""``trmrl-serve``: run the service under uvicorn (uvloop event loop, httptools parser)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import uvicorn

from service.app import create_app
from service.config import Settings


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
        metavar="DIR",
        help="checkpoint directory or archive to serve (repeatable); default: every bundled checkpoint",
    )
    parser.add_argument("--host", default=None, help="interface to bind (default: TRMRL_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port to bind (default: TRMRL_PORT or 8000)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides: dict[str, object] = {}
    if args.checkpoint:
        overrides["models"] = args.checkpoint
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    settings = Settings(**overrides)  # type: ignore[arg-type]
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.checkpoint_paths():
        sys.exit(
            f"trmrl-serve: no checkpoints to serve. Pass --checkpoint DIR (or set TRMRL_MODELS); "
            f"no bundled checkpoint was found under {settings.checkpoints_dir}."
        )
    missing = [str(p) for p in settings.checkpoint_paths() if not p.exists()]
    if missing:
        sys.exit(f"trmrl-serve: checkpoint not found: {', '.join(missing)}")
    # The event loop needs a core of its own: torch threads busy on every core would starve it.
    torch.set_num_threads(settings.forward_threads())
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,
    )
