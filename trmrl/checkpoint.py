"""Checkpoints: ``model.safetensors`` plus ``config.json``, written atomically, validated on load.

A checkpoint is a directory (or a ``.tar``/``.tar.gz`` archive of one) with two files:

* ``model.safetensors`` -- the network's parameters (no pickle anywhere);
* ``config.json`` -- schema version, architecture, task family, dimensions and action bounds,
  observation normalisation statistics, memory scope, training step, evaluation metrics, creation time
  and a content hash over both.

Loading checks every one of these and raises :class:`CheckpointError` naming the problem, so a
truncated, corrupted, foreign or mismatched checkpoint never reaches a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from trmrl.model import ModelConfig
from trmrl.networks import Network, build_model

if TYPE_CHECKING:
    from trmrl.tasks import TaskFamily

SCHEMA_VERSION = 1
FORMAT = "trmrl-checkpoint"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Normalisation statistics travel in config.json, where a reader can see them.
_STATS = ("obs_mean", "obs_std")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and where."""


@dataclass(frozen=True)
class CheckpointInfo:
    """Everything in ``config.json`` besides the architecture."""

    task_family: str
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    """Free-form training facts: preset, seed, reference kind (``trmrl``, ``oracle``, ``memoryless``)."""
    task_params_in_obs: bool = False
    """True for an oracle policy: the task's parameters are appended to each observation."""
    created_at: str = ""
    content_hash: str = ""

    @property
    def version(self) -> str:
        """Short content hash, the model version the service reports."""
        return self.content_hash.removeprefix("sha256:")[:12]

    @property
    def family_source(self) -> str:
        """Where the training run found its task family: the ``module:attribute`` it was given (a user's
        own family, not installed), else the family's name."""
        given = self.training.get("family")
        return given if isinstance(given, str) and ":" in given else self.task_family


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the network, ready to run, and its facts."""

    model: Network
    info: CheckpointInfo
    path: Path

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def checkpoint_family(info: CheckpointInfo) -> TaskFamily:
    """The task family a checkpoint was trained on: by its recorded name (built in, registered or
    installed), else -- a family the training run loaded as ``module:attribute`` -- from that module.

    Raises:
        TaskFamilyError: the family cannot be found or loaded, or its module now gives another family;
            the message is one line and says which.
    """
    from trmrl.tasks import TaskFamilyError, family_names, get_family

    name, source = info.task_family, info.family_source
    if source == name or name in family_names():
        return get_family(name)
    try:
        family = get_family(source)
    except TaskFamilyError as exc:
        raise TaskFamilyError(
            f"task family {name!r} was trained from {source!r}, which does not load here ({exc}); "
            "put its module on PYTHONPATH or install it"
        ) from exc
    if family.name != name:
        raise TaskFamilyError(
            f"{source!r} now gives a family named {family.name!r}, the checkpoint's is {name!r}"
        )
    return family


def content_hash(weights: bytes, config: dict[str, Any]) -> str:
    body = {k: v for k, v in config.items() if k != "content_hash"}
    digest = hashlib.sha256(weights)
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + digest.hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    path: str | Path, model: Network, info: CheckpointInfo, *, extra_files: dict[str, bytes] | None = None
) -> CheckpointInfo:
    """Write ``model`` and ``info`` to the directory ``path``, atomically.

    ``extra_files`` (e.g. a trainer's resumable state) are written into the same directory in the same
    atomic replacement; they are not part of the content hash.

    The files are written to a temporary sibling directory which then replaces ``path``; a reader
    sees the old checkpoint or the new one, never a mixture. Returns ``info`` with its creation time
    and content hash filled in.

    Example:
        >>> cfg = ModelConfig.from_preset("small", obs_dim=2, act_dim=2)
        >>> info = CheckpointInfo("point-nav", (-0.1, -0.1), (0.1, 0.1))
        >>> saved = save_checkpoint("/tmp/ckpt-doc", build_model(cfg), info)
        >>> load_checkpoint("/tmp/ckpt-doc").info.version == saved.version
        True
    """
    cfg = model.config
    for name in extra_files or {}:
        if name in (WEIGHTS_FILE, CONFIG_FILE) or Path(name).name != name:
            raise CheckpointError(f"extra file name {name!r} is not allowed")
    if len(info.action_low) != cfg.act_dim or len(info.action_high) != cfg.act_dim:
        raise CheckpointError(f"action bounds must have {cfg.act_dim} entries (the model's act_dim)")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in _STATS}
    weights = save_safetensors(state)
    created = info.created_at or datetime.now(UTC).isoformat(timespec="seconds")
    config: dict[str, Any] = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": cfg.to_dict(),
        "task_family": info.task_family,
        "action_low": [float(x) for x in info.action_low],
        "action_high": [float(x) for x in info.action_high],
        "task_params_in_obs": info.task_params_in_obs,
        "obs_normalization": {
            "mean": model.obs_mean.detach().cpu().tolist(),
            "std": model.obs_std.detach().cpu().tolist(),
        },
        "step": int(info.step),
        "metrics": info.metrics,
        "training": info.training,
        "created_at": created,
    }
    config["content_hash"] = content_hash(weights, config)

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    _write_file(staging / WEIGHTS_FILE, weights)
    _write_file(staging / CONFIG_FILE, json.dumps(config, indent=2).encode())
    for name, data in (extra_files or {}).items():
        _write_file(staging / name, data)
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)
    return CheckpointInfo(
        task_family=info.task_family,
        action_low=tuple(config["action_low"]),
        action_high=tuple(config["action_high"]),
        step=info.step,
        metrics=info.metrics,
        training=info.training,
        task_params_in_obs=info.task_params_in_obs,
        created_at=created,
        content_hash=config["content_hash"],
    )


def _read_files(path: Path) -> tuple[bytes, bytes]:
    if path.is_dir():
        missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE) if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: missing {', '.join(missing)}")
        return (path / WEIGHTS_FILE).read_bytes(), (path / CONFIG_FILE).read_bytes()
    if path.is_file() and path.name.endswith((".tar", ".tar.gz", ".tgz")):
        return _read_archive(path)
    raise CheckpointError(f"{path}: not a checkpoint directory or .tar/.tar.gz archive")


def _read_archive(path: Path) -> tuple[bytes, bytes]:
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                name = Path(member.name).name
                if name in (WEIGHTS_FILE, CONFIG_FILE) and member.isfile():
                    extracted = archive.extractfile(member)
                    if extracted is not None:
                        found[name] = extracted.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable archive ({exc})") from exc
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE) if n not in found]
    if missing:
        raise CheckpointError(f"{path}: archive lacks {', '.join(missing)}")
    return found[WEIGHTS_FILE], found[CONFIG_FILE]


def _require(config: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in config:
        raise CheckpointError(f"{where}: config.json lacks '{key}'")
    value = config[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise CheckpointError(f"{where}: config.json '{key}' has the wrong type ({type(value).__name__})")
    return value


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Load and validate a checkpoint directory or archive.

    Raises:
        CheckpointError: missing or truncated files, a corrupted or hash-mismatched body, an unknown
            schema version, an invalid architecture, or tensors whose shapes do not fit it.
    """
    where = Path(path)
    weights, raw_config = _read_files(where)
    try:
        config = json.loads(raw_config)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{where}: config.json is not a trmrl checkpoint config")
    schema = config.get("schema_version")
    if schema != SCHEMA_VERSION:
        raise CheckpointError(
            f"{where}: unsupported schema_version {schema!r} (this trmrl reads version {SCHEMA_VERSION})"
        )
    expected_hash = _require(config, "content_hash", str, where)
    actual_hash = content_hash(weights, config)
    if actual_hash != expected_hash:
        raise CheckpointError(
            f"{where}: content hash mismatch -- the files are corrupted or were edited "
            f"(config says {expected_hash[:19]}..., contents give {actual_hash[:19]}...)"
        )
    try:
        model_config = ModelConfig.from_dict(_require(config, "model", dict, where))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid architecture in config.json: {exc}") from exc
    act_dim = model_config.act_dim
    low = [float(x) for x in _require(config, "action_low", list, where)]
    high = [float(x) for x in _require(config, "action_high", list, where)]
    if len(low) != act_dim or len(high) != act_dim or any(lo > hi for lo, hi in zip(low, high, strict=True)):
        raise CheckpointError(f"{where}: action bounds do not describe {act_dim} intervals")
    norm = _require(config, "obs_normalization", dict, where)

    try:
        state = load_safetensors(weights)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: model.safetensors is truncated or corrupted ({exc})") from exc
    model = build_model(model_config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in _STATS}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: tensors do not match the architecture (missing: {missing or 'none'}; "
            f"unexpected: {unexpected or 'none'})"
        )
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items() if state[k].shape != s]
    if wrong:
        raise CheckpointError(f"{where}: tensor shapes do not match the architecture: {'; '.join(wrong)}")
    try:
        mean = torch.tensor(norm["mean"], dtype=torch.float32)
        std = torch.tensor(norm["std"], dtype=torch.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid obs_normalization ({exc})") from exc
    if (
        mean.shape != (model_config.obs_dim,)
        or std.shape != (model_config.obs_dim,)
        or not bool((std > 0).all())
    ):
        raise CheckpointError(
            f"{where}: obs_normalization must hold {model_config.obs_dim} means and positive stds"
        )
    model.load_state_dict({**state, "obs_mean": mean, "obs_std": std})
    model.to(device).eval()
    info = CheckpointInfo(
        task_family=_require(config, "task_family", str, where),
        action_low=tuple(low),
        action_high=tuple(high),
        step=_require(config, "step", int, where),
        metrics=_require(config, "metrics", dict, where),
        training=_require(config, "training", dict, where),
        task_params_in_obs=bool(config.get("task_params_in_obs", False)),
        created_at=_require(config, "created_at", str, where),
        content_hash=expected_hash,
    )
    return Checkpoint(model, info, where)
