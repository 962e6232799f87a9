"""Model versions at runtime: loading a checkpoint safely, and remembering versions across restarts.

Checkpoints loaded through the admin routes come from one directory, ``TRMRL_CHECKPOINT_ROOT``: a
requested path is resolved (``..`` and symbolic links followed) *before* any file is opened, and
anything that ends up outside the root is refused. An uploaded archive is written to the state
directory (or a temporary one) and loaded from there.

The versions loaded at runtime, and which version of each model is active (or a canary), are written
to ``models.json`` in the state directory whenever they change, and loaded again on start, before the
saved sessions are restored: a restart brings back every version its sessions were on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.config import NAME, Settings, duplicate_names
from service.core import migration
from service.core.engine import Engine, EngineLimits
from service.core.errors import ServiceError
from service.core.registry import ModelRegistry
from trmrl.checkpoint import CheckpointError, load_checkpoint
from trmrl.device import resolve_device

log = logging.getLogger("trmrl.service")

MANIFEST = "models.json"
UPLOADS = "models"


def load_models(settings: Settings) -> ModelRegistry:
    """Load, place and warm up every checkpoint the settings name (blocking)."""
    checkpoints = settings.named_checkpoints()
    if not checkpoints:
        raise RuntimeError(
            f"no checkpoints to serve: none given (--checkpoint or TRMRL_MODELS) and none bundled "
            f"under {settings.checkpoints_dir}"
        )
    device = resolve_device(settings.device)
    limits = EngineLimits(
        max_sessions=settings.max_sessions,
        max_batch=settings.max_batch,
        batch_wait_s=settings.batch_wait_ms / 1000.0,
        session_ttl_s=settings.session_ttl_s,
        evict_idle_s=settings.evict_idle_s,
        max_queued_steps=settings.max_queued_steps,
        precision=settings.dtype,
        cuda_graphs=settings.cuda_graphs,
        cache_mib=settings.cache_mib,
    )
    clash = duplicate_names(checkpoints)
    if clash is not None:
        raise ValueError(clash)
    engines = []
    for name, path in checkpoints:
        checkpoint = load_checkpoint(path, device)
        engine = Engine(name, checkpoint, limits, device)
        engine.warmup()
        log.info(
            "model %s (version %s, %s) on %s: %d session slots, %d bytes each",
            engine.name,
            engine.version,
            checkpoint.info.task_family,
            device,
            settings.max_sessions,
            engine.bytes_per_session,
        )
        engines.append(engine)
    return ModelRegistry(engines, limits, device)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ServiceError(
            "invalid_value",
            "A model name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
            {"field": "name"},
        )
    return name


def resolve_under(root: Path, requested: str) -> Path:
    """``requested`` (relative to ``root``, or absolute) resolved, if it lies under ``root``.

    Raises 403 ``forbidden_path`` for anything outside (``..``, a symbolic link out, an absolute path
    elsewhere) and 404 ``unknown_checkpoint`` for nothing there. Only ``realpath`` and ``exists``
    look at the file system here: nothing is opened.
    """
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, requested))
    if os.path.commonpath([base, target]) != base or "\x00" in requested:
        raise ServiceError(
            "forbidden_path",
            "Checkpoints are loaded from the checkpoint root only.",
            {"checkpoint": requested},
        )
    if not os.path.exists(target):
        raise ServiceError("unknown_checkpoint", f"No checkpoint at {requested!r} under the checkpoint root.")
    return Path(target)


def load_engine(registry: ModelRegistry, name: str, path: Path) -> Engine:
    """Load, place and warm up one version (blocking: run it in a thread). 422 if it is no checkpoint."""
    try:
        checkpoint = load_checkpoint(path, registry.device)
        engine = Engine(name, checkpoint, registry.limits, registry.device)
    except (CheckpointError, OSError, ValueError) as exc:
        raise ServiceError(
            "invalid_checkpoint", f"The checkpoint cannot be loaded: {exc}", {"model": name}
        ) from None
    engine.warmup()
    return engine


def store_upload(state_dir: Path | None, body: bytes) -> Path:
    """Write an uploaded checkpoint archive where it outlives the request (and, with a state
    directory, the process)."""
    directory = (
        state_dir / UPLOADS if state_dir is not None else Path(tempfile.gettempdir()) / "trmrl-uploads"
    )
    directory.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="upload-", suffix=".tar.gz", dir=directory)
    with os.fdopen(handle, "wb") as out:
        out.write(body)
    return Path(name)


def manifest(registry: ModelRegistry) -> dict[str, Any]:
    """What ``models.json`` holds: runtime-loaded versions, and each model's active version and canary."""
    return {
        "format": "trmrl.models/1",
        "loaded": [
            {"name": name, "version": version, "checkpoint": str(path)}
            for (name, version), path in registry.sources.items()
        ],
        "active": {name: engine.version for name, engine in registry.engines.items()},
        "canary": {name: {"version": v, "share": share} for name, (v, share) in registry.canary.items()},
    }


