"""Structured logs: session lifecycle lines carry ``session_id`` (and ``model``) as fields.

``TRMRL_LOG_FORMAT=json`` writes one JSON object a line (for a log pipeline); ``text`` appends the
fields as ``key=value`` to a readable line.
"""

from __future__ import annotations

import json
import logging

#: Fields a log call may attach with ``extra={...}``.
FIELDS = ("session_id", "model", "sessions", "path")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{name}={getattr(record, name)}" for name in FIELDS if hasattr(record, name)]
        return f"{line} {' '.join(fields)}" if fields else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({name: getattr(record, name) for name in FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, fmt: str) -> None:
    """Send every log record to stderr in the chosen format."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
