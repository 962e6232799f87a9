"""The Python snippet and the curl line of docs/clients.md work against a real service."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from client_support import REPO, Service

DOC = REPO / "docs" / "clients.md"
DEFAULT_URL = "http://127.0.0.1:8000"
#: What the client distribution needs at run time (numpy, httpx and httpx's own dependencies).
CLIENT_RUNTIME = (
    "numpy",
    "numpy.libs",
    "httpx",
    "httpcore",
    "h11",
    "anyio",
    "idna",
    "certifi",
    "typing_extensions.py",
)


def snippet(service: Service) -> str:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert code is not None
    lines = code.group(1).strip().splitlines()
    assert len(lines) <= 11  # "a ten-line snippet" (plus the blank line after the imports)
    return code.group(1).replace(DEFAULT_URL, service.url)


def test_the_python_snippet_runs_without_torch(service: Service) -> None:
    code = snippet(service) + "\nimport sys\nassert 'torch' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("100 steps, last action")


def test_the_curl_line_acts(service: Service) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    line = next(line for line in DOC.read_text().splitlines() if line.startswith("curl "))
    done = subprocess.run(
        shlex.split(line.replace(DEFAULT_URL, service.url)), capture_output=True, text=True, timeout=30
    )
    reply = json.loads(done.stdout)
    assert reply["step"] == 0 and len(reply["action"]) == 2 and reply["session_id"]


@pytest.mark.slow
def test_the_client_installs_into_an_empty_venv_and_runs_the_snippet(
    service: Service, tmp_path: Path
) -> None:
    """A fresh virtual environment (offline: pip's bundled setuptools builds ./clients; numpy and
    httpx are linked from this environment instead of downloaded), with no torch in it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p, "numpy").exists()))
    for name in CLIENT_RUNTIME:
        (runtime / name).symlink_to(site / name)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "client-runtime.pth").write_text(f"{runtime}\n")
    build_tools = tmp_path / "build-tools"  # a setuptools with bdist_wheel, for the offline build only
    build_tools.mkdir()
    for name in ("setuptools", "_distutils_hack"):
        (build_tools / name).symlink_to(site / name)
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-build-isolation",
            "--no-deps",
            str(REPO / "clients"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(build_tools)},
    )
    assert install.returncode == 0, install.stderr[-2000:]
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, cwd=tmp_path)
    assert no_torch.returncode != 0
    done = subprocess.run(
        [str(python), "-c", snippet(service)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("100 steps, last action")
