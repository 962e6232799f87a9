"""The GPU benchmark's pieces that run anywhere: the model part on a CPU at tiny sizes, the timing
helper, and the verdicts and table for a result shaped like a GPU run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import gpu_bench
from trmrl.model import ModelConfig, TrMRL
from trmrl.slot_pool import SlotPool
from trmrl.trial_pool import TrialPool


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """The parts pin one torch thread on a CPU; give the rest of the run its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_rate_counts_actions_per_second() -> None:
    calls = []

    def step() -> None:
        calls.append(1)

    value = gpu_bench.rate(step, lambda: None, batch=10, seconds=0.03)
    assert value > 0 and len(calls) >= 3 + 1 + 3 * 3


def test_model_part_measures_every_mode_batch_and_size_on_a_cpu(restore_threads: None) -> None:
    plan = gpu_bench.plan(smoke=True) | {"batches": [1, 4], "point_s": 0.01, "memory_sessions": 100}
    out = gpu_bench.model_part(plan)
    assert out["modes"] == ["fp32-eager", "fp32-fixed", "bf16-fixed", "fp32-fixed+copies"]
    assert set(out["sizes"]) == {"mujoco", "metaworld"}
    for name, size in out["sizes"].items():
        for mode in out["modes"]:
            assert set(size["actions_per_s"][mode]) == {"1", "4"}
            assert all(v > 0 for v in size["actions_per_s"][mode].values())
        spec = gpu_bench.SIZES[name]
        cfg = ModelConfig.from_preset(spec.preset, obs_dim=spec.obs_dim, act_dim=spec.act_dim)
        per_slot = SlotPool(TrMRL(cfg), 1).bytes_per_slot
        # On a CPU the pool's storage is exactly its slots: the measured figure is the computed one.
        assert size["memory"]["measured_bytes_per_session"] == per_slot


def gpu_shaped(
    model_rate: float, e2e: float, stream_p50: float, http_p50: float, trainer: float
) -> dict[str, Any]:
    modes = ["fp32-eager", "fp32-graphs", "bf16-graphs", "fp32-graphs+copies"]
    rates = {m: {"1024": 1.0, "4096": 1.0} for m in modes}
    rates["bf16-graphs"]["4096"] = model_rate
    rates["fp32-eager"]["4096"] = 10 * model_rate  # eager figures never count towards the graph target
    load = {
        "transport": "vstream-msgpack",
        "processes": 8,
        "sessions_per_process": 512,
        "actions_per_s": e2e,
        "tick_p50_ms": 1.0,
        "tick_p99_ms": 2.0,
        "errors": 0,
        "failed_processes": [],
    }
    single = {"p50_ms": 0.0, "p99_ms": 1.0}
    return {
        "settings": {"cpu_smoke": False},
        "card": "a card",
        "model": {
            "modes": modes,
            "batches": [1024, 4096],
            "sizes": {
                "mujoco": {
                    "actions_per_s": rates,
                    "memory": {"measured_bytes_per_session": 532.0, "sessions_per_gib": 2e6},
                }
            },
        },
        "service": {
            "loads": [load],
            "single_http": single | {"p50_ms": http_p50},
            "single_stream": single | {"p50_ms": stream_p50},
        },
        "trainer": {
            "preset": "p",
            "device": "cuda",
            "steps_per_s": trainer,
            "steps": 1,
            "updates": 1,
            "seconds": 1,
        },
    }


def test_verdicts_follow_the_targets() -> None:
    met = gpu_bench.judge(gpu_shaped(3e6, 3e5, 0.5, 1.0, 4e4))
    assert [v[2] for v in met.values()] == [True] * 5
    missed = gpu_bench.judge(gpu_shaped(1e6, 1e5, 2.0, 2.0, 1e4))
    assert [v[2] for v in missed.values()] == [False] * 5
    text = gpu_bench.table(gpu_shaped(1e6, 1e5, 2.0, 2.0, 1e4))
    assert "NOT met" in text and "a card" in text and "SMOKE" not in text


def test_a_failed_part_is_reported_not_raised(tmp_path: Path) -> None:
    out = gpu_bench.run_child(["--section", "no-such-part"], timeout_s=60, out=tmp_path / "x.json")
    assert out["error"].startswith("exit status")


def test_a_failing_mode_keeps_the_other_figures(
    monkeypatch: pytest.MonkeyPatch, restore_threads: None
) -> None:
    real = gpu_bench._fixed_rates

    def failing(*args: Any, **kwargs: Any) -> Any:
        if args[3] == "bf16":
            raise RuntimeError("capture failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(gpu_bench, "_fixed_rates", failing)
    plan = gpu_bench.plan(smoke=True) | {"batches": [2], "point_s": 0.01, "memory_sessions": 10}
    out = gpu_bench.model_part(plan)
    rows = out["sizes"]["mujoco"]["actions_per_s"]
    assert rows["bf16-fixed"] == {} and rows["fp32-fixed"]["2"] > 0 and rows["fp32-eager"]["2"] > 0
    assert "capture failed" in out["errors"]["mujoco-bf16"]
    text = gpu_bench.table({"settings": {"cpu_smoke": True}, "model": out})
    assert "mujoco-bf16: FAILED" in text


def test_trial_part_measures_the_cached_step_beside_a_window_step_on_a_cpu(restore_threads: None) -> None:
    plan = gpu_bench.plan(smoke=True) | {"trial_batches": [1, 3], "trial_length": 20, "point_s": 0.01}
    out = gpu_bench.trial_part(plan)
    assert "errors" not in out
    assert set(out["actions_per_s"]) == {"1", "3"}
    for rates in out["actions_per_s"].values():
        assert set(rates) == set(gpu_bench.TRIAL_MODES) and all(v > 0 for v in rates.values())
    # What a pool of that model says a session holds at trial length 20 (two 16-position blocks).
    spec = gpu_bench.MUJOCO
    cfg = ModelConfig.from_preset(
        "small", obs_dim=spec.obs_dim, act_dim=spec.act_dim, context="trial", window=1, max_context=20
    )
    for mode, dtype in (("paged-fp32", torch.float32), ("paged-bf16", torch.bfloat16)):
        pool = TrialPool(TrMRL(cfg), 1, cache_dtype=dtype)
        assert (
            out["bytes_per_session"][mode]
            == pool.bytes_at_length(20)
            == pool.bytes_held(torch.zeros(1, dtype=torch.long)).item() + 2 * pool.block_bytes
        )
    text = gpu_bench.table({"settings": {"cpu_smoke": True}, "trial": out})
    assert "trial length 20" in text and "bf16 step / window-5 step" in text
