"""Shared by the reliability tests: the bundled point-nav checkpoint, API keys, keyed settings."""

from __future__ import annotations

from pathlib import Path

from service.config import Settings

REPO = Path(__file__).resolve().parents[2]
POINT_NAV = REPO / "checkpoints" / "point-nav"
KEYS = ("key-a", "key-b")
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def keyed_settings(**overrides: object) -> Settings:
    return Settings(models=[POINT_NAV], api_keys=list(KEYS), device="cpu", **overrides)  # type: ignore[arg-type]
