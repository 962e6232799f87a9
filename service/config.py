"""Service settings: one ``Settings`` object, read from ``TRMRL_*`` environment variables.

Lists (``TRMRL_MODELS``, ``TRMRL_API_KEYS``) are comma-separated, as an operator writes them in a
compose file, rather than JSON.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Where the repository's bundled checkpoints live (one directory per model, named after it).
BUNDLED_CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


#: A model name: what ``name=path`` gives a checkpoint, and what a request's ``model`` names.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def model_name(path: Path) -> str:
    """A checkpoint's default model name: its directory's (or archive's) name."""
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        name = name.removesuffix(suffix)
    return name


def named(entry: Path) -> tuple[str, Path]:
    """A ``--checkpoint`` / ``TRMRL_MODELS`` entry as ``(model name, path)``: ``name=path`` names the
    model; a bare path serves it under :func:`model_name`."""
    name, sep, rest = str(entry).partition("=")
    if sep and rest and NAME.fullmatch(name):
        return name, Path(rest)
    return model_name(entry), entry


def duplicate_names(checkpoints: list[tuple[str, Path]]) -> str | None:
    """A one-line refusal when two checkpoints would serve under one model name, else ``None``."""
    seen: dict[str, Path] = {}
    for name, path in checkpoints:
        if name in seen:
            return (
                f"two checkpoints are both named {name!r} ({seen[name]} and {path}); name them apart "
                f"with name=path, e.g. --checkpoint {name}-a={seen[name]} --checkpoint {name}-b={path}"
            )
        seen[name] = path
    return None


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything an operator can tune; each field maps to ``TRMRL_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="TRMRL_", extra="ignore")

    models: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Checkpoint directories or archives to serve, each ``name=path`` or a path (served under its
    directory's name); empty: every checkpoint under ``checkpoints_dir``."""
    checkpoints_dir: Path = BUNDLED_CHECKPOINTS
    """Directory of bundled checkpoints (each a sub-directory with ``config.json``)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """``auto`` picks CUDA when available."""
    max_sessions: int = Field(default=65_536, ge=1)
    """Sessions resident per loaded model: the size of its slot pool."""
    session_ttl_s: float = Field(default=3600.0, gt=0)
    """Default idle time after which a session expires (a session may ask for its own)."""
    evict_idle_s: float = Field(default=60.0, ge=0)
    """At capacity, a session idle at least this long may be evicted (least recently used first)."""
    max_batch: int = Field(default=512, ge=1)
    """Most steps one forward pass evaluates; more waiting steps go to the next tick."""
    batch_wait_ms: float = Field(default=0.0, ge=0)
    """Extra time a tick may wait for its batch to fill. Steps that arrive while a forward runs are
    batched regardless, so 0 keeps a lone session's latency lowest."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision of the forward pass (autocast); session memory and actions stay float32."""
    cache_mib: float = Field(default=0.0, ge=0)
    """A trial-context model's key/value cache, MiB per loaded version, allocated once at start: its
    sessions share its blocks, and a step that needs a block when none is free gets 503
    ``cache_exhausted``, the session unchanged. 0: the cache grows on demand, bounded only by
    ``max_sessions`` full contexts. Ignored by window and RL² models."""
    cuda_graphs: bool = True
    """On CUDA, capture the batched step as CUDA graphs, one per batch-size bucket (powers of two up
    to ``max_batch``), and replay them."""
    torch_threads: int = Field(default=0, ge=0)
    """Intra-op threads for the forward pass; 0: half the CPU cores, leaving the rest to HTTP."""
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Accepted API keys (comma-separated)."""
    api_keys_file: Path | None = None
    """File with one API key per line."""
    state_dir: Path | None = None
    """Where sessions are written on shutdown and restored from on start."""
    snapshot_interval_s: float = Field(default=0.0, ge=0)
    """Also write every session to ``state_dir`` this often (crash recovery); 0: only on shutdown."""
    max_queued_steps: int = Field(default=16_384, ge=1)
    """Steps waiting for a forward pass, per model; beyond it a step gets 503 ``overloaded``."""
    drain_grace_s: float = Field(default=0.0, ge=0)
    """On SIGTERM, report not-ready this long before closing connections (for load balancers)."""
    ws_ping_interval_s: float = Field(default=20.0, gt=0)
    """WebSocket heartbeat: the server pings every stream this often..."""
    ws_ping_timeout_s: float = Field(default=20.0, gt=0)
    """...and closes it when no pong comes back within this time."""
    coalesce_writes: bool = True
    """Write each HTTP reply to the socket in one system call (headers and body together); false: as
    uvicorn writes them, headers and body apart."""
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object a line, with ``session_id`` and ``model`` fields where they apply."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65_535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    max_body_bytes: int = Field(default=1 << 20, ge=64)
    """Largest request body accepted; larger ones get 413 ``body_too_large``."""
    admin_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Keys of the admin routes (``/v1/admin/...``: load, activate, retire model versions); none: those
    routes answer 404 and do nothing."""
    viewer_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Keys that open the fleet page (``/ui``) and its feed (``/v1/fleet``) and nothing else; admin keys
    open them too."""
    checkpoint_root: Path | None = None
    """The only directory the admin routes load checkpoints from (default: ``checkpoints_dir``)."""
    max_upload_bytes: int = Field(default=256 << 20, ge=1024)
    """Largest checkpoint archive the admin routes accept as a request body."""
    watch_dir: Path | None = None
    """Serve what is published here: each sub-directory holding a checkpoint is a model of its name; a
    changed one becomes a new version, activated with its sessions migrated."""
    watch_interval_s: float = Field(default=5.0, gt=0)
    """How often ``watch_dir`` is looked at."""
    record_dir: Path | None = None
    """Where recorded sessions' steps are written (Parquet); none: recording is off."""
    record_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of new sessions recorded without asking (with ``record_dir``)."""
    record_buffer_rows: int = Field(default=262_144, ge=1)
    """Recorded steps buffered for the writer; beyond it steps are dropped (and counted), never waited for."""
    record_rotate_rows: int = Field(default=1_000_000, ge=1)
    """A recording file is closed after this many rows..."""
    record_rotate_s: float = Field(default=300.0, gt=0)
    """...or after this many seconds."""

    @field_validator("models", "api_keys", "admin_keys", "viewer_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    def load_api_keys(self) -> list[str]:
        """Every accepted key: ``api_keys`` and the non-blank lines of ``api_keys_file``."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            text = self.api_keys_file.read_text(encoding="utf-8")
            keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return keys

    def load_admin_keys(self) -> list[str]:
        return list(self.admin_keys)

    def load_viewer_keys(self) -> list[str]:
        return list(self.viewer_keys)

    def admin_root(self) -> Path:
        """The directory admin-loaded checkpoints must lie under."""
        return self.checkpoint_root or self.checkpoints_dir

    def forward_threads(self) -> int:
        """Torch intra-op threads for the forward pass: ``torch_threads``, or half the CPU cores."""
        return self.torch_threads or max(1, (os.cpu_count() or 2) // 2)

    def named_checkpoints(self) -> list[tuple[str, Path]]:
        """The checkpoints to load with their model names: those given (``name=path`` or a path),
        else every bundled one (sorted by name)."""
        if self.models:
            return [named(entry) for entry in self.models]
        root = self.checkpoints_dir
        if not root.is_dir():
            return []
        found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())
        return [(model_name(path), path) for path in found]

    def checkpoint_paths(self) -> list[Path]:
        """The paths of :meth:`named_checkpoints`."""
        return [path for _, path in self.named_checkpoints()]
