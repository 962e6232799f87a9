"""Trainer throughput: end-to-end env steps/s (sampling + PPO update), batched vs one env at a time.

Every row run the same preset, the same tasks and the same PPO update; only the sampler differs:

* ``sync``: the trainer's sampler, all of an update's envs stepped in-process, one slot-pool forward
  per tick;
* ``async``: the trainer's sampler with the envs in two halves stepped by worker processes, the policy
  running on one half while the other half's simulators step;
* ``sequential``: one env at a time with a batch-1 forward per step, as the reference implementation
  samples.

Run: ``python -m bench.train_throughput [--preset small-halfcheetah-vel] [--updates 3] [--samplers ...]``
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common
from trainer.config import preset_config
from trainer.ppo import compute_gae, flatten, make_optimizers, ppo_update, update_settings
from trainer.rollout import Rollout, TrialSampler
from trainer.run import model_config_for
from trmrl.model import TrMRL, log_prob
from trmrl.policy import act
from trmrl.slot_pool import SlotPool
from trmrl.tasks import Task, TaskFamily, get_family


class SequentialSampler:
    """One environment at a time, batch-1 inference: the baseline the batched sampler is compared to."""

    def __init__(self, family: TaskFamily, model: TrMRL, n_envs: int, episodes: int) -> None:
        self.family, self.model, self.n_envs, self.episodes = family, model, n_envs, episodes
        self.envs = [family.make_env() for _ in range(n_envs)]
        self.pool = SlotPool(model, 1)
        self.low = torch.tensor(family.action_low)
        self.high = torch.tensor(family.action_high)

    @torch.no_grad()
    def run(self, tasks: list[Task], *, seed: int, generator: torch.Generator) -> Rollout:
        cfg = self.model.config
        steps = self.episodes * self.family.episode_length
        n = self.n_envs
        windows = torch.zeros(steps, n, cfg.window, cfg.token_dim)
        newest = torch.zeros(steps, n, dtype=torch.long)
        actions = torch.zeros(steps, n, cfg.act_dim)
        logp, values, rewards = torch.zeros(steps, n), torch.zeros(steps, n), torch.zeros(steps, n)
        valid = torch.zeros(steps, n, dtype=torch.bool)
        slot = torch.zeros(1, dtype=torch.long)
        last_values = torch.zeros(n)
        for e, (env, task) in enumerate(zip(self.envs, tasks, strict=True)):
            env.set_task(task)
            self.pool.clear(slot)
            t = 0
            for episode in range(self.episodes):
                obs, _ = env.reset(seed=seed * 1_000 + e if episode == 0 else None)
                reward, start, done = 0.0, True, False
                while not done:
                    noise = torch.randn((1, cfg.act_dim), generator=generator)
                    result = act(
                        self.pool,
                        slot,
                        torch.from_numpy(obs).unsqueeze(0),
                        torch.tensor([reward]),
                        torch.tensor([start]),
                        low=self.low,
                        high=self.high,
                        deterministic=False,
                        noise=noise,
                    )
                    windows[t, e], newest[t, e] = result.step.windows[0], result.step.newest[0]
                    actions[t, e], values[t, e] = result.raw[0], result.step.output.value[0]
                    logp[t, e] = log_prob(result.step.output, result.raw)[0]
                    obs, r, terminated, truncated, _ = env.step(result.actions[0].numpy())
                    rewards[t, e], valid[t, e] = float(r), True
                    reward, start, done = float(r), False, terminated or truncated
                    t += 1
        lengths = valid.sum(0)
        zeros = torch.zeros(steps, n, dtype=torch.long)
        return Rollout(
            windows,
            newest,
            actions,
            logp,
            values,
            rewards,
            valid,
            lengths,
            last_values,
            zeros,
            zeros,
            torch.zeros(n, self.episodes),
        )


class Timed:
    """One sampler with its own model and optimisers, timed one update at a time."""

    def __init__(self, sampler: Any, family: TaskFamily, model: TrMRL, cfg: Any) -> None:
        self.sampler, self.family, self.model, self.cfg = sampler, family, model, cfg
        self.optimizers = make_optimizers(
            model, cfg.policy_lr, cfg.value_lr, cfg.weight_decay, optimization=cfg.optimization
        )
        self.generator = torch.Generator().manual_seed(0)
        self.rounds: list[tuple[int, float, float]] = []
        """``(steps, sample s, update s)`` of each timed update."""

    def update(self, u: int) -> tuple[int, float, float]:
        cfg = self.cfg
        tasks = self.family.sample_tasks("train", cfg.tasks_per_update, seed=u)
        t0 = time.perf_counter()
        self.model.eval()
        rollout = self.sampler.run(tasks, seed=u, generator=self.generator)
        t1 = time.perf_counter()
        adv, ret = compute_gae(rollout, cfg.gamma, cfg.gae_lambda)
        self.model.train()
        ppo_update(
            self.model,
            self.optimizers,
            flatten(rollout, adv, ret),
            generator=self.generator,
            **update_settings(cfg),
        )
        return int(rollout.lengths.sum()), t1 - t0, time.perf_counter() - t1

    def summary(self) -> dict[str, Any]:
        steps = sum(r[0] for r in self.rounds)
        sample_s = sum(r[1] for r in self.rounds)
        update_s = sum(r[2] for r in self.rounds)
        return {
            "steps": steps,
            "sample_s": sample_s,
            "update_s": update_s,
            "sample_steps_per_s": steps / sample_s,
            "steps_per_s": steps / (sample_s + update_s),
            "rounds": [list(r) for r in self.rounds],
        }


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--preset", default="small-halfcheetah-vel")
    parser.add_argument(
        "--updates", type=int, default=3, help="timed updates per sampler (after one warm-up)"
    )
    parser.add_argument(
        "--samplers",
        nargs="+",
        default=["sequential", "sync", "async"],
        choices=["sequential", "sync", "async"],
        help="samplers to time: one env at a time, or the trainer's with envs in-process or in workers",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_throughput.json"))
    args = parser.parse_args()

    cfg = preset_config(args.preset)
    family = get_family(cfg.family)
    timed: dict[str, Timed] = {}
    try:
        for name in args.samplers:
            torch.manual_seed(0)
            model = TrMRL(model_config_for(cfg, family))
            if name == "sequential":
                sampler: Any = SequentialSampler(family, model, cfg.tasks_per_update, cfg.episodes_per_trial)
            else:
                sampler = TrialSampler(
                    family, model, cfg.tasks_per_update, cfg.episodes_per_trial, vector=name
                )
            timed[name] = Timed(sampler, family, model, cfg)
        for t in timed.values():
            t.update(0)  # warm-up, not counted
        # Rounds alternate the samplers, so a slow spell of a shared machine hits them all alike.
        for u in range(1, args.updates + 1):
            for t in timed.values():
                t.rounds.append(t.update(u))
    finally:
        for t in timed.values():
            if hasattr(t.sampler, "close"):
                t.sampler.close()
    results = {name: t.summary() for name, t in timed.items()}

    threads = torch.get_num_threads()
    print(f"trainer throughput, preset {args.preset}, {threads} torch threads, {platform.node()}")
    head = ("sampler", "steps", "sample s", "update s", "sample st/s", "end-to-end st/s", "× seq")
    widths = (12, 8, 9, 9, 12, 16, 6)
    print(
        " ".join(
            f"{h:{'<' if i == 0 else '>'}{w}s}" for i, (h, w) in enumerate(zip(head, widths, strict=True))
        )
    )
    s = results.get("sequential")
    for name, r in results.items():
        ratio = r["steps_per_s"] / s["steps_per_s"] if s else float("nan")
        r["end_to_end_ratio"] = ratio
        if s:
            r["sampling_ratio"] = r["sample_steps_per_s"] / s["sample_steps_per_s"]
            # per round: this sampler's end-to-end time against the sequential one's in the same round
            per_round = [
                (q[1] + q[2]) / q[0] * p[0] / (p[1] + p[2])
                for p, q in zip(r["rounds"], s["rounds"], strict=True)
            ]
            r["round_ratios"] = per_round
            r["median_round_ratio"] = float(np.median(per_round))
        print(
            f"{name:12s} {r['steps']:8d} {r['sample_s']:9.2f} {r['update_s']:9.2f} "
            f"{r['sample_steps_per_s']:12.0f} {r['steps_per_s']:16.0f} {ratio:6.2f}"
        )
    trainer = cfg.vector if cfg.vector in results else None
    if s and trainer:
        best = results[trainer]
        print(
            f"the trainer's sampler ({trainer}) / sequential: end-to-end {best['end_to_end_ratio']:.2f}x "
            f"(median of rounds {best['median_round_ratio']:.2f}x), "
            f"sampling alone {best['sampling_ratio']:.2f}x"
        )
        for name, r in results.items():
            if name != "sequential":
                rounds = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
                print(f"  {name} per round: {rounds}")
        print(
            f"targets: >= 3000 end-to-end steps/s ({'met' if best['steps_per_s'] >= 3000 else 'NOT met'}), "
            f">= 5x sequential ({'met' if best['end_to_end_ratio'] >= 5 else 'NOT met'})"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "preset": args.preset,
        "machine": {
            "node": platform.node(),
            "cpus": torch.get_num_threads(),
            "processor": platform.processor(),
        },
        "trainer_vector": cfg.vector,
        "results": results,
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
