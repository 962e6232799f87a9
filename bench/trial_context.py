"""Trial-long memory: the cached step of a ``context="trial"`` policy, paged and fixed, against
re-encoding windows; memory per session at each trial length.

A ``context="trial"`` TrMRL attends over every working memory since its trial began. The key/value
pool (:class:`trmrl.trial_pool.TrialPool`) steps it at the cost of one new token per layer plus one
read of the session's cached keys and values, kept in blocks taken as the trial grows (paged); the
alternative is to re-encode a window of working memories at every step. For the ``small`` preset
(d_model 64, 2 layers, 4 heads; HalfCheetah's 17-d observation, 6 actions) this measures, at batch 1
and 1,024 and at trial lengths 5, 50 and 400:

* ``paged`` / ``paged-bf16``: one :meth:`TrialPool.step` of every slot at trial length ``t`` (the step
  attends over ``t - 1`` cached memories and its own), keys and values in float32 or bfloat16;
* ``fixed`` / ``fixed-bf16``: the same step in the layout before paging (``bench/fixed_trial_pool.py``:
  every slot owns ``max_context`` positions, one fused attention kernel over a slot's rows);
* ``window-5``: one :class:`~trmrl.slot_pool.SlotPool` step of a windowed model (full windows: the step
  slides them), the paper's window;
* ``full``: re-encoding the whole trial, a window of ``t`` (where it takes under a second);
* ``read-floor`` / ``read-floor-bf16`` (batch 1,024): summing a float32 tensor of as many bytes as the
  step's cache read (``2 x layers x t x d_model`` values per session: 420 MB at t = 400 in float32,
  210 MB in bfloat16) -- what reading the cache alone costs on this machine, at the same moment.

At batch 1,024 and t = 400 it also times the paged step at block sizes 8, 16, 32 and 64.

Methods are timed in alternated rounds (each round times every method once: the fastest of a few
calls); a figure is the median over rounds and a ratio the median over rounds of per-round ratios, so
a busy neighbour slows both sides alike. Every pool's caches are real: its working memories are written
(random tokens) and re-encoded, and each timed call steps every slot from length ``t - 1``.

Memory per session at each trial length, fixed and paged, float32 and bfloat16 (the pool's own
accounting: working memories, counters, block-table row and the blocks a context of ``t`` holds), and
a real paged pool holding 10,000 sessions spread evenly over a 400-step trial (lengths 1..400 written
in chunks, the store grown on demand): the memory its sessions hold and all it allocated, against a
fixed allocation at the maximum.

Run: ``python -m bench.trial_context [--quick] [--json PATH]``; prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.fixed_trial_pool import FixedTrialPool
from trmrl.model import ModelConfig, TrMRL
from trmrl.slot_pool import SlotMemory, SlotPool
from trmrl.trial_pool import BLOCK_SIZE, TrialPool

REPO = Path(__file__).resolve().parents[1]
OBS_DIM, ACT_DIM = 17, 6
MAX_CONTEXT = 400
GIB = 1 << 30
TARGET_RATIO = 1.5
"""The cached step at t = 400, batch 1,024, over a window-5 step (issue 33)."""
TARGET_SPREAD = 0.6
"""10,000 sessions spread evenly over a 400-step trial, paged over fixed memory (issue 33)."""
CACHED = ("fixed", "paged", "fixed-bf16", "paged-bf16")


def trial_model() -> TrMRL:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(
        "small", obs_dim=OBS_DIM, act_dim=ACT_DIM, context="trial", window=1, max_context=MAX_CONTEXT
    )
    return TrMRL(cfg).eval()


def window_model(window: int) -> TrMRL:
    torch.manual_seed(0)
    return TrMRL(ModelConfig.from_preset("small", obs_dim=OBS_DIM, act_dim=ACT_DIM, window=window)).eval()


def _inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    slots = torch.arange(batch)
    return (
        slots,
        torch.randn(batch, OBS_DIM, generator=g),
        torch.randn(batch, generator=g),
        torch.zeros(batch, dtype=torch.bool),
    )


def _memories(batch: int, length: int) -> SlotMemory:
    g = torch.Generator().manual_seed(2)
    token_dim = OBS_DIM + ACT_DIM + 2
    windows = torch.randn(batch, MAX_CONTEXT, token_dim, generator=g)
    return SlotMemory(windows, torch.full((batch,), length), torch.zeros(batch, ACT_DIM))


def cached_step(pool: TrialPool | FixedTrialPool, length: int) -> Callable[[], None]:
    """A step of every slot of ``pool`` from contexts of ``length - 1`` written (and re-encoded) memories."""
    batch = pool.capacity
    with torch.no_grad():
        pool.write(torch.arange(batch), _memories(batch, length - 1))
    slots, obs, reward, start = _inputs(batch)

    def run() -> None:
        pool.lengths.fill_(length - 1)
        pool.step(slots, obs, reward, start)

    return run


def window_step(net: TrMRL, batch: int) -> Callable[[], None]:
    """A step of every slot of a pool of full windows (each step slides them)."""
    pool = SlotPool(net, batch)
    pool.windows.copy_(torch.randn(pool.windows.shape, generator=torch.Generator().manual_seed(2)))
    pool.lengths.fill_(net.config.window)
    slots, obs, reward, start = _inputs(batch)
    return lambda: pool.step(slots, obs, reward, start) and None


def read_floor(nbytes: int) -> Callable[[], None]:
    """Summing a float32 tensor of ``nbytes``: a stream read of the bytes a cached step must read."""
    data = torch.randn(nbytes // 4)

    def run() -> None:
        data.sum()

    return run


def measure(
    methods: dict[str, Callable[[], None]], rounds: int, calls: int, reference: str
) -> dict[str, dict[str, Any]]:
    """Per method: the median over alternated rounds of the fastest of ``calls`` calls, and the median
    per-round ratio to ``reference``."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.no_grad():
        for fn in methods.values():
            fn()  # warm up
        for _ in range(rounds):
            for name, fn in methods.items():
                samples = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn()
                    samples.append(time.perf_counter() - t0)
                times[name].append(min(samples))
    ref = times[reference]
    out: dict[str, dict[str, Any]] = {}
    for name, values in times.items():
        ratios = [v / r for v, r in zip(values, ref, strict=True)]
        out[name] = {
            "ms": 1e3 * statistics.median(values),
            "ratio_to_" + reference: statistics.median(ratios),
            "rounds_ms": [round(1e3 * v, 3) for v in values],
        }
    return out


