"""Trial rollouts: vectorised environments, batched inference through the slot pool.

Each environment runs one trial -- ``k`` episodes of the same task -- while every environment's policy
step goes through one :meth:`SlotPool.step`, the code path the service runs. What the PPO update needs
is stored per step: the window the policy read, the raw action, its log-probability and the value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import gymnasium
import numpy as np
import torch
from torch import Tensor

from trmrl.model import log_prob
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


VectorEnv = gymnasium.vector.SyncVectorEnv | gymnasium.vector.AsyncVectorEnv


def make_vector_env(family: TaskFamily, n_envs: int, mode: str = "sync") -> VectorEnv:
    """``n_envs`` environments of ``family`` behind the gymnasium vector API, resets under our control.

    ``sync`` steps them in this process, which on a few cores beats paying inter-process messages on
    every step; ``async`` gives each its own worker process, for boxes with many cores.
    """
    fns: list[Callable[[], gymnasium.Env[Any, Any]]] = [family.make_env for _ in range(n_envs)]
    disabled = gymnasium.vector.AutoresetMode.DISABLED
    if mode == "sync":
        return gymnasium.vector.SyncVectorEnv(fns, autoreset_mode=disabled)
    if mode == "async":
        return gymnasium.vector.AsyncVectorEnv(fns, autoreset_mode=disabled, shared_memory=True)
    raise ValueError(f"vector mode must be 'sync' or 'async' (got {mode!r})")


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
    ) -> None:
        self.family = family
        self.model = model
        self.n_envs = n_envs
        self.episodes = episodes_per_trial
        self.oracle = oracle
        self.envs = make_vector_env(family, n_envs, vector)
        self.device = next(model.parameters()).device
        self.pool = make_pool(model, n_envs, self.device)
        self.low = torch.tensor(family.action_low, dtype=torch.float32, device=self.device)
        self.high = torch.tensor(family.action_high, dtype=torch.float32, device=self.device)

    def close(self) -> None:
        self.envs.close()

    @torch.no_grad()
    def run(
        self,
        tasks: list[Task],
        *,
        seed: int,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Run one trial of ``episodes_per_trial`` episodes on each task (one task per environment)."""
        if len(tasks) != self.n_envs:
            raise ValueError(f"need {self.n_envs} tasks, got {len(tasks)}")
        n, k, horizon = self.n_envs, self.episodes, self.family.episode_length
        steps = k * horizon
        cfg, dev = self.model.config, self.device
        buf_windows = torch.zeros(steps, n, cfg.window, cfg.token_dim, device=dev)
        buf_newest = torch.zeros(steps, n, dtype=torch.long, device=dev)
        buf_actions = torch.zeros(steps, n, cfg.act_dim, device=dev)
        buf_logp = torch.zeros(steps, n, device=dev)
        buf_values = torch.zeros(steps, n, device=dev)
        buf_states = torch.zeros(steps, n, cfg.rnn_hidden, device=dev) if cfg.policy == "rl2" else None
        rewards = np.zeros((steps, n), np.float32)
        valid = np.zeros((steps, n), bool)
        episode_of = np.zeros((steps, n), np.int64)
        step_of = np.zeros((steps, n), np.int64)
        success = np.zeros((n, k), np.float32)
        last_values = torch.zeros(n, device=dev)

        self.envs.set_attr("task", list(tasks))
        params = np.asarray([t.params for t in tasks], np.float32) if self.oracle else None
        obs, _ = self.envs.reset(seed=[seed * 1_000 + i for i in range(n)])
        self.pool.clear(torch.arange(n, device=dev))

        episode = np.zeros(n, np.int64)
        episode_step = np.zeros(n, np.int64)
        active = np.ones(n, bool)
        start = np.ones(n, bool)
        prev_reward = np.zeros(n, np.float32)
        idle_action = np.zeros((n, cfg.act_dim), np.float32)
        for t in range(steps):
            idx = np.flatnonzero(active)
            slots = torch.from_numpy(idx).to(dev)
            policy_obs = policy_observation(obs, params)
            noise = None
            if not deterministic:
                noise = torch.randn((len(idx), cfg.act_dim), generator=generator).to(dev)
            result, raw, executed = act(
                self.pool,
                slots,
                torch.from_numpy(policy_obs[idx]).to(dev),
                torch.from_numpy(prev_reward[idx]).to(dev),
                torch.from_numpy(start[idx]).to(dev),
                low=self.low,
                high=self.high,
                deterministic=deterministic,
                noise=noise,
            )
            out = result.output
            buf_windows[t, slots] = result.windows
            buf_newest[t, slots] = result.newest
            buf_actions[t, slots] = raw
            buf_logp[t, slots] = log_prob(out, raw)
            buf_values[t, slots] = out.value
            if buf_states is not None and result.state is not None:
                buf_states[t, slots] = result.state
            valid[t, idx] = True
            episode_of[t, idx] = episode[idx]
            step_of[t, idx] = episode_step[idx]

            action = idle_action.copy()
            action[idx] = executed.cpu().numpy()
            obs, reward, terminated, truncated, info = self.envs.step(action)
            rewards[t, idx] = reward[idx]
            if self.family.has_success and "success" in info:
                hit = np.asarray(info["success"], np.float32) * active
                success[np.arange(n), np.minimum(episode, k - 1)] = np.maximum(
                    success[np.arange(n), np.minimum(episode, k - 1)], hit
                )
            prev_reward = np.asarray(reward, np.float32)
            episode_step += 1
            ended = active & (np.asarray(terminated) | np.asarray(truncated))
            episode[ended] += 1
            finished = ended & (episode >= k)
            if finished.any():
                # The trial is over. A time-limit cut is not a terminal state: bootstrap from V(s_T).
                cut = finished & ~np.asarray(terminated)
                if cut.any():
                    cut_idx = np.flatnonzero(cut)
                    final_obs = policy_observation(obs, params)
                    tail = self.pool.step(
                        torch.from_numpy(cut_idx).to(dev),
                        torch.from_numpy(final_obs[cut_idx]).to(dev),
                        torch.from_numpy(prev_reward[cut_idx]).to(dev),
                        torch.zeros(len(cut_idx), dtype=torch.bool, device=dev),
                    )
                    last_values[torch.from_numpy(cut_idx).to(dev)] = tail.output.value
                active &= ~finished
            if not active.any():
                break
            # Every ended episode restarts, including those of finished trials, since the vector API
            # refuses to step an ended episode; a finished env's further steps are idle, never stored.
            over = np.asarray(terminated) | np.asarray(truncated)
            if over.any():
                obs, _ = self.envs.reset(options={"reset_mask": over})
                episode_step[over] = 0
            start = ended & active

        return Rollout(
            windows=buf_windows,
            newest=buf_newest,
            actions=buf_actions,
            log_probs=buf_logp,
            values=buf_values,
            rewards=torch.from_numpy(rewards).to(dev),
            valid=torch.from_numpy(valid).to(dev),
            lengths=torch.from_numpy(valid.sum(0)).to(dev),
            last_values=last_values,
            episode=torch.from_numpy(episode_of).to(dev),
            episode_step=torch.from_numpy(step_of).to(dev),
            success=torch.from_numpy(success).to(dev),
            states=buf_states,
        )
