"""The meta-training loop: sample trials, PPO-update, evaluate, checkpoint, resume.

An output directory holds one run::

    run.json            the TrainConfig (a different config in the same directory is refused, except
                        ``total_steps``: a run is extended, or cut short, by resuming it with another)
    metrics.jsonl       one JSON object per update and per evaluation
    tb/                 TensorBoard events
    latest/             resumable checkpoint: model + trainer_state.pt (optimizer, RNG, counters)
    best/               the checkpoint with the best validation return so far
    final/              the checkpoint at the end of training

Model selection never sees the held-out tasks: periodic evaluation and ``best/`` use the ``validation``
split (tasks of the training distribution with their own seed); ``test`` and ``ood`` are evaluated
once, at the end.

Checkpoints are written atomically, so a run killed at any moment resumes from its last ``latest/``.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import MEMORYLESS_WINDOW, TrainConfig
from trainer.evaluate import EvalResult, Evaluator
from trainer.ppo import (
    Batch,
    RunningMeanStd,
    SequenceBatch,
    ValueTargetStats,
    compute_gae,
    decayed_lr_factor,
    flatten,
    make_optimizers,
    ppo_update,
    sequences,
    update_settings,
)
from trainer.rollout import TrialSampler
from trmrl.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from trmrl.device import resolve_device
from trmrl.model import Init, ModelConfig
from trmrl.networks import build_model
from trmrl.tasks import Task, TaskFamily, get_family
from trmrl.tasks.trials import policy_obs_dim

STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"
SELECTION_SPLIT = "validation"
"""The split periodic evaluation and ``best/`` use."""
EVAL_SPLITS = (SELECTION_SPLIT, "test", "ood")
"""Splits evaluated (where the family has them): the selection split periodically, the rest at the end."""


class RunDirectoryError(ValueError):
    """The output directory holds something other than this run."""


@dataclass
class TrainResult:
    steps: int
    updates: int
    seconds: float
    last_eval: dict[str, float]


def model_config_for(cfg: TrainConfig, family: TaskFamily) -> ModelConfig:
    """The network a training config implies, including the oracle and memoryless references and the
    RL² baseline (whose memory is its hidden state: a window of one working memory)."""
    oracle = cfg.reference == "oracle"
    memoryless = cfg.reference == "memoryless"
    return ModelConfig.from_preset(
        cfg.architecture,
        obs_dim=policy_obs_dim(family, oracle),
        act_dim=family.act_dim,
        # RL² remembers in its hidden state: its window holds the newest working memory alone.
        # A trial-context TrMRL hands back its newest working memory alone: the context is in its cache.
        window=MEMORYLESS_WINDOW
        if memoryless or cfg.policy == "rl2" or cfg.context == "trial"
        else cfg.window,
        policy=cfg.policy,
        context=cfg.context,
        max_context=resolved_max_context(cfg, family),
        rnn_hidden=cfg.rnn_hidden,
        memory_scope=cfg.memory_scope,
        value_input=cfg.value_input,
        value_norm=cfg.value_norm,
        # The encoder's block and initialisation are TrMRL's; the GRU has neither.
        block=cfg.block if cfg.policy == "trmrl" else "post",
        init=resolved_init(cfg) if cfg.policy == "trmrl" else "t-fixup",
        init_std=cfg.init_std,
        policy_out_gain=cfg.policy_out_gain,
        include_previous=not memoryless,
    )


def context_steps(cfg: TrainConfig, family: TaskFamily) -> int:
    """The most working memories one context of a run holds: a trial's steps (an episode's with
    ``memory_scope=episode``) plus the one the value after the last step reads."""
    episodes = cfg.episodes_per_trial if cfg.memory_scope == "trial" else 1
    return episodes * family.episode_length + 1


def resolved_max_context(cfg: TrainConfig, family: TaskFamily) -> int:
    """``max_context``, with 0 (auto) standing for :func:`context_steps`."""
    return cfg.max_context or context_steps(cfg, family)


def resolved_init(cfg: TrainConfig) -> Init:
    """The encoder initialisation ``init=auto`` stands for: T-Fixup for the authors' block, Xavier for
    a pre-norm one."""
    if cfg.init != "auto":
        return cfg.init
    return "xavier" if cfg.block == "prenorm" else "t-fixup"


def tasks_for_rank(tasks_per_update: int, rank: int, world: int) -> int:
    """This rank's share of the meta-batch: ``tasks_per_update`` split as evenly as it goes."""
    return tasks_per_update // world + (1 if rank < tasks_per_update % world else 0)


