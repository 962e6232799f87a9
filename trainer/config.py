"""Training configuration: one typed dataclass, named presets, and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from trmrl.tasks import get_family

Reference = Literal["trmrl", "oracle", "memoryless"]
Policy = Literal["trmrl", "rl2"]
Optimization = Literal["joint", "separate"]
ValueLoss = Literal["mse", "gaussian_nll"]
ValueInput = Literal["memory", "observation", "memory_detached", "encoder"]

MEMORYLESS_WINDOW = 1
"""A memoryless reference reads one working memory: the current observation alone."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Each field can be overridden with ``--set key=value``."""

    family: str = "point-nav"
    """Task family to meta-train on (see ``trmrl.tasks.family_names()``)."""
    reference: Reference = "trmrl"
    """``trmrl``; ``oracle`` (task parameters appended to observations); ``memoryless`` (window 1, no
    previous action or reward)."""
    policy: Policy = "trmrl"
    """``trmrl``: the transformer over a window of working memories; ``rl2``: the RL² baseline, a GRU
    over the same working memories, its hidden state carried as the trial's memory, trained by the
    same PPO with truncated backpropagation through time (``bptt``)."""
    architecture: str = "small"
    """Encoder size: ``mujoco`` and ``metaworld`` (published), ``small`` (CPU)."""
    rnn_hidden: int = 128
    """Hidden width of the ``rl2`` GRU."""
    bptt: int = 64
    """Steps per stored sequence that ``rl2``'s update backpropagates through (the hidden state at each
    sequence's start is the one recorded during the rollout)."""
    window: int = 5
    """N, working memories per window (``context=window``)."""
    context: Literal["window", "trial"] = "window"
    """TrMRL's context: ``window``, the ``window`` most recent working memories (the paper's); ``trial``,
    every working memory since the memory was last cleared (the trial's start, or the episode's with
    ``memory_scope=episode``), sampled with a per-env key/value cache and trained a whole stored trial
    at a time in one causal forward (``window`` is then unused)."""
    max_context: int = 0
    """``context=trial``: the most working memories a context may hold; 0 (auto) sizes it to the
    context plus one -- the value after a trial's last step reads one more working memory."""
    memory_scope: Literal["episode", "trial"] = "episode"
    """Clear the window at every episode start, or keep it across a trial."""
    value_input: ValueInput = "memory"
    """What the value head reads: ``memory``, the shared episodic memory (the value's gradient trains
    the encoder too); ``memory_detached``, the same memory without its gradient (the encoder learns from
    the policy alone); ``encoder``, a memory of its own (a second encoder, or GRU, of the same size);
    ``observation``, the current augmented observation alone."""
    value_norm: Literal["none", "popart"] = "none"
    """``popart``: value targets normalised by running statistics that the value head scales back
    (PopArt), so the value loss and its gradient do not depend on the return's scale."""
    block: Literal["post", "prenorm"] = "post"
    """TrMRL's encoder layer: ``post``, the authors' post-residual layer without LayerNorm; ``prenorm``,
    LayerNorm inside each residual branch and after the last layer. Ignored by ``rl2``."""
    init: Literal["auto", "t-fixup", "xavier"] = "auto"
    """TrMRL's encoder initialisation; ``auto``: T-Fixup for ``post``, Xavier for ``prenorm``. Ignored
    by ``rl2``."""
    init_std: float = 0.5
    """Initial policy standard deviation."""
    policy_out_gain: float = 0.01
    """Xavier gain of the policy's output layer."""

    total_steps: int = 200_000
    """Environment steps to train for (all ranks together)."""
    tasks_per_update: int = 20
    """Tasks (one trial each, one environment each) sampled per update: the meta-batch, shared out among
    the ranks under ``torchrun``."""
    episodes_per_trial: int = 2
    """Episodes per trial on the same task."""
    gamma: float = 0.9
    """Discount."""
    gae_lambda: float = 0.8
    """GAE lambda, over the whole trial."""
    reward_scale: float = 1.0
    """Factor on the rewards the learner credits (advantages, value targets); the network's memory still
    reads the environment's reward, and returns are reported unscaled."""
    clip: float = 0.2
    """PPO ratio clip."""
    policy_lr: float = 3e-5
    """AdamW learning rate of the encoder and policy head."""
    value_lr: float = 3e-5
    """AdamW learning rate of the value head."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optimization: Optimization = "joint"
    """``joint``: one loss (policy + ``vf_coef`` x value) and one AdamW; ``separate``: as the authors'
    code, a policy AdamW and a value AdamW, a policy pass over the minibatches, then a value pass. With
    the value on the episodic memory, the value AdamW holds the encoder too and steps it with its own
    moments."""
    value_loss: ValueLoss = "mse"
    """``mse``: half squared error; ``gaussian_nll``: negative log-likelihood of the return under a
    Gaussian with a learned standard deviation (the authors' value function)."""
    minibatch_size: int = 256
    """Stored steps per minibatch (``rl2`` and ``context=trial`` take ``minibatch_size // L`` stored
    sequences of L steps, at least one)."""
    epochs: int = 10
    """Passes over the rollout per update."""
    vf_coef: float = 0.5
    """Weight of the value loss in the ``joint`` loss (``separate`` has none: setting both is refused)."""
    max_grad_norm: float = 1.0
    """Gradient norm clip (0 disables)."""
    normalize_advantages: bool = False
    """Standardise advantages per minibatch (the paper does not centre them)."""
    normalize_obs: bool = True
    """Keep running observation statistics in the network."""
    normalize_task_params: bool = False
    """An oracle's appended task parameters get running statistics too (else they pass unscaled)."""
    lr_decay: float = 1.0
    """Geometric learning-rate decay factor reached at ``lr_decay_end`` (1 = constant)."""
    lr_decay_start: int = 0
    """Update at which the decay starts."""
    lr_decay_end: int = 1
    """Update at which the decay factor is reached."""
    decay_value_lr: bool = True
    """Whether the value learning rate follows the decay too (the authors decay only the policy's on
    HalfCheetahVel)."""

    eval_every: int = 10
    """Meta-evaluate every this many updates (0 = only at the end)."""
    eval_tasks: int = 30
    """Held-out tasks per evaluation (the same fixed set every time)."""
    eval_seed: int = 1000
    """Seed of the fixed evaluation task sets."""
    checkpoint_every: int = 10
    """Write the resumable checkpoint every this many updates."""
    seed: int = 0
    """Seed of tasks, environments, initialisation and exploration."""
    vector: Literal["sync", "async"] = "sync"
    """``sync``: envs stepped in this process between policy steps; ``async``: envs stepped by worker
    processes, two halves taking turns, so one half's simulation overlaps the policy's step of the other."""
    env_workers: int = 0
    """``async``: worker processes in all (at least 2; 0: one per CPU core this process may use)."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be > 0 (got {getattr(self, name)})"
            for name in ("total_steps", "tasks_per_update", "episodes_per_trial", "minibatch_size", "epochs")
            if getattr(self, name) <= 0
        ]
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            problems.append("gamma must be in (0, 1] and gae_lambda in [0, 1]")
        if not (math.isfinite(self.reward_scale) and self.reward_scale > 0):
            problems.append(f"reward_scale must be a finite number > 0 (got {self.reward_scale})")
        if self.lr_decay_end <= self.lr_decay_start:
            problems.append("lr_decay_end must be after lr_decay_start")
        if self.window < 1:
            problems.append(f"window must be >= 1 (got {self.window})")
        if self.policy == "rl2" and self.reference != "trmrl":
            problems.append(
                "policy=rl2 is a baseline meta-learner; its references are TrMRL's "
                f"(got reference={self.reference})"
            )
        if self.context == "trial" and self.policy == "rl2":
            problems.append("context=trial is TrMRL's; policy=rl2 remembers in its hidden state")
        if self.context == "trial" and self.reference == "memoryless":
            problems.append(
                "context=trial remembers the trial; reference=memoryless reads one working memory"
            )
        if self.max_context < 0:
            problems.append(f"max_context must be >= 0 (0: auto) (got {self.max_context})")
        if self.rnn_hidden < 1 or self.bptt < 1:
            problems.append(f"rnn_hidden and bptt must be >= 1 (got {self.rnn_hidden}, {self.bptt})")
        if self.env_workers < 0:
            problems.append(f"env_workers must be >= 0 (got {self.env_workers})")
        if self.block == "prenorm" and self.init == "t-fixup":
            problems.append(
                "block=prenorm with init=t-fixup: T-Fixup stands in for LayerNorm, which a pre-norm block "
                "has; use init=xavier (or auto)"
            )
        if self.reference == "memoryless" and self.window != MEMORYLESS_WINDOW:
            problems.append(f"reference=memoryless reads one working memory, but window={self.window}")
        if self.normalize_task_params and self.reference != "oracle":
            problems.append(
                "normalize_task_params=true applies to an oracle's task parameters, "
                f"but reference={self.reference}"
            )
        for name in ("policy_lr", "value_lr"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            problems.append("weight_decay and max_grad_norm must be >= 0 (0 disables)")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# How the authors' code optimises (see docs/results.md, "Paper presets and their sources"): a policy
# AdamW and a value AdamW at torch's default weight decay, a Gaussian value function fitted by
# likelihood, no gradient clipping.
_AUTHORS_OPTIMISATION: dict[str, Any] = {
    "optimization": "separate",
    "value_loss": "gaussian_nll",
    "weight_decay": 0.01,
    "max_grad_norm": 0.0,
}


def _paper_mujoco(family: str, **kw: Any) -> dict[str, Any]:
    return {
        "family": family,
        "architecture": "mujoco",
        "tasks_per_update": 20,
        "episodes_per_trial": 2,
        "minibatch_size": 256,
        "epochs": 10,
        "eval_tasks": 30,
        "normalize_obs": False,
        **_AUTHORS_OPTIMISATION,
        **kw,
    }


def _paper_direction(family: str, **kw: Any) -> dict[str, Any]:
    """The authors' direction tasks (HalfCheetahDir, AntDir): the value reads the memory, 40 M steps."""
    return _paper_mujoco(
        family,
        gae_lambda=0.8,
        clip=0.2,
        policy_lr=3e-5,
        value_lr=3e-5,
        init_std=0.5,
        value_input="memory",
        total_steps=40_000_000,
        lr_decay=1e-4,
        **kw,
    )


def _paper_metaworld(family: str) -> dict[str, Any]:
    return {
        "family": family,
        "architecture": "metaworld",
        "gamma": 0.9,
        "gae_lambda": 0.95,
        "clip": 0.2,
        "policy_lr": 5e-5,
        "value_lr": 5e-5,
        "minibatch_size": 32,
        "epochs": 10,
        "tasks_per_update": 25,
        "episodes_per_trial": 10,
        "init_std": 1.0,
        "value_input": "observation",
        "total_steps": 50_000_000,
        "eval_tasks": 50,
        "normalize_obs": False,
        "policy_out_gain": 0.01,
        **_AUTHORS_OPTIMISATION,
    }


def _small(family: str, **kw: Any) -> dict[str, Any]:
    """A 2-core preset: the small encoder, 20 trials of 2 episodes per update, 3 epochs of 1,024."""
    return {
        "family": family,
        "architecture": "small",
        "tasks_per_update": 20,
        "episodes_per_trial": 2,
        "gamma": 0.95,
        "gae_lambda": 0.95,
        "clip": 0.2,
        "policy_lr": 3e-4,
        "value_lr": 1e-3,
        "minibatch_size": 1024,
        "epochs": 3,
        "init_std": 0.5,
        "value_input": "observation",
        "normalize_advantages": True,
        "eval_tasks": 30,
        **kw,
    }


_BASE_PRESETS: dict[str, dict[str, Any]] = {
    # The 20-d HalfCheetah observation, as the authors' fork (and PEARL, ProMP) defines it.
    "paper-halfcheetah-vel": _paper_mujoco(
        "halfcheetah-vel-20d",
        gamma=0.9,
        gae_lambda=0.8,
        clip=0.1,
        policy_lr=3e-5,
        value_lr=2.5e-4,
        init_std=0.2,
        policy_out_gain=1.0,
        value_input="observation",
        total_steps=20_000_000,
        lr_decay=0.1,
        lr_decay_start=100,
        lr_decay_end=750,
        decay_value_lr=False,
    ),
    "paper-halfcheetah-dir": _paper_direction(
        "halfcheetah-dir-20d", gamma=0.9, policy_out_gain=1.0, lr_decay_start=100, lr_decay_end=3700
    ),
    "paper-ant-dir": _paper_direction(
        "ant-dir", gamma=0.92, policy_out_gain=0.01, lr_decay_start=500, lr_decay_end=3500
    ),
    "paper-ml1-reach": _paper_metaworld("ml1-reach"),
    "paper-ml1-push": _paper_metaworld("ml1-push"),
    "paper-ml1-pick-place": _paper_metaworld("ml1-pick-place"),
    "paper-ml10": _paper_metaworld("ml10"),
    "paper-ml45": _paper_metaworld("ml45"),
    # Tuned for 2 CPU cores: a smaller encoder, larger learning rates, fewer epochs over bigger batches.
    "small-point-nav": {
        "family": "point-nav",
        "architecture": "small",
        "tasks_per_update": 32,
        "episodes_per_trial": 2,
        "gamma": 0.95,
        "gae_lambda": 0.9,
        "clip": 0.2,
        "policy_lr": 1e-3,
        "value_lr": 1e-3,
        "minibatch_size": 512,
        "epochs": 4,
        "init_std": 0.5,
        "value_input": "memory",
        "normalize_advantages": True,
        "lr_decay": 0.1,
        "lr_decay_start": 40,
        "lr_decay_end": 150,
        "total_steps": 1_000_000,
        "eval_every": 5,
        "eval_tasks": 30,
        "checkpoint_every": 5,
    },
    # Exploration noise 0.2, the paper's HalfCheetahVel value: at 0.5 some seeds of every kind (TrMRL,
    # RL², the oracle) learned to flip onto the back and run there, a local optimum they never left
    # (docs/results.md, halfcheetah-vel seeds).
    "small-halfcheetah-vel": _small(
        "halfcheetah-vel", init_std=0.2, total_steps=10_000_000, eval_every=20, checkpoint_every=10
    ),
    # The value on the shared episodic memory, as the authors run HalfCheetahDir: the preset on which
    # joint and separate policy/value optimisation are compared (docs/results.md).
    "small-halfcheetah-dir": _small(
        "halfcheetah-dir", value_input="memory", total_steps=2_000_000, eval_every=10, checkpoint_every=10
    ),
    # Ant running forward or backward: the value on the shared memory as for halfcheetah-dir; 27-d
    # observation, 8 actions, episodes end early when the torso leaves the healthy height.
    "small-ant-dir": _small(
        "ant-dir", value_input="memory", total_steps=8_000_000, eval_every=10, checkpoint_every=10
    ),
    # 500-step episodes: 20,000 steps per update; the goal is hidden, found from the shaped reward.
    "small-ml1-reach": _small("ml1-reach", total_steps=5_000_000, eval_every=10, checkpoint_every=5),
    # Every update draws 50 of the 50 train goals, and the puck starts where another train task puts it,
    # so the goal cannot be read off the puck (docs/results.md, ml1-reach).
    "small-ml1-reach-decoupled": _small(
        "ml1-reach-decoupled", tasks_per_update=50, total_steps=5_000_000, eval_every=10, checkpoint_every=5
    ),
    # The same, with train goals drawn afresh from reach-v3's goal box instead of the benchmark's 50, and
    # validation goals no update trained on (docs/results.md, ml1-reach).
    "small-ml1-reach-fresh": _small(
        "ml1-reach-fresh", tasks_per_update=50, total_steps=5_000_000, eval_every=10, checkpoint_every=5
    ),
    # Push with goals drawn from the training distribution as for reach (the test goals the benchmark's).
    "small-ml1-push-fresh": _small(
        "ml1-push-fresh", tasks_per_update=50, total_steps=10_000_000, eval_every=10, checkpoint_every=5
    ),
}


def _with_references(presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every preset gets an ``-rl2`` twin (the RL² baseline: the same PPO, sampler, budget and evaluation,
    the hidden state kept across the trial); every locomotion and point-nav preset gets ``-oracle`` and
    ``-memoryless`` twins too."""
    out = dict(presets)
    for name, values in presets.items():
        out[f"{name}-rl2"] = {**values, "policy": "rl2", "memory_scope": "trial"}
        if get_family(values["family"]).meta_world:
            continue
        out[f"{name}-oracle"] = {**values, "reference": "oracle"}
        out[f"{name}-memoryless"] = {**values, "reference": "memoryless", "window": MEMORYLESS_WINDOW}
    return out


_CHOSEN: dict[str, dict[str, dict[str, Any]]] = {
    # Each learner's best arm of the halfcheetah-vel screen, on validation only (docs/results.md, "The
    # learner's options, screened on validation"): TrMRL's value on its own encoder, RL²'s value on the
    # shared memory with PopArt targets.
    "small-halfcheetah-vel": {
        "trmrl": {"value_input": "encoder"},
        "rl2": {"value_input": "memory", "value_norm": "popart"},
    },
}
"""The options the learner screen chose, per base preset and learner: ``<preset>-chosen`` (TrMRL) and
``<preset>-rl2-chosen`` beside the paper-faithful presets, which keep their names and values."""


def _with_chosen(presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = dict(presets)
    for base, learners in _CHOSEN.items():
        out[f"{base}-chosen"] = {**presets[base], **learners["trmrl"]}
        out[f"{base}-rl2-chosen"] = {**presets[f"{base}-rl2"], **learners["rl2"]}
    return out


PRESETS: dict[str, dict[str, Any]] = _with_chosen(_with_references(_BASE_PRESETS))


def preset_config(name: str, overrides: dict[str, str] | None = None) -> TrainConfig:
    """The config of a named preset with ``key=value`` string overrides applied and type-checked.

    Example:
        >>> preset_config("small-point-nav", {"total_steps": "1000"}).total_steps
        1000
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    values = dict(PRESETS[name])
    for key, raw in (overrides or {}).items():
        values[key] = parse_field(key, raw)
    if "vf_coef" in values and values.get("optimization") == "separate":
        # An explicit weight nothing would read: separate optimisation has no joint loss to weigh.
        raise ValueError(
            f"vf_coef={values['vf_coef']} would be ignored under optimization=separate: vf_coef weighs the "
            "value loss in joint's single loss, while separate steps the value with its own AdamW (value_lr "
            "sets its step); drop vf_coef or set optimization=joint"
        )
    return TrainConfig(**values)


def parse_field(key: str, raw: str) -> Any:
    """Parse a ``--set`` value into the type of :class:`TrainConfig` field ``key``."""
    hints = typing.get_type_hints(TrainConfig)
    if key not in hints:
        raise ValueError(f"unknown setting {key!r}; settings: {', '.join(sorted(hints))}")
    kind = hints[key]
    try:
        if typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            if raw not in choices:
                raise ValueError(f"expected one of {', '.join(map(str, choices))}")
            return raw
        if kind is bool:
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return lowered in ("true", "1", "yes")
        if kind is int:
            return int(raw.replace("_", ""))
        if kind is float:
            return float(raw)
        if kind is str or isinstance(kind, types.UnionType):
            return raw
    except ValueError as exc:
        raise ValueError(f"setting {key}={raw!r}: {exc}") from exc
    raise ValueError(f"setting {key!r} cannot be set from the command line")