def step_row(net: TrMRL, window5: TrMRL, batch: int, length: int, rounds: int) -> dict[str, Any]:
    """Every method at one batch size and trial length."""
    methods: dict[str, Callable[[], None]] = {
        "window-5": window_step(window5, batch),
        "fixed": cached_step(FixedTrialPool(net, batch), length),
        "paged": cached_step(TrialPool(net, batch), length),
        "fixed-bf16": cached_step(FixedTrialPool(net, batch, cache_dtype=torch.bfloat16), length),
        "paged-bf16": cached_step(TrialPool(net, batch, cache_dtype=torch.bfloat16), length),
    }
    if batch * length <= 51_200:  # the full re-encode takes seconds beyond
        methods["full"] = window_step(window_model(length), batch)
    cache_bytes = batch * length * TrialPool(net, 1).cache_bytes_per_memory()
    if batch > 1:
        methods["read-floor"] = read_floor(cache_bytes)
        methods["read-floor-bf16"] = read_floor(cache_bytes // 2)
    result = measure(methods, rounds, 20 if batch == 1 else 3, "window-5")
    row: dict[str, Any] = {"batch": batch, "length": length, "cache_bytes_fp32": cache_bytes, **result}
    if batch > 1:
        row["paged_over_floor"] = _ratio(result, "paged", "read-floor")
        row["paged_bf16_over_floor"] = _ratio(result, "paged-bf16", "read-floor-bf16")
        row["fixed_over_floor"] = _ratio(result, "fixed", "read-floor")
    row["paged_over_fixed"] = _ratio(result, "paged", "fixed")
    row["paged_bf16_over_fixed_bf16"] = _ratio(result, "paged-bf16", "fixed-bf16")
    return row


def _ratio(result: dict[str, dict[str, Any]], a: str, b: str) -> float:
    """Median over rounds of ``a``'s time over ``b``'s in the same round."""
    pairs = zip(result[a]["rounds_ms"], result[b]["rounds_ms"], strict=True)
    return statistics.median(x / y for x, y in pairs)


def block_sizes(net: TrMRL, window5: TrMRL, batch: int, length: int, rounds: int) -> dict[str, Any]:
    """The paged step at several block sizes (float32), against window-5."""
    methods: dict[str, Callable[[], None]] = {"window-5": window_step(window5, batch)}
    for size in (8, 16, 32, 64):
        methods[f"paged-{size}"] = cached_step(TrialPool(net, batch, block_size=size), length)
    return {"batch": batch, "length": length, **measure(methods, rounds, 3, "window-5")}


def memory_table(lengths: list[int], spread_sessions: int) -> dict[str, Any]:
    """Device memory per session, fixed and paged, at each trial length; and a real paged pool holding
    ``spread_sessions`` sessions spread evenly over a ``MAX_CONTEXT``-step trial."""
    net = trial_model()
    out: dict[str, Any] = {"block_size": BLOCK_SIZE, "per_length": []}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        fixed = FixedTrialPool(net, 1, cache_dtype=dtype).bytes_per_slot
        paged = TrialPool(net, 1, cache_dtype=dtype)
        out[name] = {
            "fixed_bytes_per_session": fixed,
            "paged_bytes_at_400": paged.bytes_per_slot,
            "paged_bytes_at_0": paged.bytes_at_length(0),
            "block_bytes": paged.block_bytes,
            "cache_bytes_per_memory": paged.cache_bytes_per_memory(),
            # The working memories live in the blocks too: this much of each block is theirs.
            "working_memory_bytes_per_block": paged.memories[0].numel() * paged.memories.element_size(),
        }
        for t in lengths:
            at = paged.bytes_at_length(t)
            out["per_length"].append(
                {
                    "dtype": name,
                    "length": t,
                    "fixed_bytes": fixed,
                    "paged_bytes": at,
                    "paged_over_fixed": at / fixed,
                }
            )
        # The spread by the pool's accounting (the float32 one is also measured on a real pool below).
        spread_lengths = [1 + i * (MAX_CONTEXT - 1) // 9_999 for i in range(10_000)]
        held = sum(paged.bytes_at_length(t) for t in spread_lengths)
        out[name]["spread_10000_held_over_fixed"] = held / (10_000 * fixed)
        out[name]["spread_10000_held_over_fixed_fp32"] = held / (
            10_000 * out["float32"]["fixed_bytes_per_session"]
        )
    window5 = SlotPool(window_model(5), 1).bytes_per_slot
    out["window-5"] = {"bytes_per_session": window5, "sessions_per_gib": GIB // window5}
    out["spread"] = spread(net, spread_sessions)
    return out


def spread(net: TrMRL, sessions: int, chunk: int = 500) -> dict[str, Any]:
    """A paged pool (float32, grown on demand) with ``sessions`` sessions at lengths spread evenly over
    1..MAX_CONTEXT, written in chunks; what they hold and what the pool allocated, over fixed."""
    lengths = torch.tensor([1 + i * (MAX_CONTEXT - 1) // max(sessions - 1, 1) for i in range(sessions)])
    pool = TrialPool(net, sessions)
    g = torch.Generator().manual_seed(3)
    t0 = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, sessions, chunk):
            part = lengths[lo : lo + chunk]
            width = pool.memory_shape[1]
            windows = torch.zeros(len(part), MAX_CONTEXT, width)
            span = int(part.max())
            windows[:, :span] = torch.randn(len(part), span, width, generator=g)
            pool.write(
                torch.arange(lo, lo + len(part)), SlotMemory(windows, part, torch.zeros(len(part), ACT_DIM))
            )
    seconds = time.perf_counter() - t0
    fixed = sessions * FixedTrialPool(net, 1).bytes_per_slot
    held = int(pool.bytes_held(torch.arange(sessions)).sum())
    window_bytes = int(pool.held.sum()) * pool.memories[0].numel() * pool.memories.element_size()
    return {
        "sessions": sessions,
        "lengths": "1 + i * 399 // (sessions - 1)",
        "fixed_bytes": fixed,
        "held_bytes": held,
        "held_over_fixed": held / fixed,
        "allocated_bytes": pool.device_bytes,
        "allocated_over_fixed": pool.device_bytes / fixed,
        "blocks_held": int(pool.held.sum()),
        "blocks_allocated": pool.blocks,
        "working_memory_share_of_held": window_bytes / held,
        "write_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer lengths, rounds and sessions (a smoke run)"
    )
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "trial_context.json")
    parser.add_argument("--rounds", type=int, help="alternated rounds (default 7; --quick 2)")
    parser.add_argument("--lengths", type=int, nargs="+", help="trial lengths (default 5 50 400)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 1024], help="batch sizes")
    parser.add_argument("--spread-sessions", type=int, help="sessions of the spread (default 10,000)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, the CPU count)")
    parser.add_argument("--no-block-sizes", action="store_true", help="skip the block-size sweep")
    parser.add_argument("--memory-only", action="store_true", help="the memory tables alone (no timing)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.lengths or ([5, 400] if args.quick else [5, 50, 400])
    rounds = args.rounds or (2 if args.quick else 7)
    sessions = args.spread_sessions or (1_000 if args.quick else 10_000)
    if args.memory_only:
        memory = memory_table(sorted({1, 16, 17, 50, 100, 200, 400, *lengths}), sessions)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"memory": memory}, indent=2) + "\n")
        for dtype in ("float32", "bfloat16"):
            ratio = memory[dtype]["spread_10000_held_over_fixed"]
            print(f"{dtype}: 10,000 sessions spread over {MAX_CONTEXT} steps hold {ratio:.3f} of fixed")
        print(f"real float32 pool: {memory['spread']['held_over_fixed']:.3f}; wrote {args.json}")
        return
    load_before = os.getloadavg()
    net, window5 = trial_model(), window_model(5)
    rows = []
    for batch in args.batches:
        for t in lengths:
            row = step_row(net, window5, batch, t, rounds)
            rows.append(row)
            line = "  ".join(
                f"{k} {row[k]['ms']:8.2f} ms ({row[k]['ratio_to_window-5']:5.2f}x)"
                for k in ("window-5", "full", *CACHED, "read-floor", "read-floor-bf16")
                if k in row
            )
            print(f"batch {batch:5d}  t {t:4d}  {line}", flush=True)
    big, longest = max(args.batches), max(lengths)
    sizes = {} if args.no_block_sizes else block_sizes(net, window5, big, longest, rounds)
    timed = {k: v for k, v in sizes.items() if isinstance(v, dict)}
    if timed:
        line = "  ".join(f"{k} {v['ms']:.2f} ms ({v['ratio_to_window-5']:.2f}x)" for k, v in timed.items())
        print(f"block sizes, batch {big}, t {longest}: {line}", flush=True)
    memory = memory_table(sorted({1, 16, 17, 50, 100, 200, 400, *lengths}), sessions)
    target = next(r for r in rows if r["batch"] == big and r["length"] == longest)
    ratios = {
        f"{name}_over_window5_at_{longest}_batch{big}": target[name]["ratio_to_window-5"] for name in CACHED
    }
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "note": "ratios from alternated rounds (the load average says how busy the machine was)",
        },
        "model": {"preset": "small", "obs_dim": OBS_DIM, "act_dim": ACT_DIM, "max_context": MAX_CONTEXT},
        "rounds": rounds,
        "steps": rows,
        "block_sizes": sizes,
        "memory": memory,
        "target": {**ratios, "target": TARGET_RATIO, "spread_target": TARGET_SPREAD},
    }
    print()
    print("memory per session (bytes), fixed -> paged:")
    for row in memory["per_length"]:
        print(
            f"  {row['dtype']:8s} t {row['length']:4d}: {row['fixed_bytes']:>9,d} -> "
            f"{row['paged_bytes']:>9,d} ({row['paged_over_fixed']:.3f})"
        )
    window = memory["window-5"]
    print(f"  window-5 {window['bytes_per_session']:,d} ({window['sessions_per_gib']:,d}/GiB)")
    s = memory["spread"]
    print(
        f"  {s['sessions']:,d} sessions spread evenly over {MAX_CONTEXT} steps: hold "
        f"{s['held_over_fixed']:.3f} of a fixed allocation, the pool allocated "
        f"{s['allocated_over_fixed']:.3f} "
        f"({s['blocks_allocated']:,d} blocks for {s['blocks_held']:,d} held); target <= {TARGET_SPREAD}"
    )
    print(
        f"target: cached step at t={longest}, batch {big} over window-5: "
        + ", ".join(f"{k.split('_over')[0]} {v:.2f}x" for k, v in ratios.items())
        + f"; target <= {TARGET_RATIO}x; paged over the read floor {target.get('paged_over_floor', 0):.2f}x "
        f"(bf16 {target.get('paged_bf16_over_floor', 0):.2f}x)"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
