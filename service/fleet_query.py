"""The fleet feed's filter: ``model``, ``version`` (a prefix of 4 or more hex digits) and ``limit``,
validated before any work; bad input raises :class:`~service.core.errors.ServiceError`."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.core import errors
from service.core.errors import ServiceError

if TYPE_CHECKING:
    from service.core.registry import ModelRegistry

#: Most sessions the feed lists; the default.
MAX_SESSIONS_LISTED = 500
DEFAULT_SESSIONS_LISTED = 25
#: Characters of a session id the feed shows (an id is a capability when keys are off).
ID_PREFIX = 8

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"[0-9a-f]{4,64}")
_QUERY_KEYS = ("model", "version", "limit")


@dataclass(frozen=True)
class FleetQuery:
    """The feed's filter of its session list (validated by :func:`parse_query`)."""

    model: str | None = None
    version: str | None = None
    """A full version, resolved from a unique prefix."""
    limit: int = DEFAULT_SESSIONS_LISTED


def invalid_filter(field_name: str, reason: str, value: str | None = None) -> ServiceError:
    detail: dict[str, Any] = {"field": field_name}
    if value is not None:
        detail["value"] = value[:200]
    return ServiceError("invalid_filter", f"The fleet filter is not valid: {reason}.", detail)


def parse_query(items: Iterable[tuple[str, str]], registry: ModelRegistry) -> FleetQuery:
    """Validate the feed's query parameters: ``model`` (a loaded model's name), ``version`` (a loaded
    version, or a unique prefix of at least 4 hex digits), ``limit`` (1..500).

    A malformed or repeated parameter, or one the feed does not take: 422 ``invalid_filter``; a model
    or version that is not loaded: 404 ``unknown_model`` / ``unknown_version``.
    """
    given: dict[str, str] = {}
    for key, value in items:
        if key not in _QUERY_KEYS:
            raise invalid_filter(
                key, f"the feed takes no parameter {key[:40]!r} (it takes {', '.join(_QUERY_KEYS)})"
            )
        if key in given:
            raise invalid_filter(key, f"{key!r} is given more than once")
        given[key] = value
    model = given.get("model")
    if model is not None:
        if not _MODEL_NAME.fullmatch(model):
            raise invalid_filter("model", "a model name is 1-128 letters, digits, '.', '_' or '-'", model)
        if model not in registry.versions:
            raise errors.unknown_model(model, list(registry.versions))
    version = given.get("version")
    if version is not None:
        if not _VERSION.fullmatch(version):
            raise invalid_filter(
                "version", "a version is 4 to 64 lowercase hex digits (or a prefix of one)", version
            )
        names = [model] if model is not None else list(registry.versions)
        found = sorted(
            {v for name in names for v in registry.versions.get(name, {}) if v.startswith(version)}
        )
        if not found:
            loaded = sorted({v for name in names for v in registry.versions.get(name, {})})
            raise ServiceError(
                "unknown_version",
                f"No loaded version{' of ' + repr(model) if model else ''} starts with {version!r}.",
                {"model": model, "version": version, "loaded": loaded},
            )
        if len(found) > 1:
            raise invalid_filter("version", f"{version!r} is the prefix of {len(found)} versions", version)
        version = found[0]
    limit = DEFAULT_SESSIONS_LISTED
    if "limit" in given:
        raw = given["limit"]
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_SESSIONS_LISTED:
            raise invalid_filter("limit", f"'limit' is a whole number from 1 to {MAX_SESSIONS_LISTED}", raw)
        limit = int(raw)
    return FleetQuery(model=model, version=version, limit=limit)
