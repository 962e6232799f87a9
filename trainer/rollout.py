"""Trial rollouts: vectorised environments, batched inference through the slot pool.

Each environment runs one trial -- ``k`` episodes of the same task -- while every environment's policy
step goes through one :meth:`SlotPool.step`, the code path the service runs. What the PPO update needs
is stored per step: the window the policy read, the raw action, its log-probability and the value.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from trainer.envs import StepResult, make_stages
from trmrl.model import ModelConfig, log_prob
from trmrl.networks import Network, make_pool
from trmrl.policy import act
from trmrl.tasks import Task, TaskFamily
from trmrl.tasks.trials import policy_observation


class Rollout(NamedTuple):
    """One batch of trials, laid out ``[time, env]``; steps past an env's trial end are invalid."""

    windows: Tensor
    """``[T, E, N, D]`` windows the policy read."""
    newest: Tensor
    """``[T, E]`` newest position in each window."""
    actions: Tensor
    """``[T, E, A]`` sampled actions before clipping (what the log-probability is of)."""
    log_probs: Tensor
    """``[T, E]``."""
    values: Tensor
    """``[T, E]``."""
    rewards: Tensor
    """``[T, E]`` reward of each step's action."""
    valid: Tensor
    """``[T, E]`` bool."""
    lengths: Tensor
    """``[E]`` valid steps per env (a prefix of the time axis)."""
    last_values: Tensor
    """``[E]`` value after the final step: ``V(s_T)`` when the time limit cut the last episode, 0 when
    it terminated."""
    episode: Tensor
    """``[T, E]`` episode index within the trial of each step."""
    episode_step: Tensor
    """``[T, E]`` step index within its episode."""
    success: Tensor
    """``[E, k]`` 1 where an episode reported ``info["success"]`` at any step."""
    states: Tensor | None = None
    """``[T, E, H]`` a recurrent policy's hidden state before each step (``None`` for TrMRL)."""


