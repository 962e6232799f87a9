"""The straightforward server the benchmark compares against.

What one would write first: a plain FastAPI app, a dict of per-session tensors (window, fill count,
previous action), and one forward pass of batch size 1 per request, in FastAPI's thread pool. It
uses the same network, the same working-memory functions and the same request/response fields as
the service, so the load generator drives both unchanged.

Run: ``python -m bench.serve_naive --checkpoint DIR --port P``.
"""

from __future__ import annotations

import argparse
import secrets
import threading

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from trmrl.checkpoint import load_checkpoint
from trmrl.memory import append_to_windows, working_memory


class ActIn(BaseModel):
    session_id: str | None = None
    observation: list[float]
    reward: float = 0.0
    episode_start: bool = False
    step: int | None = None


class ActOut(BaseModel):
    session_id: str
    step: int
    action: list[float]
    model_version: str


class BatchIn(BaseModel):
    items: list[ActIn]


class BatchOut(BaseModel):
    items: list[ActOut]


def build_app(checkpoint_dir: str) -> FastAPI:
    ckpt = load_checkpoint(checkpoint_dir)
    model = ckpt.model.eval()
    cfg = model.config
    low = torch.tensor(ckpt.info.action_low)
    high = torch.tensor(ckpt.info.action_high)
    sessions: dict[str, dict[str, torch.Tensor]] = {}
    steps: dict[str, int] = {}
    lock = threading.Lock()
    app = FastAPI()

    def new_session() -> str:
        sid = secrets.token_hex(16)
        with lock:
            sessions[sid] = {
                "window": torch.zeros(1, cfg.window, cfg.token_dim),
                "length": torch.zeros(1, dtype=torch.long),
                "prev_action": torch.zeros(1, cfg.act_dim),
            }
            steps[sid] = 0
        return sid

    @torch.no_grad()
    def step_one(req: ActIn) -> ActOut:
        sid = req.session_id or new_session()
        state = sessions.get(sid)
        if state is None:
            raise HTTPException(404, "unknown session")
        start = req.episode_start or steps[sid] == 0
        if start:
            state["window"].zero_()
            state["length"].zero_()
            state["prev_action"].zero_()
        token = working_memory(
            torch.tensor([req.observation]),
            state["prev_action"],
            torch.tensor([0.0 if start else req.reward]),
            torch.zeros(1),
        )
        window, length, newest = append_to_windows(state["window"], state["length"], token)
        mean = model(window, newest).mean
        action = torch.maximum(torch.minimum(mean, high), low)
        state["window"], state["length"], state["prev_action"] = window, length, action
        number = steps[sid]
        steps[sid] = number + 1
        return ActOut(session_id=sid, step=number, action=action[0].tolist(), model_version=ckpt.info.version)

    @app.post("/v1/sessions", status_code=201)
    def create_session() -> dict[str, str]:
        return {"session_id": new_session()}

    @app.post("/v1/act")
    def act(req: ActIn) -> ActOut:
        return step_one(req)

    @app.post("/v1/act/batch")
    def act_batch(req: BatchIn) -> BatchOut:
        return BatchOut(items=[step_one(item) for item in req.items])

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.checkpoint),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
