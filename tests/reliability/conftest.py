"""Fixtures of the reliability tests: the bundled point-nav checkpoint, keyed in-process apps.

Tests marked ``long`` (the full soak, fault and fuzz runs) are skipped unless ``TRMRL_LONG=1``
(``make reliability``); their short versions run with the rest of the suite.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest
from reliability_support import A, keyed_settings

from service.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "install httpx2 instead": the test client works with httpx
    from starlette.testclient import TestClient


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long: full-length reliability runs; only with TRMRL_LONG=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("TRMRL_LONG") == "1":
        return
    skip = pytest.mark.skip(reason="long reliability run: set TRMRL_LONG=1 (make reliability)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:
    """An in-process app (point-nav, keys ``key-a`` and ``key-b``, 4 KiB body limit), as key A."""
    app = create_app(keyed_settings(max_body_bytes=4096))
    with TestClient(app, headers=A) as client:
        yield client