class TrialSampler:
    """Runs one trial per environment with batched policy inference.

    Example:
        >>> from trmrl.model import ModelConfig, TrMRL
        >>> from trmrl.tasks import get_family
        >>> family = get_family("point-nav")
        >>> net = TrMRL(ModelConfig.from_preset("small", obs_dim=2, act_dim=2))
        >>> sampler = TrialSampler(family, net, n_envs=4, episodes_per_trial=2)
        >>> rollout = sampler.run(family.sample_tasks("train", 4, seed=0), seed=0)
        >>> rollout.lengths.tolist()
        [200, 200, 200, 200]
    """

    def __init__(
        self,
        family: TaskFamily,
        model: Network,
        n_envs: int,
        episodes_per_trial: int,
        *,
        oracle: bool = False,
        vector: str = "sync",
        env_workers: int = 0,
    ) -> None:
        self.family = family
        self.model = model
        self.n_envs = n_envs
        self.episodes = episodes_per_trial
        self.oracle = oracle
        self.stages = make_stages(family, n_envs, vector, env_workers)
        self.workers = vector == "async"
        self.device = next(model.parameters()).device
        self.pool = make_pool(model, n_envs, self.device)
        self.low = torch.tensor(family.action_low, dtype=torch.float32, device=self.device)
        self.high = torch.tensor(family.action_high, dtype=torch.float32, device=self.device)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()

    @torch.no_grad()
    def run(
        self,
        tasks: list[Task],
        *,
        seed: int,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Run one trial of ``episodes_per_trial`` episodes on each task (one task per environment).

        Each stage's envs advance one step per tick: the stage's results of the previous tick are
        booked, then the policy acts for its running envs and they are sent off to step. With two
        stages (``async``) one half's simulators step while the policy runs on the other half.
        """
        if len(tasks) != self.n_envs:
            raise ValueError(f"need {self.n_envs} tasks, got {len(tasks)}")
        n, k, horizon = self.n_envs, self.episodes, self.family.episode_length
        steps = k * horizon
        cfg, dev = self.model.config, self.device
        buf = _Buffers(steps, n, k, cfg, dev)
        params = np.asarray([t.params for t in tasks], np.float32) if self.oracle else None
        obs: np.ndarray | None = None
        for stage in self.stages:
            stage.set_tasks([tasks[i] for i in stage.members])
            first = stage.reset([seed * 1_000 + int(i) for i in stage.members])
            if obs is None:
                obs = np.zeros((n, *first.shape[1:]), first.dtype)
            obs[stage.members] = first
        assert obs is not None
        self.pool.clear(torch.arange(n, device=dev))

        # With the simulators in worker processes, one thread runs the policy: the cores are theirs.
        threads = torch.get_num_threads()
        if self.workers and dev.type == "cpu":
            torch.set_num_threads(1)
        try:
            self._loop(buf, obs, params, steps, deterministic, generator)
        finally:
            torch.set_num_threads(threads)
        return buf.rollout()

    def _loop(
        self,
        buf: _Buffers,
        obs: np.ndarray,
        params: np.ndarray | None,
        steps: int,
        deterministic: bool,
        generator: torch.Generator | None,
    ) -> None:
        sent: list[np.ndarray | None] = [None] * len(self.stages)
        """Each stage's envs (sampler indices) whose step is in flight."""
        tick = [0] * len(self.stages)
        while True:
            moved = False
            for s, stage in enumerate(self.stages):
                ids = sent[s]
                if ids is not None:
                    sent[s] = None
                    result = stage.recv()
                    self._book(buf, tick[s] - 1, ids, result, params)
                    obs[ids] = result.next_obs
                t = tick[s]
                idx = stage.members[buf.trial.active[stage.members]]
                if t >= steps or not len(idx):
                    continue
                executed = self._act(buf, t, idx, obs, params, deterministic, generator)
                stage.send(np.searchsorted(stage.members, idx), executed)
                sent[s] = idx
                tick[s] = t + 1
                moved = True
            if not moved:
                break

    def _act(
        self,
        buf: _Buffers,
        t: int,
        idx: np.ndarray,
        obs: np.ndarray,
        params: np.ndarray | None,
        deterministic: bool,
        generator: torch.Generator | None,
    ) -> np.ndarray:
        """The policy's step for envs ``idx`` at tick ``t``: stored, and the executed actions returned."""
        dev, trial = self.device, buf.trial
        slots = torch.from_numpy(idx).to(dev)
        policy_obs = policy_observation(obs[idx], None if params is None else params[idx])
        noise = None
        if not deterministic:
            noise = torch.randn((len(idx), self.model.config.act_dim), generator=generator).to(dev)
        result, raw, executed = act(
            self.pool,
            slots,
            torch.from_numpy(policy_obs).to(dev),
            torch.from_numpy(trial.prev_reward[idx]).to(dev),
            torch.from_numpy(trial.start[idx]).to(dev),
            low=self.low,
            high=self.high,
            deterministic=deterministic,
            noise=noise,
        )
        out = result.output
        buf.windows[t, slots] = result.windows
        buf.newest[t, slots] = result.newest
        buf.actions[t, slots] = raw
        buf.logp[t, slots] = log_prob(out, raw)
        buf.values[t, slots] = out.value
        if buf.states is not None and result.state is not None:
            buf.states[t, slots] = result.state
        buf.valid[t, idx] = True
        buf.episode_of[t, idx] = trial.episode[idx]
        buf.step_of[t, idx] = trial.episode_step[idx]
        return executed.cpu().numpy()

    def _book(
        self,
        buf: _Buffers,
        t: int,
        ids: np.ndarray,
        result: StepResult,
        params: np.ndarray | None,
    ) -> None:
        """Book what envs ``ids`` observed after their step at tick ``t``."""
        k, dev, trial = self.episodes, self.device, buf.trial
        buf.rewards[t, ids] = result.reward
        if self.family.has_success:
            col = np.minimum(trial.episode[ids], k - 1)
            buf.success[ids, col] = np.maximum(buf.success[ids, col], result.success)
        trial.prev_reward[ids] = result.reward
        trial.episode_step[ids] += 1
        ended = result.terminated | result.truncated
        trial.episode[ids[ended]] += 1
        finished = ended & (trial.episode[ids] >= k)
        # The trial is over. A time-limit cut is not a terminal state: bootstrap from V(s_T).
        cut = finished & ~result.terminated
        if cut.any():
            cut_ids = ids[cut]
            final_obs = policy_observation(result.obs[cut], None if params is None else params[cut_ids])
            tail = self.pool.step(
                torch.from_numpy(cut_ids).to(dev),
                torch.from_numpy(final_obs).to(dev),
                torch.from_numpy(trial.prev_reward[cut_ids]).to(dev),
                torch.zeros(len(cut_ids), dtype=torch.bool, device=dev),
            )
            buf.last_values[torch.from_numpy(cut_ids).to(dev)] = tail.output.value
        trial.active[ids[finished]] = False
        trial.episode_step[ids[ended]] = 0
        trial.start[ids] = ended & ~finished


class _TrialState:
    """Where each env is in its trial."""

    def __init__(self, n: int, k: int) -> None:
        self.episode = np.zeros(n, np.int64)
        self.episode_step = np.zeros(n, np.int64)
        self.active = np.ones(n, bool)
        self.start = np.ones(n, bool)
        self.prev_reward = np.zeros(n, np.float32)


class _Buffers:
    """What a rollout stores per step, laid out ``[time, env]``."""

    def __init__(self, steps: int, n: int, k: int, cfg: ModelConfig, dev: torch.device) -> None:
        self.windows = torch.zeros(steps, n, cfg.window, cfg.token_dim, device=dev)
        self.newest = torch.zeros(steps, n, dtype=torch.long, device=dev)
        self.actions = torch.zeros(steps, n, cfg.act_dim, device=dev)
        self.logp = torch.zeros(steps, n, device=dev)
        self.values = torch.zeros(steps, n, device=dev)
        self.states = torch.zeros(steps, n, cfg.state_width, device=dev) if cfg.policy == "rl2" else None
        self.rewards = np.zeros((steps, n), np.float32)
        self.valid = np.zeros((steps, n), bool)
        self.episode_of = np.zeros((steps, n), np.int64)
        self.step_of = np.zeros((steps, n), np.int64)
        self.success = np.zeros((n, k), np.float32)
        self.last_values = torch.zeros(n, device=dev)
        self.dev = dev
        self.trial = _TrialState(n, k)

    def rollout(self) -> Rollout:
        dev = self.dev
        return Rollout(
            windows=self.windows,
            newest=self.newest,
            actions=self.actions,
            log_probs=self.logp,
            values=self.values,
            rewards=torch.from_numpy(self.rewards).to(dev),
            valid=torch.from_numpy(self.valid).to(dev),
            lengths=torch.from_numpy(self.valid.sum(0)).to(dev),
            last_values=self.last_values,
            episode=torch.from_numpy(self.episode_of).to(dev),
            episode_step=torch.from_numpy(self.step_of).to(dev),
            success=torch.from_numpy(self.success).to(dev),
            states=self.states,
        )
