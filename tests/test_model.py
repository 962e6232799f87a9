"""The TrMRL network: sizes, T-Fixup initialisation, no LayerNorm, causal windows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trmrl.model import ARCHITECTURES, EncoderLayer, ModelConfig, PolicyOutput, TrMRL, log_prob


def policy_parameters(net: TrMRL) -> int:
    """Parameters of the policy: embedding, encoder, mean head and log-std (the value head is separate)."""
    value = sum(p.numel() for p in net.value.parameters())
    return sum(p.numel() for p in net.parameters()) - value


def test_mujoco_preset_has_the_published_size() -> None:
    # HalfCheetah: 17-d observation, 6-d action.
    net = TrMRL(ModelConfig.from_preset("mujoco", obs_dim=17, act_dim=6))
    assert policy_parameters(net) == pytest.approx(0.81e6, rel=0.02)


def test_metaworld_preset_has_the_published_size() -> None:
    net = TrMRL(ModelConfig.from_preset("metaworld", obs_dim=39, act_dim=4))
    assert policy_parameters(net) == pytest.approx(58e3, rel=0.02)


@pytest.mark.parametrize("preset", sorted(ARCHITECTURES))
def test_no_layernorm_anywhere(preset: str) -> None:
    net = TrMRL(ModelConfig.from_preset(preset, obs_dim=5, act_dim=3))
    norms = (nn.LayerNorm, nn.BatchNorm1d, nn.GroupNorm, nn.RMSNorm)
    assert not [m for m in net.modules() if isinstance(m, norms)]
    assert not [n for n, _ in net.named_modules() if "norm" in n.lower()]


def test_embedding_has_no_bias() -> None:
    net = TrMRL(ModelConfig.from_preset("small", obs_dim=5, act_dim=3))
    assert net.embed.bias is None


def _xavier_std(weight: torch.Tensor) -> float:
    fan_out, fan_in = weight.shape
    return math.sqrt(2.0 / (fan_in + fan_out))


def test_t_fixup_scales() -> None:
    cfg = ModelConfig.from_preset("mujoco", obs_dim=17, act_dim=6)
    net = TrMRL(cfg)
    n_layers, d = cfg.n_layers, cfg.d_model
    scale = 0.67 * n_layers**-0.25
    for layer in net.layers:
        assert isinstance(layer, EncoderLayer)
        expected = {
            "qkv": (layer.attn.qkv.weight, scale * math.sqrt(2)),
            "out_proj": (layer.attn.out_proj.weight, scale),
            "linear1": (layer.linear1.weight, scale),
            "linear2": (layer.linear2.weight, scale),
        }
        for name, (weight, factor) in expected.items():
            # Xavier-uniform is bounded by sqrt(3) std: the bound pins the scale exactly.
            bound = math.sqrt(3) * _xavier_std(weight) * factor
            assert weight.abs().max().item() <= bound + 1e-7, name
            assert weight.abs().max().item() >= 0.98 * bound, name
            assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name
        for bias in (layer.attn.qkv.bias, layer.attn.out_proj.bias, layer.linear1.bias, layer.linear2.bias):
            assert torch.count_nonzero(bias) == 0
    emb_std = d**-0.5 * (9 * n_layers) ** -0.25
    assert net.embed.weight.std().item() == pytest.approx(emb_std, rel=0.05)
    assert net.embed.weight.mean().item() == pytest.approx(0.0, abs=emb_std * 0.05)


def test_policy_output_layer_is_small_and_log_std_is_initial_std() -> None:
    cfg = ModelConfig.from_preset("small", obs_dim=5, act_dim=3, init_std=0.2, policy_out_gain=0.01)
    net = TrMRL(cfg)
    out_layer = net.policy_mean[-1]
    assert isinstance(out_layer, nn.Linear)
    assert out_layer.weight.abs().max().item() <= math.sqrt(3) * 0.01 * _xavier_std(out_layer.weight) + 1e-9
    torch.testing.assert_close(net.log_std.exp(), torch.full((3,), 0.2))


def test_causal_padding_never_changes_the_newest_output() -> None:
    cfg = ModelConfig.from_preset("small", obs_dim=4, act_dim=2)
    net = TrMRL(cfg).eval()
    windows = torch.randn(6, cfg.window, cfg.token_dim)
    newest = torch.tensor([0, 1, 2, 3, 4, 2])
    out = net(windows, newest)
    noisy = windows.clone()
    for b, n in enumerate(newest.tolist()):
        noisy[b, n + 1 :] = torch.randn_like(noisy[b, n + 1 :]) * 100
    torch.testing.assert_close(net(noisy, newest).mean, out.mean, rtol=0, atol=1e-6)
    # The same rows evaluated on unpadded sequences of exactly their length.
    for b, n in enumerate(newest.tolist()):
        alone = net(windows[b : b + 1, : n + 1], torch.tensor([n]))
        torch.testing.assert_close(alone.mean[0], out.mean[b], rtol=0, atol=1e-5)
        torch.testing.assert_close(alone.value[0], out.value[b], rtol=0, atol=1e-5)


def test_newest_query_only_matches_full_causal_encoder() -> None:
    cfg = ModelConfig.from_preset("small", obs_dim=4, act_dim=2)
    net = TrMRL(cfg).eval()
    windows = torch.randn(5, cfg.window, cfg.token_dim)
    newest = torch.tensor([4, 0, 3, 1, 4])
    h = net.embed(net.normalize(windows)) + net.positions
    for layer in net.layers:
        h = layer(h)
    episodic = h[torch.arange(5), newest]
    torch.testing.assert_close(net(windows, newest).mean, net.policy_mean(episodic), rtol=0, atol=1e-5)


@pytest.mark.parametrize("value_input", ["memory", "observation"])
def test_value_head_input(value_input: str) -> None:
    cfg = ModelConfig.from_preset("small", obs_dim=4, act_dim=2, value_input=value_input)
    net = TrMRL(cfg).eval()
    windows = torch.randn(3, cfg.window, cfg.token_dim)
    newest = torch.full((3,), cfg.window - 1)
    changed = windows.clone()
    changed[:, 0] += 1.0  # an older memory: the episodic memory sees it, the current observation does not
    delta = (net(windows, newest).value - net(changed, newest).value).abs().max().item()
    if value_input == "observation":
        assert delta == 0.0
    else:
        assert delta > 1e-6


def test_observation_normalisation_applies_to_observation_part_only() -> None:
    cfg = ModelConfig.from_preset("small", obs_dim=3, act_dim=2)
    net = TrMRL(cfg)
    net.obs_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    net.obs_std.copy_(torch.tensor([2.0, 2.0, 2.0]))
    windows = torch.ones(1, cfg.window, cfg.token_dim)
    x = net.normalize(windows)
    torch.testing.assert_close(x[0, 0, :3], torch.tensor([0.0, -0.5, -1.0]))
    torch.testing.assert_close(x[0, 0, 3:], torch.ones(cfg.token_dim - 3))


def test_log_prob_matches_torch_normal() -> None:
    out = PolicyOutput(torch.randn(4, 3), torch.tensor([-0.5, 0.0, 0.3]), torch.zeros(4))
    actions = torch.randn(4, 3)
    ref = torch.distributions.Normal(out.mean, out.log_std.exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(log_prob(out, actions), ref)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"n_heads": 3}, "not divisible"),
        ({"window": 0}, "window must be >= 1"),
        ({"memory_scope": "forever"}, "memory_scope"),
        ({"init_std": 0.0}, "init_std"),
    ],
)
def test_invalid_config_is_refused_with_a_reason(override: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_preset("small", obs_dim=3, act_dim=2, **override)  # type: ignore[arg-type]


def test_config_round_trips_and_rejects_unknown_keys() -> None:
    cfg = ModelConfig.from_preset("mujoco", obs_dim=17, act_dim=6, memory_scope="trial")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": "blue"})
