"""The engine's fixed-shape path (GPU, reduced precision): settings, the scratch slot, actions against
the float32 engine, and the whole API in bf16; CUDA graphs in the engine where a GPU is present."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from service_support import ServiceClient, new_session

from service.config import Settings
from service.core.engine import Engine, EngineLimits
from trmrl.checkpoint import load_checkpoint

pytestmark = pytest.mark.anyio
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def limits(**overrides: Any) -> EngineLimits:
    base: dict[str, Any] = {
        "max_sessions": 32,
        "max_batch": 16,
        "batch_wait_s": 0.0,
        "session_ttl_s": 60.0,
        "evict_idle_s": 60.0,
    }
    return EngineLimits(**{**base, **overrides})


def test_dtype_and_cuda_graphs_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings().dtype, Settings().cuda_graphs) == ("fp32", True)
    monkeypatch.setenv("TRMRL_DTYPE", "bf16")
    monkeypatch.setenv("TRMRL_CUDA_GRAPHS", "false")
    assert (Settings().dtype, Settings().cuda_graphs) == ("bf16", False)
    monkeypatch.setenv("TRMRL_DTYPE", "fp8")
    with pytest.raises(ValueError, match="dtype"):
        Settings()


def test_cpu_float32_engine_keeps_the_trainers_path(checkpoints: dict[str, Path]) -> None:
    e = Engine("point-nav", load_checkpoint(checkpoints["point-nav"]), limits(), torch.device("cpu"))
    assert e.forward.fixed is None
    assert e.pool.capacity == 32  # no scratch slot: nothing is padded


async def drive(engine: Engine, ticks: int, seed: int) -> np.ndarray:
    """Step a mix of deterministic and sampled sessions, with resets and applied actions."""
    rng = np.random.default_rng(seed)
    specs = [(True, 0), (False, 5), (True, 0), (False, 6), (True, 0)]
    slots = [engine.table.create(deterministic=d, seed=s, ttl_s=None)[1] for d, s in specs]
    got = []
    for t in range(ticks):
        tickets = []
        for i, slot in enumerate(slots):
            obs = rng.normal(size=engine.obs_dim).astype(np.float32)
            applied = rng.uniform(-0.1, 0.1, engine.act_dim).tolist() if (t + i) % 4 == 0 else None
            tickets.append(engine.submit(slot, obs, float(rng.normal()), t % 7 == 0, t, applied))
        got.append(np.stack(await asyncio.gather(*(k.action() for k in tickets))))
    return np.stack(got)


async def test_bf16_engine_stays_close_to_the_float32_engine(checkpoints: dict[str, Path]) -> None:
    ckpt = checkpoints["point-nav"]
    runs = {}
    for precision in ("fp32", "bf16"):
        e = Engine("point-nav", load_checkpoint(ckpt), limits(precision=precision), torch.device("cpu"))
        e.warmup()
        await e.start()
        try:
            runs[precision] = await drive(e, 20, seed=3)
        finally:
            await e.stop()
        if precision == "bf16":
            assert e.forward.fixed is not None and e.pool.capacity == 33  # one scratch slot
    difference = np.abs(runs["bf16"] - runs["fp32"])
    # The test model's actions lie within +-1; bf16 keeps about 3 significant digits.
    assert np.isfinite(runs["bf16"]).all()
    assert 0.0 < difference.max() <= 0.05


async def test_the_api_serves_in_bf16(make_client: Any) -> None:
    client: ServiceClient = await make_client(dtype="bf16", max_batch=8)
    sid = await new_session(client)
    for step in range(6):
        r = await client.post(
            "/v1/act", json={"session_id": sid, "observation": [0.1, -0.2], "reward": 0.5, "step": step}
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["action"]) == 2
    engine = client.registry.engines["point-nav"]
    assert engine.forward.fixed is not None and engine.forward.fixed.precision == "bf16"


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
async def test_cuda_engine_replays_graphs_and_matches_the_cpu_engine(
    checkpoints: dict[str, Path], precision: str
) -> None:
    ckpt = checkpoints["point-nav"]
    runs = {}
    for device in ("cpu", "cuda"):
        chosen = precision if device == "cuda" else "fp32"
        e = Engine("point-nav", load_checkpoint(ckpt), limits(precision=chosen), torch.device(device))
        e.warmup()
        if device == "cuda":
            assert e.forward.fixed is not None and e.forward.fixed.captured == (1, 2, 4, 8, 16)
        await e.start()
        try:
            runs[device] = await drive(e, 20, seed=4)
        finally:
            await e.stop()
    bound = 1e-4 if precision == "fp32" else 0.05
    assert np.abs(runs["cuda"] - runs["cpu"]).max() <= bound
