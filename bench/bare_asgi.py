"""A bare ASGI app under the service's uvicorn set-up: the floor under ``POST /v1/act``'s server CPU.

It answers ``POST /v1/sessions`` with 201 and a session id and every other ``POST`` with a fixed
act-sized JSON body (no validation, no session, no forward pass), ``GET /readyz`` with 200, under
uvicorn with uvloop and the service's HTTP protocol (``TRMRL_COALESCE_WRITES`` as for the service).
What ``/v1/act`` costs above this is the service's; what this costs is uvicorn's, the request task's
and the kernel's. Launched like the service (``python -m bench.bare_asgi --host H --port P
[--checkpoint ignored]``), so ``bench.host_overhead --baseline-module bench.bare_asgi --paths act``
measures both in one run.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import uvicorn

from service.coalesce import CoalescingHttpToolsProtocol

ACT = (
    b'{"session_id":"0123456789abcdef0123456789abcdef","step":1,'
    b'"action":[0.1,-0.2,0.3,-0.4,0.5,-0.6],"model_version":"tiny@0123456789ab","server_timing_us":25}'
)
SESSION = b'{"session_id":"0123456789abcdef0123456789abcdef","model":"tiny","steps":0}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body", False):
        pass
    status, body = (201, SESSION) if scope["path"] == "/v1/sessions" else (200, ACT)
    if scope["method"] == "GET":
        status, body = 200, b'{"status":"ready"}'
    headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--checkpoint", action="append", default=[], help="ignored (the service's argument)")
    args = parser.parse_args()
    coalesce = os.environ.get("TRMRL_COALESCE_WRITES", "true").lower() not in ("0", "false", "no", "off")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http=CoalescingHttpToolsProtocol if coalesce else "httptools",
        lifespan="off",
        log_level="warning",
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main()
