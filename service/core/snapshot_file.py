"""Sessions on disk: what the service writes to ``TRMRL_STATE_DIR`` on shutdown and reads on start.

One file, ``sessions.msgpack``, holds every session, one block per model, column by column: ids, the
owner tag of each session's API key (a digest, never the key) and the arrays of
:func:`service.core.snapshots.export_sessions` as msgpack-numpy maps -- the same facts as the portable
snapshot of ``GET /v1/sessions/{id}/state``, but cheap to gather and to encode for a million
sessions. It is written atomically (a temporary file, flushed to disk, renamed over the old one), so
a crash mid-write leaves the previous file intact. Session ids never become file names.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from trmrl_client.codec import CodecError, packb, unpackb

log = logging.getLogger("trmrl.service")

FILE_NAME = "sessions.msgpack"
FORMAT = "trmrl.sessions/1"


def write_sessions(directory: Path, blocks: list[dict[str, Any]]) -> Path:
    """Write every model's block of sessions atomically; returns the file written."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = packb({"format": FORMAT, "saved_at": time.time(), "models": blocks})
    target = directory / FILE_NAME
    fd, tmp = tempfile.mkstemp(prefix=".sessions-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_sessions(directory: Path) -> list[dict[str, Any]]:
    """The blocks saved in ``directory`` (none if there is no file, or it cannot be read)."""
    path = directory / FILE_NAME
    if not path.is_file():
        return []
    try:
        data: Any = unpackb(path.read_bytes(), max_bytes=1 << 40)
    except CodecError as exc:
        log.error("cannot read saved sessions from %s: %s", path, exc)
        return []
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("models"), list):
        log.error("%s is not a %s file; no session restored", path, FORMAT)
        return []
    return [block for block in data["models"] if isinstance(block, dict)]


def count_sessions(blocks: list[dict[str, Any]]) -> int:
    return sum(len(block.get("session_ids", ())) for block in blocks)
