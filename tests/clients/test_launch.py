"""``trmrl_sim.launch``: the one way demos, tests and benchmarks run ``python -m service``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from client_support import BUNDLED, Service
from trmrl_sim.launch import ServiceStartError


def test_importing_launch_loads_no_torch() -> None:
    code = "import sys, trmrl_sim.launch; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_start_restart_and_stop_keep_one_port() -> None:
    with Service([BUNDLED / "point-nav"]) as service:
        assert httpx.get(f"{service.url}/readyz", timeout=5.0).status_code == 200
        port, first = service.port, service.pid
        service.restart()
        assert (service.port, service.url) == (port, f"http://127.0.0.1:{port}")
        assert service.pid != first
        assert httpx.get(f"{service.url}/readyz", timeout=5.0).status_code == 200
        service.stop()
        assert not service.running
        service.stop()  # stopping a stopped service is fine
    assert isinstance(service.output(), str)
    service.close()  # and so is closing twice


def test_a_bad_checkpoint_fails_with_the_services_own_error(tmp_path: Path) -> None:
    empty = tmp_path / "no-files"
    empty.mkdir()
    service = Service([empty])
    with pytest.raises(ServiceStartError) as info:
        service.start(timeout_s=60.0)
    service.close()
    error = info.value
    assert error.returncode not in (None, 0)
    assert "the service exited with status" in str(error)
    assert error.output.strip() and error.output.strip()[-200:] in str(error)
    assert f"{empty}: missing" in str(error)  # the service names the checkpoint it could not load
