"""GPU benchmark: the model alone, the service end to end, one session's latency and the trainer, on one box.

One prepared run for a box with one GPU and ~16 cores (it finishes in about five minutes; every wait
has a timeout, and a global budget skips what would not fit). Each part runs in its own child process
(a hung part is killed, GPU memory is returned between parts) and the JSON is rewritten after each:

1. ``model``: actions/s of the batched step alone (window update + forward + clip, inputs already on
   the device) at batch 1 ... 65,536 for the MuJoCo size (d_model 128, 4 layers, 16 heads, obs 17,
   act 6) and the Meta-World size (d_model 32, 4 layers, 4 heads, obs 39, act 4), in four modes:
   ``fp32-eager`` (the plain :func:`trmrl.policy.act`), ``fp32-graphs`` and ``bf16-graphs`` (one CUDA
   graph replay of :class:`trmrl.graphed.BucketedStep`), and ``fp32-graphs+copies`` (the same step as
   the service calls it: numpy in, pinned staging, copies both ways, synchronise). Then device memory
   per resident session, read from the allocator around a pool of 1,000,000 slots.
2. ``service``: ``python -m service`` on the GPU (MuJoCo size, CUDA graphs, fp32): one session's
   p50/p99 over HTTP ``/v1/act`` and over a MessagePack stream, then actions/s and tick p50/p99 through
   the columnar MessagePack batch and the vectorised stream, driven by several simulator processes
   (default 8 x 512 and 8 x 2,048 sessions, random observations) that measure the same window.
3. ``trial``: a ``context=trial`` policy's cached step (paged key/value cache, fp32 and bf16) at trial
   length 400 beside a window-5 step of the same small MuJoCo-size model, batch 1 ... 16,384, and the
   device bytes a session holds at that length.
4. ``trainer``: the trainer's end-to-end env steps/s (sampling + PPO update) for the paper-size
   halfcheetah-vel preset, env workers in processes (``vector=async``), the policy on the GPU, for
   two minutes (the first update is a warm-up and not counted).

``--cpu-smoke`` shrinks every size and duration so that the whole script runs on a CPU in a minute or
two: a check of the script, not a measurement of anything (its figures say nothing about a GPU).

Run: ``python -m bench.gpu_bench [--cpu-smoke] [--json PATH]``; prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from bench import common

REPO = Path(__file__).resolve().parents[1]


class Size(NamedTuple):
    preset: str
    obs_dim: int
    act_dim: int


MUJOCO = Size("mujoco", 17, 6)
METAWORLD = Size("metaworld", 39, 4)
SIZES = {"mujoco": MUJOCO, "metaworld": METAWORLD}
#: Start-up of the trainer's part (env workers, evaluators, CUDA) plus its untimed warm-up update.
TRAINER_OVERHEAD_S = 100.0
TARGETS = {
    "model_actions_per_s": 2_000_000.0,
    "e2e_actions_per_s": 250_000.0,
    "stream_p50_ms": 1.0,
    "http_p50_ms": 1.5,
    "trainer_steps_per_s": 30_000.0,
}


# -- plans ---------------------------------------------------------------------------------------------------
def plan(smoke: bool) -> dict[str, Any]:
    """Sizes and durations of every part: the GPU run, or the CPU smoke run."""
    if smoke:
        return {
            "device": "cpu",
            "batches": [1, 16, 256],
            "point_s": 0.05,
            "memory_sessions": 10_000,
            "service_max_batch": 256,
            "loads": [[2, 64]],
            "load_s": 1.5,
            "load_warmup_s": 0.5,
            "sequential_steps": 200,
            "stream_s": 1.0,
            "trainer_s": 5.0,
            "trial_batches": [1, 16],
            "trial_length": 40,
            "trainer_overrides": {
                "tasks_per_update": "2",
                "episodes_per_trial": "1",
                "epochs": "1",
                "device": "cpu",
                "vector": "async",
            },
            "timeouts_s": {"model": 240, "service": 300, "trial": 120, "trainer": 0},  # trainer: in main
        }
    return {
        "device": "cuda",
        "batches": [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536],
        "point_s": 0.3,
        "memory_sessions": 1_000_000,
        "service_max_batch": 8192,
        "loads": [[8, 512], [8, 2048]],
        "load_s": 5.0,
        "load_warmup_s": 2.0,
        "sequential_steps": 2000,
        "stream_s": 3.0,
        "trainer_s": 120.0,
        "trial_batches": [1, 1024, 4096, 16384],
        "trial_length": 400,
        "trainer_overrides": {"device": "cuda", "vector": "async"},
        "timeouts_s": {"model": 200, "service": 200, "trial": 120, "trainer": 0},  # trainer: in main
    }


def child_env() -> dict[str, str]:
    """The environment of every child: this one, with the repository and the client packages importable."""
    env = dict(os.environ)
    clients = [str(REPO / "clients"), str(REPO / "clients" / "sim")]
    paths = [str(REPO), *clients, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("MUJOCO_GL", "disable")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(args: list[str], timeout_s: float, out: Path) -> dict[str, Any]:
    """``python -m bench.gpu_bench ARGS --out-json OUT`` with a timeout; its JSON, or what went wrong."""
    command = [sys.executable, "-m", "bench.gpu_bench", *args, "--out-json", str(out)]
    try:
        done = subprocess.run(
            command, cwd=REPO, env=child_env(), timeout=timeout_s, capture_output=True, text=True, check=False
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-2000:]
        return {"error": f"timed out after {timeout_s:.0f} s", "output_tail": str(tail)}
    if done.returncode != 0 or not out.is_file():
        return {"error": f"exit status {done.returncode}", "output_tail": (done.stdout + done.stderr)[-3000:]}
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# -- part 1: the model alone ---------------------------------------------------------------------------------
def _sync(device: Any) -> Callable[[], None]:
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def rate(fn: Callable[[], object], sync: Callable[[], None], batch: int, seconds: float) -> float:
    """Actions/s of ``fn`` (one batched step of ``batch``): median of three timed windows.

    A first timed call sizes the windows; each window ends with a synchronisation, so queued device
    work is inside it.
    """
    for _ in range(3):
        fn()
    sync()
    began = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - began, 1e-6)
    iterations = max(3, int(seconds / 3 / once))
    rates = []
    for _ in range(3):
        began = time.perf_counter()
        for _ in range(iterations):
            fn()
        sync()
        rates.append(batch * iterations / (time.perf_counter() - began))
    return statistics.median(rates)


def _eager_rates(net: Any, batches: list[int], obs: Any, seconds: float) -> dict[str, float]:
    """fp32 eager: the plain step, as the trainer and the CPU service run it."""
    import torch

    from trmrl.policy import act
    from trmrl.slot_pool import SlotPool

    device = obs.device
    top = max(batches)
    pool = SlotPool(net, top, device)
    act_dim = net.config.act_dim
    low, high = -torch.ones(act_dim, device=device), torch.ones(act_dim, device=device)
    reward = torch.zeros(top, device=device)
    start = torch.zeros(top, dtype=torch.bool, device=device)
    rates = {}
    with torch.inference_mode():
        for b in batches:
            step = partial(
                act,
                pool,
                torch.arange(b, device=device),
                obs[:b],
                reward[:b],
                start[:b],
                low=low,
                high=high,
                deterministic=True,
                noise=None,
            )
            rates[str(b)] = rate(step, _sync(device), b, seconds)
    return rates


def _fixed_rates(
    net: Any, batches: list[int], obs_np: Any, precision: str, seconds: float, device: Any, copies: bool
) -> tuple[dict[str, float], dict[str, float], float]:
    """The fixed-shape step: device-only (a graph replay on CUDA) and, if ``copies``, as the service
    calls it (numpy in, staging, copies, synchronise). Returns both rates and the capture time."""
    import numpy as np
    import torch

    from trmrl.graphed import BucketedStep
    from trmrl.slot_pool import SlotPool

    top = max(batches)
    cuda = device.type == "cuda"
    act_dim = net.config.act_dim
    low, high = -torch.ones(act_dim, device=device), torch.ones(act_dim, device=device)
    pool = SlotPool(net, top + 1, device)
    step = BucketedStep(pool, low, high, top, scratch_slot=top, graphs=cuda, pad=True, precision=precision)  # type: ignore[arg-type]
    began = time.perf_counter()
    if cuda:
        step.capture()
    capture_s = time.perf_counter() - began
    reward = np.zeros(top, np.float32)
    falses, trues = np.zeros(top, bool), np.ones(top, bool)
    device_only, full = {}, {}
    for b in batches:
        run = partial(step.run, np.arange(b), obs_np[:b], reward[:b], falses[:b], falses[:b], trues[:b])
        run()  # stages this batch's inputs on the device for the device-only timing
        replay: Callable[[], object] = step._graph(b).replay if cuda else partial(step._forward, b)
        device_only[str(b)] = rate(replay, _sync(device), b, seconds)
        if copies:
            full[str(b)] = rate(run, _sync(device), b, seconds)
    return device_only, full, capture_s


def _memory(net: Any, sessions: int, device: Any) -> dict[str, float]:
    """Device bytes per resident session: the allocator's count around a pool of ``sessions`` slots."""
    import torch

    from trmrl.slot_pool import SlotPool

    memory: dict[str, float] = {"bytes_per_session": float(SlotPool(net, 1, device).bytes_per_slot)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        big = SlotPool(net, sessions, device)
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device) - before
        memory["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / (1 << 20)
    else:
        big = SlotPool(net, sessions, device)
        held = sum(t.untyped_storage().nbytes() for t in (big.windows, big.lengths, big.prev_action))
    memory["measured_bytes_per_session"] = held / sessions
    memory["sessions_per_gib"] = (1 << 30) / memory["measured_bytes_per_session"]
    memory["measured_over_sessions"] = sessions
    return memory


def model_part(p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from trmrl.model import ModelConfig, TrMRL

    device = torch.device(p["device"])
    cuda = device.type == "cuda"
    fixed = "graphs" if cuda else "fixed"  # on a CPU the fixed-shape step runs eagerly
    if not cuda:
        torch.set_num_threads(1)  # a smoke run on shared cores: one thread times steadier
    batches: list[int] = p["batches"]
    seconds = p["point_s"]
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "modes": ["fp32-eager", f"fp32-{fixed}", f"bf16-{fixed}", f"fp32-{fixed}+copies"],
        "batches": batches,
        "sizes": {},
        "capture_s": {},
    }
    for name, size in SIZES.items():
        torch.manual_seed(0)
        extra = {"value_input": "observation"} if name == "metaworld" else {}
        cfg = ModelConfig.from_preset(size.preset, obs_dim=size.obs_dim, act_dim=size.act_dim, **extra)
        net = TrMRL(cfg).to(device).eval()
        obs_np = np.random.default_rng(0).uniform(-1, 1, (max(batches), cfg.obs_dim)).astype(np.float32)
        rows: dict[str, dict[str, float]] = {}
        rows["fp32-eager"] = _eager_rates(net, batches, torch.from_numpy(obs_np).to(device), seconds)
        for precision in ("fp32", "bf16"):
            try:
                only, full, capture_s = _fixed_rates(
                    net, batches, obs_np, precision, seconds, device, copies=precision == "fp32"
                )
            except Exception as exc:  # one run on a card: keep the other modes' figures
                out.setdefault("errors", {})[f"{name}-{precision}"] = repr(exc)
                print(f"  model {name} {precision}: {exc!r}", flush=True)
                only, full, capture_s = {}, {}, float("nan")
            rows[f"{precision}-{fixed}"] = only
            if precision == "fp32":
                rows[f"fp32-{fixed}+copies"] = full
            out["capture_s"][f"{name}-{precision}"] = round(capture_s, 2)
        out["sizes"][name] = {"actions_per_s": rows, "memory": _memory(net, p["memory_sessions"], device)}
        print(f"  model {name}: done", flush=True)
    return out


# -- part 1b: trial-long memory -----------------------------------------------------------------------------
TRIAL_MODES = ("window-5", "paged-fp32", "paged-bf16")


def _trial_step(pool: Any, length: int, *inputs: Any) -> None:
    """Every slot steps from ``length`` working memories to one more (the lengths set back first)."""
    pool.lengths.fill_(length)
    pool.step(*inputs)


def trial_part(p: dict[str, Any]) -> dict[str, Any]:
    """A ``context=trial`` policy's cached step (MuJoCo-size small preset, every slot at trial length
    ``trial_length - 1`` stepping to ``trial_length``) beside a window-5 step of the same size: actions/s
    per batch and mode, and device bytes per session at that length."""
    import torch

    from trmrl.model import ModelConfig, TrMRL
    from trmrl.slot_pool import SlotMemory, SlotPool
    from trmrl.trial_pool import TrialPool

    device = torch.device(p["device"])
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    length, seconds = p["trial_length"], p["point_s"]
    obs_dim, act_dim = MUJOCO.obs_dim, MUJOCO.act_dim
    torch.manual_seed(0)
    window = TrMRL(ModelConfig.from_preset("small", obs_dim=obs_dim, act_dim=act_dim)).to(device).eval()
    cfg = ModelConfig.from_preset(
        "small", obs_dim=obs_dim, act_dim=act_dim, context="trial", window=1, max_context=length
    )
    trial = TrMRL(cfg).to(device).eval()
    out: dict[str, Any] = {"length": length, "preset": "small", "actions_per_s": {}, "bytes_per_session": {}}
    g = torch.Generator(device=device).manual_seed(0)
    for b in p["trial_batches"]:
        slots = torch.arange(b, device=device)
        obs = torch.randn(b, obs_dim, device=device, generator=g)
        reward = torch.zeros(b, device=device)
        start = torch.zeros(b, dtype=torch.bool, device=device)
        rates: dict[str, float] = {}
        with torch.inference_mode():
            for mode in TRIAL_MODES:
                pool: Any = None
                try:
                    if mode == "window-5":
                        pool = SlotPool(window, b, device)
                        pool.windows.normal_(generator=g)
                        pool.lengths.fill_(window.config.window)
                        step: Callable[[], object] = partial(pool.step, slots, obs, reward, start)
                    else:
                        dtype = torch.float32 if mode == "paged-fp32" else torch.bfloat16
                        pool = TrialPool(trial, b, device, cache_dtype=dtype)
                        memories = torch.randn(b, length, cfg.token_dim, device=device, generator=g)
                        for first in range(0, b, 512):  # re-encoding is one causal forward per chunk
                            part = slots[first : first + 512]
                            pool.write(
                                part,
                                SlotMemory(
                                    memories[first : first + 512],
                                    torch.full((len(part),), length - 1, device=device),
                                    torch.zeros(len(part), act_dim, device=device),
                                ),
                            )
                        out["bytes_per_session"][mode] = pool.bytes_at_length(length)
                        step = partial(_trial_step, pool, length - 1, slots, obs, reward, start)
                    rates[mode] = rate(step, _sync(device), b, seconds)
                except Exception as exc:  # one run on a card: keep the other modes' figures
                    out.setdefault("errors", {})[f"{b}-{mode}"] = repr(exc)
                    print(f"  trial {b} {mode}: {exc!r}", flush=True)
                del pool
                if cuda:
                    torch.cuda.empty_cache()
        out["actions_per_s"][str(b)] = rates
        print(f"  trial batch {b}: done", flush=True)
    return out


# -- part 2: the service end to end --------------------------------------------------------------------------
def simulator_part(a: argparse.Namespace) -> dict[str, Any]:
    """One simulator process: ``sessions`` sessions stepped as one columnar tick, closed loop."""
    import uvloop

    from bench.serve_load import run_columnar

    async def go() -> dict[str, Any]:
        result = await asyncio.wait_for(
            run_columnar(
                "127.0.0.1",
                a.port,
                a.sessions,
                MUJOCO.obs_dim,
                duration_s=a.duration,
                warmup_s=a.warmup,
                encoding="msgpack",
                simulators=1,
                stream=a.stream,
                seed=a.seed,
                start_at=a.start_at,
            ),
            timeout=max(0.0, a.start_at - time.time()) + a.warmup + a.duration + 120,
        )
        return result.summary() | {"latencies_ms": [round(x, 4) for x in result.latencies_ms.tolist()]}

    return uvloop.run(go())


def load(port: int, procs: int, per: int, stream: bool, p: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """``procs`` simulator processes of ``per`` sessions each, measuring the same window."""
    import numpy as np

    start_at = time.time() + 3.0 + per / 2000  # time for every process to start and create its sessions
    children = []
    for k in range(procs):
        out = tmp / f"sim-{'v' if stream else 'c'}-{per}-{k}.json"
        args = [
            "--section", "simulator", "--port", str(port), "--sessions", str(per),
            "--duration", str(p["load_s"]), "--warmup", str(p["load_warmup_s"]),
            "--start-at", str(start_at), "--seed", str(k), "--out-json", str(out),
        ]  # fmt: skip
        if stream:
            args.append("--stream")
        command = [sys.executable, "-m", "bench.gpu_bench", *args]
        process = subprocess.Popen(
            command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        children.append((process, out))
    deadline = start_at + p["load_warmup_s"] + p["load_s"] + 90
    results, failures = [], []
    for process, out in children:
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate(timeout=10)
            failures.append("timed out: " + output.decode(errors="replace")[-500:])
            continue
        if process.returncode != 0 or not out.is_file():
            failures.append(f"exit {process.returncode}: " + output.decode(errors="replace")[-800:])
            continue
        results.append(json.loads(out.read_text()))
    latencies = np.concatenate([np.asarray(r.pop("latencies_ms"), float) for r in results] or [np.zeros(0)])
    actions_per_s = sum(r["actions_per_s"] for r in results)
    return {
        "processes": procs,
        "sessions_per_process": per,
        "sessions": procs * per,
        "transport": "vstream-msgpack" if stream else "columnar-msgpack",
        "actions_per_s": round(actions_per_s, 1),
        "tick_p50_ms": round(float(np.percentile(latencies, 50)), 3) if len(latencies) else None,
        "tick_p99_ms": round(float(np.percentile(latencies, 99)), 3) if len(latencies) else None,
        "errors": sum(r["errors"] for r in results),
        "failed_processes": failures,
        "per_process": results,
    }


def service_part(p: dict[str, Any]) -> dict[str, Any]:
    import torch
    import uvloop
    from trmrl_sim.launch import ServiceProcess

    from bench.serve_load import run_sequential, run_stream
    from trmrl.checkpoint import CheckpointInfo, save_checkpoint
    from trmrl.model import ModelConfig, TrMRL

    obs_dim, act_dim = MUJOCO.obs_dim, MUJOCO.act_dim
    out: dict[str, Any] = {"model": "mujoco size, random weights", "loads": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        model = TrMRL(ModelConfig.from_preset("mujoco", obs_dim=obs_dim, act_dim=act_dim))
        ckpt = tmp / "mujoco"
        save_checkpoint(ckpt, model, CheckpointInfo("halfcheetah-vel", (-1.0,) * act_dim, (1.0,) * act_dim))
        env = {
            "TRMRL_MAX_BATCH": str(p["service_max_batch"]),
            "TRMRL_MAX_SESSIONS": "65536",
            "TRMRL_MAX_QUEUED_STEPS": "131072",
            "TRMRL_MAX_BODY_BYTES": str(32 << 20),
            "TRMRL_DTYPE": "fp32",
            "TRMRL_CUDA_GRAPHS": "true",
            "TRMRL_LOG_LEVEL": "warning",
            "PYTHONPATH": child_env()["PYTHONPATH"],
        }
        out["settings"] = env | {"device": p["device"]}
        began = time.perf_counter()
        server = ServiceProcess([ckpt], env=env, cwd=REPO, device=p["device"]).start(timeout_s=240)
        try:
            out["start_s"] = round(time.perf_counter() - began, 1)
            port = server.port
            try:
                seq = uvloop.run(
                    asyncio.wait_for(
                        run_sequential("127.0.0.1", port, obs_dim, p["sequential_steps"]), timeout=120
                    )
                )
                out["single_http"] = seq.summary()
                print(f"  single session /v1/act: p50 {seq.percentile(50):.3f} ms", flush=True)
                one = uvloop.run(
                    asyncio.wait_for(
                        run_stream(
                            "127.0.0.1",
                            port,
                            1,
                            obs_dim,
                            duration_s=p["stream_s"],
                            warmup_s=0.5,
                            encoding="msgpack",
                        ),
                        timeout=p["stream_s"] + 60,
                    )
                )
                out["single_stream"] = one.summary()
                print(f"  single session stream: p50 {one.percentile(50):.3f} ms", flush=True)
            except Exception as exc:  # keep going: the loads below are measured either way
                out["single_error"] = repr(exc)
                print(f"  single session: {exc!r}", flush=True)
            for stream in (False, True):
                for procs, per in p["loads"]:
                    row = load(port, procs, per, stream, p, tmp)
                    out["loads"].append(row)
                    print(
                        f"  {row['transport']} {procs} x {per}: {row['actions_per_s']:.0f} actions/s "
                        f"errors {row['errors']} failed processes {len(row['failed_processes'])}",
                        flush=True,
                    )
        finally:
            log = server.output()
            server.close()
        out["graph_capture_failed"] = "CUDA graph capture failed" in log
        out["server_log_tail"] = log[-2000:]
    return out


# -- part 3: the trainer -------------------------------------------------------------------------------------
def trainer_part(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    from trainer.config import preset_config
    from trainer.run import Trainer

    preset = "paper-halfcheetah-vel"
    cfg = preset_config(preset, dict(p["trainer_overrides"]))
    out: dict[str, Any] = {"preset": preset, "overrides": p["trainer_overrides"], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
        try:
            out["device"] = str(trainer.device)
            out["torch_threads"] = torch.get_num_threads()
            began = time.perf_counter()
            trainer.train_one_update()  # warm-up: worker start, allocator, kernel choices
            out["warmup_update_s"] = round(time.perf_counter() - began, 2)
            steps_before = trainer.steps
            began = time.perf_counter()
            updates = 0
            while time.perf_counter() - began < p["trainer_s"]:
                trainer.train_one_update()
                updates += 1
            seconds = time.perf_counter() - began
        finally:
            trainer.close()
    steps = trainer.steps - steps_before
    out |= {"updates": updates, "steps": steps, "seconds": round(seconds, 2), "steps_per_s": steps / seconds}
    return out


# -- report --------------------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return (
        f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"
    )


def table(results: dict[str, Any]) -> str:
    smoke = results["settings"]["cpu_smoke"]
    lines = [
        f"GPU benchmark on {results.get('card', '?')}"
        + ("  [CPU SMOKE RUN: checks the script, measures no GPU]" if smoke else "")
    ]
    model = results.get("model", {})
    if "sizes" in model:
        for name, size in model["sizes"].items():
            lines += ["", f"model side, {name} size: actions/s (batched step; inputs on the device)"]
            lines.append(f"{'batch':>8s}" + "".join(f"{m:>22s}" for m in model["modes"]))
            for b in model["batches"]:
                cells = [_fmt(size["actions_per_s"][m].get(str(b))) for m in model["modes"]]
                lines.append(f"{b:>8d}" + "".join(f"{c:>22s}" for c in cells))
            mem = size["memory"]
            lines.append(
                f"  device memory per resident session: {mem['measured_bytes_per_session']:.0f} B "
                f"({mem['sessions_per_gib']:,.0f} sessions per GiB)"
            )
        for key, error in model.get("errors", {}).items():
            lines.append(f"  {key}: FAILED {error}")
    elif model:
        lines += ["", f"model side: {model.get('error')}"]
    service = results.get("service", {})
    if "single_error" in service:
        lines += ["", f"single session: FAILED {service['single_error']}"]
    if "loads" in service:
        lines += ["", "service end to end (python -m service, MuJoCo size, fp32, CUDA graphs where on a GPU)"]
        for key, label in (
            ("single_http", "single session, HTTP /v1/act"),
            ("single_stream", "single session, stream"),
        ):
            row = service.get(key)
            if row:
                lines.append(f"  {label:34s} p50 {row['p50_ms']:8.3f} ms   p99 {row['p99_ms']:8.3f} ms")
        for row in service["loads"]:
            label = f"{row['transport']} {row['processes']} x {row['sessions_per_process']}"
            lines.append(
                f"  {label:34s} {_fmt(row['actions_per_s']):>8s} actions/s   tick p50 {row['tick_p50_ms']} ms"
                f"   p99 {row['tick_p99_ms']} ms   errors {row['errors']}"
                + (f"   FAILED PROCESSES {len(row['failed_processes'])}" if row["failed_processes"] else "")
            )
    elif service:
        lines += ["", f"service: {service.get('error')}"]
    trial = results.get("trial", {})
    if "actions_per_s" in trial:
        lines += [
            "",
            f"trial-long memory, small preset, MuJoCo size: actions/s at trial length {trial['length']}",
        ]
        lines.append(
            f"{'batch':>8s}" + "".join(f"{m:>16s}" for m in TRIAL_MODES) + "   bf16 step / window-5 step"
        )
        for b, rates in trial["actions_per_s"].items():
            cells = [_fmt(rates.get(m)) for m in TRIAL_MODES]
            ratio = (
                f"{rates['window-5'] / rates['paged-bf16']:.2f}x"
                if "window-5" in rates and "paged-bf16" in rates
                else "-"
            )
            lines.append(f"{int(b):>8d}" + "".join(f"{c:>16s}" for c in cells) + f"   {ratio}")
        for mode, size in trial.get("bytes_per_session", {}).items():
            lines.append(f"  {mode}: {size:,} B per session at that length")
        for key, error in trial.get("errors", {}).items():
            lines.append(f"  trial {key}: FAILED {error}")
    elif trial:
        lines += ["", f"trial-long memory: {trial.get('error')}"]
    trainer = results.get("trainer", {})
    if "steps_per_s" in trainer:
        lines += [
            "",
            f"trainer, {trainer['preset']} on {trainer['device']}: {trainer['steps_per_s']:,.0f} env steps/s "
            f"end to end ({trainer['steps']} steps, {trainer['updates']} updates in {trainer['seconds']} s)",
        ]
    elif trainer:
        lines += ["", f"trainer: {trainer.get('error')}"]
    verdicts = judge(results)
    if verdicts:
        lines += ["", "targets" + (" (not judged on a CPU smoke run)" if smoke else "")]
        for name, (value, target, met) in verdicts.items():
            state = "-" if smoke else ("met" if met else "NOT met")
            lines.append(f"  {name:34s} {value:>14,.3f}   target {target}   {state}")
    return "\n".join(lines)


def judge(results: dict[str, Any]) -> dict[str, tuple[float, str, bool]]:
    out: dict[str, tuple[float, str, bool]] = {}
    sizes = results.get("model", {}).get("sizes", {})
    if "mujoco" in sizes:
        graphed = [
            row for m, row in sizes["mujoco"]["actions_per_s"].items() if m.endswith(("graphs", "fixed"))
        ]
        best = max((v for row in graphed for b, v in row.items() if int(b) >= 4096), default=None)
        if best is not None:
            t = TARGETS["model_actions_per_s"]
            out["model side, MuJoCo, >= 4,096"] = (best, f">= {t:,.0f}", best >= t)
    loads = results.get("service", {}).get("loads", [])
    if loads:
        best = max(row["actions_per_s"] for row in loads)
        t = TARGETS["e2e_actions_per_s"]
        out["end to end, best load"] = (best, f">= {t:,.0f}", best >= t)
    service = results.get("service", {})
    for key, target in (("single_stream", "stream_p50_ms"), ("single_http", "http_p50_ms")):
        if key in service:
            value = service[key]["p50_ms"]
            out[f"{key} p50 ms"] = (value, f"<= {TARGETS[target]}", value <= TARGETS[target])
    trainer = results.get("trainer", {})
    if "steps_per_s" in trainer:
        t = TARGETS["trainer_steps_per_s"]
        out["trainer env steps/s"] = (trainer["steps_per_s"], f">= {t:,.0f}", trainer["steps_per_s"] >= t)
    return out


# -- entry point ---------------------------------------------------------------------------------------------
def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on the CPU: a check of the script"
    )
    parser.add_argument("--json", type=Path, default=REPO / "bench/results/gpu_bench.json")
    parser.add_argument(
        "--parts", default="model,service,trial,trainer", help="which parts to run (comma-separated)"
    )
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip a part that could end past this")
    parser.add_argument(
        "--trainer-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the trainer's preset (repeatable), e.g. tasks_per_update=80",
    )
    parser.add_argument("--trainer-s", type=float, help="seconds of timed training (default 120; smoke 5)")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--out-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sessions", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    p = plan(args.cpu_smoke)
    for item in args.trainer_set:
        key, _, value = item.partition("=")
        p["trainer_overrides"][key] = value
    if args.trainer_s is not None:
        p["trainer_s"] = args.trainer_s

    if args.section:  # a child: run one part, write its JSON
        parts: dict[str, Callable[[], dict[str, Any]]] = {
            "model": lambda: model_part(p),
            "service": lambda: service_part(p),
            "trial": lambda: trial_part(p),
            "trainer": lambda: trainer_part(p),
            "simulator": lambda: simulator_part(args),
        }
        assert args.out_json is not None
        args.out_json.write_text(json.dumps(parts[args.section]()))
        return

    began = time.monotonic()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "node": platform.node(),
        },
        "settings": {"cpu_smoke": args.cpu_smoke, "plan": p},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "targets": TARGETS,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            left = args.budget_s - (time.monotonic() - began)
            passed = [f"--trainer-set={item}" for item in args.trainer_set]
            timeout = p["timeouts_s"][part]
            if part == "trainer":
                # The trainer's timed window shrinks to what the budget has left (start-up and one
                # warm-up update take up to TRAINER_OVERHEAD_S), rather than being killed midway.
                seconds = min(p["trainer_s"], left - TRAINER_OVERHEAD_S)
                passed.append(f"--trainer-s={seconds}")
                timeout = seconds + TRAINER_OVERHEAD_S
                if seconds < min(20.0, p["trainer_s"]):
                    left = 0.0
            if left < min(timeout, 60):
                results[part] = {"error": f"skipped: {max(left, 0):.0f} s of the budget left"}
                continue
            print(f"part {part} (at most {min(timeout, left):.0f} s)", flush=True)
            part_began = time.monotonic()
            results[part] = run_child(
                ["--section", part, *passed] + (["--cpu-smoke"] if args.cpu_smoke else []),
                min(timeout, left),
                Path(tmp) / f"{part}.json",
            )
            results[part]["part_s"] = round(time.monotonic() - part_began, 1)
            if part == "model" and "device" in results[part]:
                results["card"] = results[part]["device"]
            if "error" in results[part]:
                print(
                    f"  {part}: {results[part]['error']}\n{results[part].get('output_tail', '')}", flush=True
                )
            results["elapsed_s"] = round(time.monotonic() - began, 1)
            args.json.write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    print(f"\nwrote {args.json} in {results['elapsed_s']} s")


if __name__ == "__main__":
    main()