def write_manifest(registry: ModelRegistry, state_dir: Path | None) -> None:
    if state_dir is None:
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    target = state_dir / MANIFEST
    scratch = target.with_suffix(".tmp")
    scratch.write_text(json.dumps(manifest(registry), indent=2))
    os.replace(scratch, target)


def read_manifest(state_dir: Path | None) -> dict[str, Any] | None:
    if state_dir is None or not (state_dir / MANIFEST).is_file():
        return None
    try:
        data = json.loads((state_dir / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s not read: %s", state_dir / MANIFEST, exc)
        return None
    return data if isinstance(data, dict) and data.get("format") == "trmrl.models/1" else None


def restore_versions(registry: ModelRegistry, saved: dict[str, Any]) -> list[Engine]:
    """Load the versions a manifest lists that are not loaded yet (blocking); returns them, unstarted.

    A version whose checkpoint is gone or changed is skipped with a warning: its sessions are then
    not restored either.
    """
    added = []
    for entry in saved.get("loaded", []):
        name, version, path = entry.get("name"), entry.get("version"), entry.get("checkpoint")
        if not (isinstance(name, str) and isinstance(version, str) and isinstance(path, str)):
            continue
        if version in registry.versions.get(name, {}):
            continue
        try:
            engine = load_engine(registry, name, Path(path))
        except ServiceError as exc:
            log.warning("model %s version %s not restored: %s", name, version, exc.message)
            continue
        if engine.version != version:
            log.warning(
                "model %s: %s now holds version %s, not %s; skipped", name, path, engine.version, version
            )
            continue
        registry.add_version(engine, Path(path))
        added.append(engine)
    return added


def apply_activation(registry: ModelRegistry, saved: dict[str, Any]) -> None:
    """Make the manifest's active versions and canaries current again (versions not loaded are skipped)."""
    for name, version in (saved.get("active") or {}).items():
        engine = registry.versions.get(name, {}).get(version)
        if engine is not None:
            registry.engines[name] = engine
    for name, canary in (saved.get("canary") or {}).items():
        if isinstance(canary, dict) and canary.get("version") in registry.versions.get(name, {}):
            registry.canary[name] = (str(canary["version"]), float(canary.get("share", 0.0)))


async def watch(
    registry: ModelRegistry,
    directory: Path,
    interval_s: float,
    on_loaded: Callable[[Engine], None],
    on_change: Callable[[], None],
) -> None:
    """Serve what appears in ``directory``: each sub-directory holding a checkpoint is model
    ``<its name>``; a new one is loaded, and a changed one is loaded as a new version and activated
    with its sessions migrated (without migration when the sizes differ). A checkpoint caught half
    written fails its hash check and is tried again at the next look.
    """
    seen: dict[str, int] = {}
    while True:
        try:
            entries = sorted(p for p in directory.iterdir() if (p / "config.json").is_file())
        except OSError as exc:
            log.warning("watched directory %s not readable: %s", directory, exc)
            entries = []
        for path in entries:
            name = path.name
            stamp = (path / "config.json").stat().st_mtime_ns
            if seen.get(name) == stamp or not NAME.fullmatch(name):
                continue
            try:
                engine = await asyncio.to_thread(load_engine, registry, name, path)
            except ServiceError as exc:
                log.info("watched checkpoint %s not loaded yet: %s", path, exc.message)
                continue
            seen[name] = stamp
            if engine.version in registry.versions.get(name, {}):
                continue
            first = name not in registry.versions
            registry.add_version(engine, path)
            on_loaded(engine)
            await engine.start()
            if not first:
                old = registry.engines[name]
                migrate = migration.compatible(engine, old)
                moved = await migration.activate(registry, name, engine.version, migrate=migrate)
                log.info(
                    "watched model %s: version %s active (%d sessions migrated)", name, engine.version, moved
                )
            else:
                log.info("watched model %s: version %s loaded", name, engine.version)
            on_change()
        await asyncio.sleep(interval_s)
