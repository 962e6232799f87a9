"""The TrMRL network (Melo, ICML 2022), one definition for training and serving.

A causal transformer encoder without LayerNorm (trainable thanks to T-Fixup initialisation) reads a
window of the N most recent working memories; the encoder output at the newest memory -- the episodic
memory -- feeds a Gaussian policy head with a state-independent log-std and, in some configurations,
the value head.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trmrl.memory import token_dim

MemoryScope = Literal["episode", "trial"]
ValueInput = Literal["memory", "observation", "memory_detached", "encoder"]
ValueNorm = Literal["none", "popart"]
Block = Literal["post", "prenorm"]
Init = Literal["t-fixup", "xavier"]
PolicyKind = Literal["trmrl", "rl2"]
Context = Literal["window", "trial"]

VALUE_INPUTS: tuple[str, ...] = ("memory", "observation", "memory_detached", "encoder")

#: Encoder sizes. ``mujoco`` and ``metaworld`` are the published ones; ``small`` fits 2 CPU cores.
ARCHITECTURES: dict[str, dict[str, int]] = {
    "mujoco": {"d_model": 128, "n_layers": 4, "n_heads": 16, "d_ff": 512},
    "metaworld": {"d_model": 32, "n_layers": 4, "n_heads": 4, "d_ff": 128},
    "small": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128},
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a TrMRL policy; everything a checkpoint needs to rebuild the network."""

    obs_dim: int
    """Observation width (task parameters included for an oracle policy)."""
    act_dim: int
    """Action width."""
    window: int = 5
    """N, the number of working memories the policy attends over."""
    d_model: int = 128
    """Token embedding width."""
    n_layers: int = 4
    """Encoder layers L."""
    n_heads: int = 16
    """Attention heads per layer."""
    d_ff: int = 512
    """Feed-forward hidden width."""
    head_hidden: tuple[int, ...] = (64, 64)
    """Hidden sizes of the policy and value MLPs (tanh)."""
    value_input: ValueInput = "memory"
    """What the value head reads. ``memory``: the shared episodic memory, its gradient reaching the
    encoder; ``memory_detached``: the shared episodic memory, the encoder learning from the policy alone;
    ``encoder``: an episodic memory of its own (a second encoder, or GRU, of the same size);
    ``observation``: the newest working memory (the augmented observation) alone."""
    value_norm: ValueNorm = "none"
    """``popart``: the value head predicts a normalised return that running statistics of the value
    targets scale back (PopArt, van Hasselt et al. 2016), so the value loss does not depend on the
    return's scale; ``none``: it predicts the return itself."""
    block: Block = "post"
    """``post``: the authors' post-residual layer without normalisation; ``prenorm``: LayerNorm before
    attention and feed-forward inside each residual branch, and once after the last layer."""
    init: Init = "t-fixup"
    """Encoder initialisation: ``t-fixup`` (the authors', which makes ``post`` trainable without
    LayerNorm) or ``xavier`` (plain Xavier-uniform, the usual choice for ``prenorm``)."""
    init_std: float = 0.5
    """Initial policy standard deviation."""
    policy_out_gain: float = 0.01
    """Xavier gain of the policy mean's output layer."""
    memory_scope: MemoryScope = "episode"
    """``episode``: the window is cleared at each episode start; ``trial``: kept across a trial's episodes."""
    include_previous: bool = True
    """``False`` for a memoryless reference policy: tokens carry the observation only."""
    policy: PolicyKind = "trmrl"
    """``trmrl``: the transformer over a window of working memories; ``rl2``: the RL² baseline, a GRU
    over the same working memories whose hidden state is the whole memory (``window`` is then 1)."""
    rnn_hidden: int = 128
    """Hidden width of the ``rl2`` GRU (unused by ``trmrl``)."""
    context: Context = "window"
    """What a ``trmrl`` policy attends over. ``window``: the ``window`` most recent working memories (the
    paper's); ``trial``: every working memory since its memory was last cleared -- the trial's start, or
    the episode's with ``memory_scope="episode"`` -- up to ``max_context``, with sinusoidal positions
    counted from that start. A pool keeps each slot's keys and values (:class:`~trmrl.trial_pool.
    TrialPool`) and the trainer evaluates whole stored trials in one causal forward. ``window`` is then
    1: a step hands back its newest working memory alone."""
    max_context: int = 400
    """``context="trial"``: the most working memories one context holds (positions ``0..max_context-1``).
    A step that would add one more is refused (:class:`~trmrl.trial_pool.ContextFull`), nothing slides."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("obs_dim", "act_dim", "window", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.n_heads >= 1 and self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.memory_scope not in ("episode", "trial"):
            problems.append(f"memory_scope must be 'episode' or 'trial' (got {self.memory_scope!r})")
        if self.policy not in ("trmrl", "rl2"):
            problems.append(f"policy must be 'trmrl' or 'rl2' (got {self.policy!r})")
        if self.policy == "rl2" and self.window != 1:
            problems.append(f"policy=rl2 remembers in its hidden state: window must be 1 (got {self.window})")
        if self.context not in ("window", "trial"):
            problems.append(f"context must be 'window' or 'trial' (got {self.context!r})")
        if self.max_context < 1:
            problems.append(f"max_context must be >= 1 (got {self.max_context})")
        if self.context == "trial" and self.policy == "rl2":
            problems.append(
                "context=trial is a transformer's context; policy=rl2 remembers in its hidden state"
            )
        if self.context == "trial" and self.window != 1:
            problems.append(
                f"context=trial attends over up to max_context={self.max_context} memories and a step "
                f"hands back its newest one: window must be 1 (got {self.window})"
            )
        if self.rnn_hidden < 1:
            problems.append(f"rnn_hidden must be >= 1 (got {self.rnn_hidden})")
        if self.value_input not in VALUE_INPUTS:
            choices = ", ".join(VALUE_INPUTS)
            problems.append(f"value_input must be one of {choices} (got {self.value_input!r})")
        if self.value_norm not in ("none", "popart"):
            problems.append(f"value_norm must be 'none' or 'popart' (got {self.value_norm!r})")
        if self.block not in ("post", "prenorm"):
            problems.append(f"block must be 'post' or 'prenorm' (got {self.block!r})")
        if self.init not in ("t-fixup", "xavier"):
            problems.append(f"init must be 't-fixup' or 'xavier' (got {self.init!r})")
        if self.block == "prenorm" and self.init == "t-fixup":
            problems.append(
                "block=prenorm with init=t-fixup: T-Fixup replaces LayerNorm, a pre-norm block has it; "
                "use init=xavier"
            )
        if not self.init_std > 0:
            problems.append(f"init_std must be > 0 (got {self.init_std})")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def token_dim(self) -> int:
        """Width of one working memory."""
        return token_dim(self.obs_dim, self.act_dim)

    @property
    def state_width(self) -> int:
        """Width of an ``rl2`` policy's recurrent state: its GRU's hidden state, followed by the value
        GRU's with ``value_input="encoder"``."""
        return self.rnn_hidden * (2 if self.value_input == "encoder" else 1)

    @classmethod
    def from_preset(cls, preset: str, *, obs_dim: int, act_dim: int, **overrides: Any) -> ModelConfig:
        """Build a config from a named architecture (``mujoco``, ``metaworld``, ``small``).

        Example:
            >>> ModelConfig.from_preset("small", obs_dim=2, act_dim=2).d_model
            64
        """
        if preset not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {preset!r}; known: {', '.join(sorted(ARCHITECTURES))}")
        return cls(obs_dim=obs_dim, act_dim=act_dim, **{**ARCHITECTURES[preset], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        d = dataclasses.asdict(self)
        d["head_hidden"] = list(self.head_hidden)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        data = dict(data)
        if "head_hidden" in data:
            data["head_hidden"] = tuple(int(h) for h in data["head_hidden"])
        return cls(**data)


class PolicyOutput(NamedTuple):
    """What one forward pass yields for a batch of windows."""

    mean: Tensor
    """``[B, act_dim]`` Gaussian mean (unclipped)."""
    log_std: Tensor
    """``[act_dim]`` state-independent log standard deviation."""
    value: Tensor
    """``[B]`` state-value estimate."""


def sinusoidal_positions(length: int, d_model: int) -> Tensor:
    """The standard sinusoidal positional encoding, ``[length, d_model]``."""
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)[:, : d_model // 2]
    return pe.float()


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a fused Q/K/V projection.

    With ``newest`` given, only the query at each row's newest position is computed (keys up to it):
    the last encoder layer needs no other output, which saves most of its work.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, newest: Tensor | None = None) -> Tensor:
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if newest is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out_proj(y.transpose(1, 2).reshape(b, t, d))
        rows = torch.arange(b, device=x.device)
        q_new = q[rows, :, newest].unsqueeze(2)  # [B, H, 1, dh]
        visible = torch.arange(t, device=x.device).unsqueeze(0) <= newest.unsqueeze(1)  # [B, T]
        y = F.scaled_dot_product_attention(q_new, k, v, attn_mask=visible[:, None, None, :])
        return self.out_proj(y.reshape(b, d))

    def sequence(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Every position's output over ``x [B, L, d]`` -- causal, or as ``mask [B, L, L]`` (query, key)
        allows -- and the keys and values ``[B, H, L, dh]`` a cache keeps."""
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d)), k, v


class KeyValueCache(Protocol):
    """Where a cached step keeps the keys and values of earlier working memories (one context per row)."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store ``k`` and ``v`` ``[B, H, dh]`` (the newest memory's, at layer ``layer``) in each row's
        context and return ``q``'s attention ``[B, H, dh]`` over that context, the newest included."""
        ...


class EncoderLayer(nn.Module):
    """One encoder layer. ``post`` (the authors'): ``x + attn(x)``, then ``x + ff(x)``, no normalisation;
    ``prenorm``: ``x + attn(norm1(x))``, then ``x + ff(norm2(x))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, block: Block = "post") -> None:
        super().__init__()
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        prenorm = block == "prenorm"
        self.norm1 = nn.LayerNorm(d_model) if prenorm else None
        self.norm2 = nn.LayerNorm(d_model) if prenorm else None

    def forward(self, x: Tensor, newest: Tensor | None = None) -> Tensor:
        if newest is None:
            x = x + self.attn(_norm(self.norm1, x))
        else:
            rows = torch.arange(x.shape[0], device=x.device)
            x = x[rows, newest] + self.attn(_norm(self.norm1, x), newest)
        return x + self.linear2(F.relu(self.linear1(_norm(self.norm2, x))))


def _norm(norm: nn.LayerNorm | None, x: Tensor) -> Tensor:
    return x if norm is None else norm(x)


class Encoder(nn.Module):
    """The bias-free embedding and the causal encoder: windows of working memories in, the episodic
    memory (the output at each window's newest position) out. :class:`TrMRL` is one (its state-dict keys
    stay ``embed.*`` and ``layers.*``) and holds a second one as ``value_encoder`` when
    ``value_input="encoder"``."""

    def __init__(self, config: ModelConfig, *, initialize: bool = True) -> None:
        super().__init__()
        c = config
        self.embed = nn.Linear(c.token_dim, c.d_model, bias=False)
        self.layers = nn.ModuleList(
            EncoderLayer(c.d_model, c.n_heads, c.d_ff, c.block) for _ in range(c.n_layers)
        )
        self.final_norm = nn.LayerNorm(c.d_model) if c.block == "prenorm" else None
        if initialize:
            self.init_(c.init)

    def init_(self, kind: Init) -> None:
        """T-Fixup as the authors' implementation applies it, or plain Xavier-uniform."""
        n_layers, d = len(self.layers), self.embed.out_features
        scale = 0.67 * n_layers**-0.25
        with torch.no_grad():
            for layer in self.layers:
                assert isinstance(layer, EncoderLayer)
                for linear in (layer.attn.qkv, layer.attn.out_proj, layer.linear1, layer.linear2):
                    nn.init.xavier_uniform_(linear.weight)
                    nn.init.zeros_(linear.bias)
                if kind == "t-fixup":
                    layer.linear1.weight.mul_(scale)
                    layer.linear2.weight.mul_(scale)
                    layer.attn.out_proj.weight.mul_(scale)
                    layer.attn.qkv.weight.mul_(scale * math.sqrt(2.0))
            if kind == "t-fixup":
                nn.init.normal_(self.embed.weight, mean=0.0, std=d**-0.5)
                self.embed.weight.mul_((9 * n_layers) ** -0.25)
            else:
                nn.init.xavier_uniform_(self.embed.weight)

    def encode(self, x: Tensor, positions: Tensor, newest: Tensor) -> Tensor:
        """``x [B, T, token_dim]`` normalised working memories -> ``[B, d_model]`` episodic memories."""
        h = self.embed(x) + positions[: x.shape[1]]
        *hidden, last = self.layers
        for layer in hidden:
            h = layer(h)
        return _norm(self.final_norm, last(h, newest))

    def encode_sequence(
        self, x: Tensor, position_embeddings: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Every position's episodic memory over ``x [B, L, token_dim]`` (normalised) in one causal pass.

        Args:
            x: the working memories.
            position_embeddings: ``[B, L, d_model]`` or ``[L, d_model]``, added to the embedded tokens.
            mask: ``[B, L, L]`` bool, which keys each query may read (``None``: causal).

        Returns:
            ``[B, L, d_model]`` and each layer's keys and values ``[B, H, L, dh]``.
        """
        h = self.embed(x) + position_embeddings
        kv = []
        for layer in self.layers:
            assert isinstance(layer, EncoderLayer)
            y, k, v = layer.attn.sequence(_norm(layer.norm1, h), mask)
            kv.append((k, v))
            h = h + y
            h = h + layer.linear2(F.relu(layer.linear1(_norm(layer.norm2, h))))
        return _norm(self.final_norm, h), kv

    def encode_step(self, x: Tensor, position_embeddings: Tensor, cache: KeyValueCache) -> Tensor:
        """One new working memory per context: ``x [B, token_dim]`` (normalised) at the positions whose
        embeddings are ``[B, d_model]``, attending over ``cache`` (which keeps its keys and values) ->
        ``[B, d_model]`` episodic memories. Layer by layer the same arithmetic as :meth:`encode_sequence`
        at the newest position."""
        b, d = x.shape[0], self.embed.out_features
        h = self.embed(x) + position_embeddings
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, EncoderLayer)
            attn = layer.attn
            heads = attn.n_heads
            q, k, v = attn.qkv(_norm(layer.norm1, h)).view(b, 3, heads, d // heads).unbind(1)
            h = h + attn.out_proj(cache.attend(i, q, k, v).reshape(b, d))
            h = h + layer.linear2(F.relu(layer.linear1(_norm(layer.norm2, h))))
        return _norm(self.final_norm, h)


def normalize_tokens(tokens: Tensor, obs_mean: Tensor, obs_std: Tensor) -> Tensor:
    """Apply observation statistics to the observation part of working memories ``[..., token_dim]``."""
    obs_dim = obs_mean.shape[0]
    obs = (tokens[..., :obs_dim] - obs_mean) / obs_std
    return torch.cat([obs, tokens[..., obs_dim:]], -1)


def mlp(sizes: list[int], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        linear = nn.Linear(fan_in, fan_out)
        last = i == len(sizes) - 2
        nn.init.xavier_uniform_(linear.weight, gain=out_gain if last else 1.0)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if not last:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class ValueHead(nn.Sequential):
    """The value MLP, scaled back by the value targets' running statistics when ``value_norm="popart"``.

    Its output is always the value in the return's units; with PopArt the MLP itself predicts
    ``(V - shift) / scale``. :meth:`renormalize` moves ``shift`` and ``scale`` to new statistics and
    rescales the last layer so that every output stays exactly what it was ("preserving outputs
    precisely"); the value loss divides the error by ``scale``, which makes it independent of the
    return's scale. Without PopArt ``shift`` and ``scale`` are 0 and 1 and not part of the state dict, so
    checkpoints written before the option existed load unchanged.
    """

    shift: Tensor
    scale: Tensor

    def __init__(self, sizes: list[int], normalized: bool) -> None:
        super().__init__(*mlp(sizes, out_gain=1.0))
        self.normalized = normalized
        self.register_buffer("shift", torch.zeros(()), persistent=normalized)
        self.register_buffer("scale", torch.ones(()), persistent=normalized)

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out * self.scale + self.shift if self.normalized else out

    @torch.no_grad()
    def renormalize(self, shift: Tensor, scale: Tensor) -> None:
        """Adopt new statistics, keeping every output unchanged."""
        last = self[-1]
        assert isinstance(last, nn.Linear)
        old_shift, old_scale = self.shift.clone(), self.scale.clone()
        last.weight.mul_(old_scale / scale)
        last.bias.mul_(old_scale).add_(old_shift - shift).div_(scale)
        self.shift.copy_(shift)
        self.scale.copy_(scale)


def memory_for_value(value_input: str, memory: Tensor) -> Tensor | None:
    """The value head's input when it reads the policy's memory: the memory itself (``memory``) or the
    memory cut off from the value loss's gradient (``memory_detached``); None for the other inputs."""
    if value_input == "memory":
        return memory
    if value_input == "memory_detached":
        return memory.detach()
    return None


def heads(config: ModelConfig, memory_width: int) -> tuple[nn.Sequential, nn.Parameter, ValueHead]:
    """The policy mean MLP, the state-independent log-std and the value head over a memory of
    ``memory_width`` (with ``value_input="observation"`` the value reads the newest working memory)."""
    c = config
    policy_mean = mlp([memory_width, *c.head_hidden, c.act_dim], out_gain=c.policy_out_gain)
    log_std = nn.Parameter(torch.full((c.act_dim,), math.log(c.init_std)))
    value_in = c.token_dim if c.value_input == "observation" else memory_width
    return policy_mean, log_std, ValueHead([value_in, *c.head_hidden, 1], c.value_norm == "popart")


class TrMRL(Encoder):
    """The TrMRL policy and value network.

    Example:
        >>> cfg = ModelConfig.from_preset("small", obs_dim=2, act_dim=2)
        >>> net = TrMRL(cfg)
        >>> windows = torch.zeros(3, cfg.window, cfg.token_dim)
        >>> net(windows, torch.zeros(3, dtype=torch.long)).mean.shape
        torch.Size([3, 2])
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, initialize=False)
        self.config = config
        c = config
        self.positions: Tensor
        self.obs_mean: Tensor
        self.obs_std: Tensor
        length = c.max_context if c.context == "trial" else c.window
        self.register_buffer("positions", sinusoidal_positions(length, c.d_model), persistent=False)
        self.policy_mean, self.log_std, self.value = heads(c, c.d_model)
        # Observation normalisation lives in the network so that every path applies the same statistics.
        self.register_buffer("obs_mean", torch.zeros(c.obs_dim))
        self.register_buffer("obs_std", torch.ones(c.obs_dim))
        # Initialised last, as before the value encoder existed: a seed gives the same weights as then.
        self.init_(c.init)
        self.value_encoder = Encoder(c) if c.value_input == "encoder" else None

    def t_fixup_init_(self) -> None:
        """T-Fixup initialisation as the authors' implementation applies it."""
        self.init_("t-fixup")

    def normalize(self, windows: Tensor) -> Tensor:
        """Apply the observation statistics to the observation part of every working memory."""
        return normalize_tokens(windows, self.obs_mean, self.obs_std)

    def forward(self, windows: Tensor, newest: Tensor) -> PolicyOutput:
        """Evaluate a batch of windows.

        Args:
            windows: ``[B, T, token_dim]`` left-aligned windows of working memories (``T <= N``).
            newest: ``[B]`` position of each window's newest memory.
        """
        x = self.normalize(windows)
        episodic = self.encode(x, self.positions, newest)
        value_in = memory_for_value(self.config.value_input, episodic)
        if value_in is None and self.value_encoder is not None:
            value_in = self.value_encoder.encode(x, self.positions, newest)
        elif value_in is None:
            value_in = x[torch.arange(x.shape[0], device=x.device), newest]
        return PolicyOutput(self.policy_mean(episodic), self.log_std, self.value(value_in).squeeze(-1))

    def _heads(self, x: Tensor, episodic: Tensor, value_memory: Tensor | None) -> PolicyOutput:
        value_in = memory_for_value(self.config.value_input, episodic)
        if value_in is None:
            value_in = x if value_memory is None else value_memory
        return PolicyOutput(self.policy_mean(episodic), self.log_std, self.value(value_in).squeeze(-1))

    def context_positions(self, starts: Tensor | None, length: int) -> tuple[Tensor, Tensor | None]:
        """Positions ``[B, L]`` (or ``[L]``) and the attention mask ``[B, L, L]`` (or ``None``: causal) of
        stored sequences that begin where their context does: with ``memory_scope="episode"`` each
        episode start (``starts [B, L]``) begins a new context -- positions count from it and no query
        reads an earlier episode."""
        if self.config.memory_scope == "trial" or starts is None:
            return torch.arange(length, device=self.positions.device), None
        index = torch.arange(length, device=starts.device).expand_as(starts)
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values
        same = first.unsqueeze(2) == first.unsqueeze(1)  # [B, query, key] in the same context
        causal = torch.ones(length, length, dtype=torch.bool, device=starts.device).tril()
        return index - first, same & causal

    def forward_step(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: KeyValueCache,
        value_cache: KeyValueCache | None = None,
    ) -> PolicyOutput:
        """A ``context="trial"`` policy's step: one new working memory per context (``tokens
        [B, token_dim]`` at ``positions [B]``) over the keys and values ``cache`` keeps (``value_cache``:
        the value encoder's, with ``value_input="encoder"``)."""
        x = self.normalize(tokens)
        embeddings = self.positions[positions]
        episodic = self.encode_step(x, embeddings, cache)
        value_memory = None
        if self.value_encoder is not None:
            if value_cache is None:
                raise ValueError("value_input=encoder needs the value encoder's cache")
            value_memory = self.value_encoder.encode_step(x, embeddings, value_cache)
        return self._heads(x, episodic, value_memory)

    def context_keys_values(self, tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every encoder layer's keys and values ``[B, H, L, dh]`` over contexts ``tokens [B, L,
        token_dim]`` (each beginning a trial; one causal pass): the policy encoder's layers, then the
        value encoder's. What a trial cache holds once a context's steps have been taken one by one."""
        x = self.normalize(tokens)
        embeddings = self.positions[: tokens.shape[1]]
        encoders = [self] if self.value_encoder is None else [self, self.value_encoder]
        return [pair for encoder in encoders for pair in encoder.encode_sequence(x, embeddings, None)[1]]

    def forward_sequence(
        self, tokens: Tensor, starts: Tensor | None = None, valid: Tensor | None = None
    ) -> PolicyOutput:
        """A ``context="trial"`` policy over whole stored sequences in one causal forward.

        Args:
            tokens: ``[B, L, token_dim]`` working memories, each sequence beginning a context (a trial).
            starts: ``[B, L]`` bool, steps that start an episode (with ``memory_scope="episode"`` they
                begin a new context).
            valid: ``[B, L]`` bool, the steps that hold working memories (all if omitted); steps after a
                sequence's end may hold anything: no valid step reads them.

        Returns:
            ``mean [B, L, act_dim]`` and ``value [B, L]`` of every step, what a step of the cached pool
            returns there.
        """
        length, limit = tokens.shape[1], self.config.max_context
        x = self.normalize(tokens)
        positions, mask = self.context_positions(starts, length)
        held = positions if valid is None else positions.expand_as(valid)[valid]
        if held.numel() and int(held.max()) >= limit:
            raise ValueError(f"a context of {int(held.max()) + 1} steps exceeds max_context={limit}")
        embeddings = self.positions[positions.clamp(max=limit - 1)]
        episodic, _ = self.encode_sequence(x, embeddings, mask)
        value_memory = None
        if self.value_encoder is not None:
            value_memory, _ = self.value_encoder.encode_sequence(x, embeddings, mask)
        return self._heads(x, episodic, value_memory)

    def value_parameters(self) -> list[nn.Parameter]:
        """What only the value function uses: its head and, with ``value_input="encoder"``, its encoder."""
        extra = list(self.value_encoder.parameters()) if self.value_encoder is not None else []
        return [*self.value.parameters(), *extra]

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The parameters that produce the shared episodic memory."""
        norm = list(self.final_norm.parameters()) if self.final_norm is not None else []
        return [*self.embed.parameters(), *self.layers.parameters(), *norm]


def log_prob(out: PolicyOutput, actions: Tensor) -> Tensor:
    """Log-density of ``actions`` ``[B, act_dim]`` under the diagonal Gaussian, summed over dims."""
    var = torch.exp(2 * out.log_std)
    return (-((actions - out.mean) ** 2) / (2 * var) - out.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def entropy(out: PolicyOutput) -> Tensor:
    """Entropy of the (state-independent) Gaussian, a scalar."""
    return (out.log_std + 0.5 * math.log(2 * math.pi * math.e)).sum()