def check_compatible(cfg: TrainConfig, family: TaskFamily, world: int) -> None:
    """Refuse, before any work, a config that contradicts the family or the process group."""
    problems = []
    if world > cfg.tasks_per_update:
        problems.append(
            f"tasks_per_update={cfg.tasks_per_update} is fewer than the {world} ranks: "
            "every rank needs a task"
        )
    if SELECTION_SPLIT not in family.splits and cfg.eval_every:
        problems.append(
            f"eval_every={cfg.eval_every} needs a {SELECTION_SPLIT!r} split, which family {family.name!r} "
            f"lacks (splits: {', '.join(family.splits)}); set eval_every=0"
        )
    if (
        cfg.policy == "trmrl"
        and cfg.memory_scope == "episode"
        and cfg.reference != "memoryless"
        and cfg.window > family.episode_length
    ):
        problems.append(
            f"window={cfg.window} with memory_scope=episode: the window is cleared at every episode start, "
            f"and an episode of {family.name!r} lasts at most {family.episode_length} steps; use a window "
            f"<= {family.episode_length} or memory_scope=trial"
        )
    if cfg.context == "trial" and 0 < cfg.max_context < context_steps(cfg, family):
        problems.append(
            f"max_context={cfg.max_context} with context=trial: a context of {family.name!r} holds up to "
            f"{context_steps(cfg, family)} working memories (memory_scope={cfg.memory_scope}, "
            f"episodes_per_trial={cfg.episodes_per_trial}, the value after the last step included); "
            "use max_context=0 (auto) or more"
        )
    if problems:
        raise ValueError("invalid training config: " + "; ".join(problems))


def check_run_directory(out: Path, cfg: TrainConfig) -> bool:
    """True when ``out`` holds this very run (resume); raise if it holds another one."""
    run_file = out / RUN_FILE
    if run_file.exists():
        saved = json.loads(run_file.read_text())
        current, defaults = cfg.to_dict(), TrainConfig().to_dict()
        # A setting added after the run started counts as unchanged while it keeps its default. The budget
        # may change: nothing else depends on it (the learning-rate schedule counts updates), so a run
        # resumed with a larger ``total_steps`` is the run trained with that budget from the start.
        merged = {**defaults, **saved, "total_steps": current["total_steps"]}
        if merged != current:
            changed = sorted(k for k in current if merged.get(k, defaults[k]) != current[k])
            raise RunDirectoryError(
                f"{out} holds another run (settings differ: {', '.join(changed) or 'unknown keys'}); "
                "choose a new --out directory"
            )
        return True
    if out.exists() and any(out.iterdir()):
        raise RunDirectoryError(f"{out} is not empty and holds no trmrl run; choose a new --out directory")
    return False


def _record_budget(run_file: Path, total_steps: int) -> None:
    """Keep ``run.json`` the settings the run is trained with when it is resumed with another budget."""
    saved = json.loads(run_file.read_text())
    if saved.get("total_steps") != total_steps:
        tmp = run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**saved, "total_steps": total_steps}, indent=2))
        os.replace(tmp, run_file)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _rank_world()[1] > 1:
        dist.all_reduce(t)
    return t


