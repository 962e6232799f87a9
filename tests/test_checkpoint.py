"""Checkpoints: round trip, atomic replacement, and a clear error for every kind of damage."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trmrl.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointInfo,
    content_hash,
    load_checkpoint,
    save_checkpoint,
)
from trmrl.model import ModelConfig, TrMRL


@pytest.fixture
def model() -> TrMRL:
    net = TrMRL(ModelConfig.from_preset("small", obs_dim=3, act_dim=2, memory_scope="trial"))
    net.obs_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    net.obs_std.copy_(torch.tensor([1.5, 0.5, 3.0]))
    return net


INFO = CheckpointInfo(
    task_family="point-nav",
    action_low=(-0.1, -0.1),
    action_high=(0.1, 0.1),
    step=1234,
    metrics={"test/return": -12.5},
    training={"preset": "small-point-nav", "seed": 3},
)


@pytest.fixture
def saved(tmp_path: Path, model: TrMRL) -> Path:
    save_checkpoint(tmp_path / "ckpt", model, INFO)
    return tmp_path / "ckpt"


def test_round_trip_keeps_weights_stats_and_facts(saved: Path, model: TrMRL) -> None:
    ckpt = load_checkpoint(saved)
    assert ckpt.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), ckpt.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert ckpt.info.task_family == "point-nav"
    assert ckpt.info.step == 1234
    assert ckpt.info.metrics == {"test/return": -12.5}
    assert ckpt.info.action_low == (-0.1, -0.1)
    assert ckpt.config.memory_scope == "trial"
    assert ckpt.info.content_hash.startswith("sha256:")
    assert len(ckpt.info.version) == 12
    assert not ckpt.model.training
    windows = torch.randn(4, 5, model.config.token_dim)
    newest = torch.tensor([0, 1, 4, 2])
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(windows, newest).mean, model.eval()(windows, newest).mean)


def test_config_json_is_readable(saved: Path) -> None:
    config = json.loads((saved / CONFIG_FILE).read_text())
    assert config["schema_version"] == 1
    assert config["model"]["memory_scope"] == "trial"
    assert config["model"]["obs_dim"] == 3
    assert config["obs_normalization"]["mean"] == [0.5, -1.0, 2.0]
    assert config["created_at"]


def test_save_replaces_an_existing_checkpoint_atomically(saved: Path, model: TrMRL) -> None:
    first = load_checkpoint(saved).info.content_hash
    with torch.no_grad():
        model.log_std.add_(0.1)
    second = save_checkpoint(saved, model, INFO)
    assert second.content_hash != first
    assert load_checkpoint(saved).info.content_hash == second.content_hash
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]  # no staging leftovers


def pack_archive(directory: Path) -> bytes:
    """Pack a checkpoint directory into ``.tar.gz`` bytes, as one is shipped as a single file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            archive.add(directory / name, arcname=name)
    return buffer.getvalue()


def test_archive_loads_like_the_directory(saved: Path, tmp_path: Path) -> None:
    archive = tmp_path / "ckpt.tar.gz"
    archive.write_bytes(pack_archive(saved))
    assert load_checkpoint(archive).info.content_hash == load_checkpoint(saved).info.content_hash


def test_truncated_weights(saved: Path) -> None:
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_checkpoint(saved)


def test_truncated_weights_with_a_matching_hash_is_still_caught(saved: Path) -> None:
    # Someone "fixes" the hash after truncating: the safetensors parser must still refuse the file.
    data = (saved / WEIGHTS_FILE).read_bytes()[:100]
    (saved / WEIGHTS_FILE).write_bytes(data)
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["content_hash"] = content_hash(data, config)
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(saved)


def test_corrupted_weights(saved: Path) -> None:
    data = bytearray((saved / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (saved / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_checkpoint(saved)


def test_edited_config(saved: Path) -> None:
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["action_high"] = [1.0, 1.0]
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_checkpoint(saved)


def test_truncated_config(saved: Path) -> None:
    text = (saved / CONFIG_FILE).read_text()
    (saved / CONFIG_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(saved)


def _rewrite_config(saved: Path, **changes: object) -> None:
    """Edit config.json and re-sign it, as a foreign or older tool would have written it."""
    config = json.loads((saved / CONFIG_FILE).read_text())
    config.update(changes)
    config["content_hash"] = content_hash((saved / WEIGHTS_FILE).read_bytes(), config)
    (saved / CONFIG_FILE).write_text(json.dumps(config))


def test_wrong_schema_version(saved: Path) -> None:
    _rewrite_config(saved, schema_version=99)
    with pytest.raises(CheckpointError, match="unsupported schema_version 99"):
        load_checkpoint(saved)


def test_not_a_trmrl_config(saved: Path) -> None:
    (saved / CONFIG_FILE).write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match="not a trmrl checkpoint config"):
        load_checkpoint(saved)


def test_wrong_shape(saved: Path) -> None:
    config = json.loads((saved / CONFIG_FILE).read_text())
    _rewrite_config(saved, model={**config["model"], "d_ff": 256})
    with pytest.raises(
        CheckpointError, match=r"tensor shapes do not match the architecture: layers\.0\.linear1"
    ):
        load_checkpoint(saved)


def test_missing_tensor(saved: Path, model: TrMRL) -> None:
    state = {k: v for k, v in model.state_dict().items() if k not in ("log_std", "obs_mean", "obs_std")}
    save_file(state, str(saved / WEIGHTS_FILE))
    _rewrite_config(saved)
    with pytest.raises(CheckpointError, match=r"missing: \['log_std'\]"):
        load_checkpoint(saved)


def test_invalid_architecture(saved: Path) -> None:
    config = json.loads((saved / CONFIG_FILE).read_text())
    _rewrite_config(saved, model={**config["model"], "n_heads": 3})
    with pytest.raises(CheckpointError, match=r"invalid architecture.*not divisible"):
        load_checkpoint(saved)


def test_bad_normalisation_stats(saved: Path) -> None:
    _rewrite_config(saved, obs_normalization={"mean": [0.0, 0.0, 0.0], "std": [1.0, 0.0, 1.0]})
    with pytest.raises(CheckpointError, match="positive stds"):
        load_checkpoint(saved)


def test_missing_file(saved: Path) -> None:
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors"):
        load_checkpoint(saved)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


def test_archive_without_weights(saved: Path, tmp_path: Path) -> None:
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(saved / CONFIG_FILE, arcname=CONFIG_FILE)
    with pytest.raises(CheckpointError, match=r"archive lacks model\.safetensors"):
        load_checkpoint(archive)


def test_bounds_must_match_the_action_width(tmp_path: Path, model: TrMRL) -> None:
    with pytest.raises(CheckpointError, match="2 entries"):
        save_checkpoint(tmp_path / "x", model, CheckpointInfo("point-nav", (-1.0,), (1.0,)))
    assert not (tmp_path / "x").exists()