class Trainer:
    """Owns the network, optimiser, samplers and bookkeeping of one run."""

    def __init__(self, cfg: TrainConfig, out: Path, *, progress: bool = True, held_out: bool = True) -> None:
        self.cfg = cfg
        self.out = out
        self.progress = progress
        self.held_out = held_out
        """Evaluate the held-out splits (test, ood) when the run ends; a probe that must not see them
        passes ``False`` and its ``final/`` carries validation figures only."""
        self.rank, self.world = _rank_world()
        self.is_main = self.rank == 0
        self.family = get_family(cfg.family)
        self.oracle = cfg.reference == "oracle"
        self.device = resolve_device(cfg.device)
        resume = check_run_directory(out, cfg)

        check_compatible(cfg, self.family, self.world)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build_model(model_config_for(cfg, self.family)).to(self.device)
        # The learned std of the Gaussian value loss belongs to training only: serving never reads it.
        self.value_log_std = nn.Parameter(torch.zeros((), device=self.device))
        self.optimizers = make_optimizers(
            self.model,
            cfg.policy_lr,
            cfg.value_lr,
            cfg.weight_decay,
            optimization=cfg.optimization,
            value_log_std=self.value_log_std if cfg.value_loss == "gaussian_nll" else None,
        )
        self.value_targets = ValueTargetStats()
        # The meta-batch is shared out among the ranks; the first ranks take one more task each.
        self.local_tasks = tasks_for_rank(cfg.tasks_per_update, self.rank, self.world)
        self.stats_dim = self.family.obs_dim
        if self.oracle and cfg.normalize_task_params:
            self.stats_dim += self.family.task_param_dim
        self.obs_stats = RunningMeanStd(self.stats_dim)
        self.generator = torch.Generator().manual_seed(cfg.seed * 7919 + self.rank)
        self.update = 0
        self.steps = 0
        self.best_return = -float("inf")
        self.last_eval: dict[str, float] = {}
        self.last_tasks: list[Task] = []
        self.last_local_steps = 0

        if resume and self.is_main:
            _record_budget(out / RUN_FILE, cfg.total_steps)
        if resume and (out / "latest").exists():
            self._load_state(out / "latest")
        elif self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / RUN_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))

        self.sampler = TrialSampler(
            self.family,
            self.model,
            self.local_tasks,
            cfg.episodes_per_trial,
            oracle=self.oracle,
            vector=cfg.vector,
            env_workers=cfg.env_workers,
        )
        self.evaluators: dict[str, Evaluator] = {}
        if self.is_main:
            for split in EVAL_SPLITS:
                if split in self.family.splits:
                    tasks = self.family.sample_tasks(split, cfg.eval_tasks, seed=cfg.eval_seed)
                    self.evaluators[split] = Evaluator(
                        self.family,
                        self.model,
                        tasks,
                        cfg.episodes_per_trial,
                        oracle=self.oracle,
                        seed=cfg.eval_seed,
                    )
        self._writer: Any = None

    # ----------------------------------------------------------------------------------------- state
    def _trainer_state(self) -> bytes:
        state = {
            "optimizer": self.optimizers.state_dict(),
            "value_log_std": self.value_log_std.detach().cpu(),
            "obs_stats": self.obs_stats.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "update": self.update,
            "steps": self.steps,
            "best_return": self.best_return,
            "last_eval": json.dumps(self.last_eval),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def _load_state(self, path: Path) -> None:
        ckpt = load_checkpoint(path, self.device)
        self.model.load_state_dict(ckpt.model.state_dict())
        state = torch.load(path / STATE_FILE, map_location=self.device, weights_only=True)
        self.optimizers.load_state_dict(state["optimizer"])
        if "value_log_std" in state:
            with torch.no_grad():
                self.value_log_std.copy_(state["value_log_std"])
        self.obs_stats.load_state_dict(state["obs_stats"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.update = int(state["update"])
        self.steps = int(state["steps"])
        self.best_return = float(state["best_return"])
        self.last_eval = json.loads(state["last_eval"])
        if self.is_main:
            self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop records of updates after the checkpoint: the resumed run writes them again."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        kept = [
            line
            for line in path.read_text().splitlines()
            if line and json.loads(line)["update"] <= self.update
        ]
        path.write_text("".join(line + "\n" for line in kept))

    def save(self, name: str, *, resumable: bool = False) -> None:
        """Write the checkpoint ``out/name`` (main rank only)."""
        if not self.is_main:
            return
        info = CheckpointInfo(
            task_family=self.family.name,
            action_low=self.family.action_low,
            action_high=self.family.action_high,
            step=self.steps,
            metrics=self.last_eval,
            training={"reference": self.cfg.reference, "update": self.update, **self.cfg.to_dict()},
            task_params_in_obs=self.oracle,
        )
        extra = {STATE_FILE: self._trainer_state()} if resumable else None
        save_checkpoint(self.out / name, self.model, info, extra_files=extra)

    # ------------------------------------------------------------------------------------- logging
    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tb"))
        for key, value in record.items():
            if isinstance(value, int | float) and key not in ("update", "steps"):
                self._writer.add_scalar(key, value, self.steps)

    # ---------------------------------------------------------------------------------- main loop
    def evaluate(self, splits: tuple[str, ...] = (SELECTION_SPLIT,)) -> dict[str, float]:
        """Deterministic meta-evaluation on the fixed task sets of ``splits`` (those the family has)."""
        metrics: dict[str, float] = {}
        for split, evaluator in self.evaluators.items():
            if split not in splits:
                continue
            result: EvalResult = evaluator.run()
            metrics.update(result.summary(f"{split}/"))
        return metrics

    def train_one_update(self) -> dict[str, Any]:
        cfg = self.cfg
        factor = decayed_lr_factor(self.update, cfg.lr_decay, cfg.lr_decay_start, cfg.lr_decay_end)
        for optimizer in self.optimizers.all():
            for group in optimizer.param_groups:
                decays = group.get("role") != "value" or cfg.decay_value_lr
                group["lr"] = group["base_lr"] * (factor if decays else 1.0)
        task_seed = (cfg.seed * 1_000_003 + self.update) * self.world + self.rank
        tasks = self.family.sample_tasks("train", self.local_tasks, seed=task_seed)
        self.last_tasks = tasks
        t0 = time.perf_counter()
        self.model.eval()
        rollout = self.sampler.run(tasks, seed=task_seed, generator=self.generator)
        t1 = time.perf_counter()
        advantages, returns = compute_gae(rollout, cfg.gamma, cfg.gae_lambda, cfg.reward_scale)
        flat = flatten(rollout, advantages, returns)
        batch: Batch | SequenceBatch = flat
        if cfg.policy == "rl2":
            batch = sequences(rollout, advantages, returns, cfg.bptt)
        elif cfg.context == "trial":  # each stored trial whole, in one causal forward
            batch = sequences(rollout, advantages, returns, int(rollout.valid.shape[0]))
        # A PopArt value head takes this update's targets into its statistics (no output changes).
        self.value_targets.update(self.model, flat.returns)
        self.model.train()
        stats = ppo_update(
            self.model,
            self.optimizers,
            batch,
            generator=self.generator,
            value_log_std=self.value_log_std,
            **update_settings(cfg),
        )
        t2 = time.perf_counter()
        if cfg.normalize_obs:
            self._update_obs_stats(flat.windows, flat.newest)
        local_steps = int(rollout.lengths.sum())
        self.last_local_steps = local_steps
        steps = int(_all_reduce_sum(torch.tensor([local_steps], dtype=torch.float64))[0])
        self.steps += steps
        self.update += 1
        mean_return = float(_all_reduce_sum(rollout.rewards.sum().double().cpu().reshape(1))[0]) / (
            cfg.tasks_per_update * cfg.episodes_per_trial
        )
        return {
            "update": self.update,
            "steps": self.steps,
            "train/return": mean_return,
            "train/policy_loss": stats.policy_loss,
            "train/value_loss": stats.value_loss,
            "train/approx_kl": stats.approx_kl,
            "train/clip_fraction": stats.clip_fraction,
            "train/grad_norm": stats.grad_norm,
            "train/lr_factor": factor,
            "time/sample_s": t1 - t0,
            "time/update_s": t2 - t1,
            "time/steps_per_s": steps / (t2 - t0),
        }

    def _update_obs_stats(self, windows: torch.Tensor, newest: torch.Tensor) -> None:
        obs_dim = self.stats_dim
        obs = windows[torch.arange(len(windows), device=windows.device), newest, :obs_dim].double().cpu()
        moments = torch.cat(
            [obs.sum(0), (obs**2).sum(0), torch.tensor([float(len(obs))], dtype=torch.float64)]
        )
        moments = _all_reduce_sum(moments)
        count = float(moments[-1])
        mean = moments[:obs_dim] / count
        var = (moments[obs_dim : 2 * obs_dim] / count - mean**2).clamp(min=0)
        self.obs_stats.update(mean, var, count)
        with torch.no_grad():
            self.obs_stats.apply_to(self.model)

    def train(self) -> TrainResult:
        cfg = self.cfg
        start = time.perf_counter()
        start_steps = self.steps
        bar = None
        if self.is_main and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.total_steps, initial=self.steps, unit="step", dynamic_ncols=True)
        try:
            while self.steps < cfg.total_steps:
                record = self.train_one_update()
                done = self.steps >= cfg.total_steps
                if self.evaluators and ((cfg.eval_every and self.update % cfg.eval_every == 0) or done):
                    self.last_eval = self.evaluate()
                    record.update(self.last_eval)
                    headline = self.last_eval.get(f"{SELECTION_SPLIT}/return", -float("inf"))
                    if headline > self.best_return:
                        self.best_return = headline
                        self.save("best")
                if done and self.evaluators and self.held_out:
                    # The held-out sets, once, after every choice has been made.
                    figures = self.evaluate(tuple(s for s in EVAL_SPLITS if s != SELECTION_SPLIT))
                    self.last_eval = {**self.last_eval, **figures}
                    record.update(figures)
                self.log(record)
                if self.update % cfg.checkpoint_every == 0 or done:
                    self.save("latest", resumable=True)
                if bar is not None:
                    bar.update(record["steps"] - bar.n)
                    postfix = {
                        "steps/s": f"{record['time/steps_per_s']:.0f}",
                        "ret": f"{record['train/return']:.1f}",
                    }
                    if f"{SELECTION_SPLIT}/return" in self.last_eval:
                        postfix["val"] = f"{self.last_eval[f'{SELECTION_SPLIT}/return']:.1f}"
                    bar.set_postfix(postfix)
            self.save("final")
        finally:
            if bar is not None:
                bar.close()
            if self._writer is not None:
                self._writer.close()
        elapsed = time.perf_counter() - start
        return TrainResult(self.steps - start_steps, self.update, elapsed, self.last_eval)

    def close(self) -> None:
        self.sampler.close()
        for evaluator in self.evaluators.values():
            evaluator.close()


def train(cfg: TrainConfig, out: str | Path, *, progress: bool = True, held_out: bool = True) -> TrainResult:
    """Train (or resume) the run in ``out`` until ``cfg.total_steps``.

    Example:
        >>> from trainer.config import preset_config
        >>> train(preset_config("small-point-nav", {"total_steps": "6400"}), "/tmp/doc-run", progress=False)
        ...  # doctest: +SKIP
    """
    trainer = Trainer(cfg, Path(out), progress=progress, held_out=held_out)
    try:
        return trainer.train()
    finally:
        trainer.close()


def init_distributed() -> None:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
