"""Run the policy service (``python -m service``) as a child process: start, wait for ``/readyz``, stop.

For demos, tests and benchmarks on one machine, from a checkout of the repository (the service comes
from its ``service`` package, not from this torch-free client). The child's output goes to a temporary
file (a pipe nobody reads can fill and block it), readable with :meth:`ServiceProcess.output`.

Example:
    >>> from trmrl_sim.launch import ServiceProcess
    >>> with ServiceProcess([Path("checkpoints/point-nav")]) as service:  # doctest: +SKIP
    ...     print(httpx.get(f"{service.url}/readyz").status_code)
    200
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

#: How much of the child's output a :class:`ServiceStartError` quotes.
OUTPUT_TAIL_CHARS = 3000


class ServiceStartError(RuntimeError):
    """The service exited while starting, or was not ready in time; the message ends with its output.

    Example:
        >>> ServiceStartError("the service exited with status 1 while starting", returncode=1).returncode
        1
    """

    def __init__(self, message: str, *, returncode: int | None = None, output: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode  # None: still running, but not ready in time
        self.output = output  # everything the process printed


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it).

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """``python -m <module> --host H --port P --checkpoint C ...`` as a child process.

    The environment is ``os.environ`` with ``TRMRL_DEVICE=<device>`` (unless ``device`` is ``None``)
    and ``TRMRL_LOG_LEVEL=warning`` (unless already set), then ``env`` on top. The port is picked once
    (``port`` or a free one) and kept by :meth:`restart`. Every start appends to the same output file.

    Example:
        >>> service = ServiceProcess([Path("checkpoints/point-nav")]).start()  # doctest: +SKIP
        >>> httpx.get(f"{service.url}/readyz").status_code  # doctest: +SKIP
        200
        >>> service.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        checkpoints: Sequence[Path | str],
        *,
        module: str = "service",
        port: int | None = None,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        device: str | None = "cpu",
        name: str | None = None,
    ) -> None:
        self.checkpoints = [Path(c) for c in checkpoints]
        self.module = module
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.env = dict(env or {})
        self.cwd = cwd
        self.device = device
        self.name = name or ("the service" if module == "service" else f"python -m {module}")
        self.process: subprocess.Popen[bytes] | None = None  # the running or last child; None: never started
        fd, path = tempfile.mkstemp(prefix="trmrl-service-", suffix=".log")
        os.close(fd)
        self._log = Path(path)
        self._closed_output: str | None = None
        self._remove_log = weakref.finalize(self, self._log.unlink, missing_ok=True)

    @property
    def args(self) -> list[str]:
        """The command line of the child.

        Example:
            >>> ServiceProcess(["ckpt"], port=8123).args[1:]
            ['-m', 'service', '--host', '127.0.0.1', '--port', '8123', '--checkpoint', 'ckpt']
        """
        args = [sys.executable, "-m", self.module, "--host", self.host, "--port", str(self.port)]
        for path in self.checkpoints:
            args += ["--checkpoint", str(path)]
        return args

    def full_env(self) -> dict[str, str]:
        """The child's environment: ``os.environ``, the defaults, then ``env``.

        Example:
            >>> ServiceProcess(["ckpt"], env={"TRMRL_API_KEYS": "k"}).full_env()["TRMRL_DEVICE"]
            'cpu'
        """
        defaults = {"TRMRL_LOG_LEVEL": os.environ.get("TRMRL_LOG_LEVEL", "warning")}
        if self.device is not None:
            defaults["TRMRL_DEVICE"] = self.device
        return {**os.environ, **defaults, **self.env}

    @property
    def running(self) -> bool:
        """Whether the child process is alive.

        Example:
            >>> ServiceProcess(["ckpt"]).running
            False
        """
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        """The process id of the child (of the last one, once stopped).

        Example:
            >>> ServiceProcess([Path("checkpoints/point-nav")]).start().pid  # doctest: +SKIP
            12345
        """
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process.pid

    def start(self, timeout_s: float = 120.0, *, wait: bool = True) -> Self:
        """Start the process and (unless ``wait`` is false) wait until ``/readyz`` answers 200.

        Raises :class:`ServiceStartError` with the tail of the output when the process exits while
        starting or is not ready within ``timeout_s`` (it is stopped then).

        Example:
            >>> service = ServiceProcess([Path("checkpoints/point-nav")]).start()  # doctest: +SKIP
        """
        if self._closed_output is not None:
            raise RuntimeError(f"{self.name} on port {self.port} was closed")
        if self.running:
            raise RuntimeError(f"{self.name} is already running on port {self.port}")
        with self._log.open("ab") as log:  # the child keeps its own descriptor; appends never overwrite
            self.process = subprocess.Popen(
                self.args, cwd=self.cwd, env=self.full_env(), stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> Self:
        """Poll ``/readyz`` until it answers 200; see :meth:`start` for the errors.

        Example:
            >>> service = ServiceProcess([Path("checkpoints/point-nav")]).start(wait=False)  # doctest: +SKIP
            >>> service.wait_ready(60.0).url  # doctest: +SKIP
            'http://127.0.0.1:...'
        """
        process = self.process
        if process is None:
            raise RuntimeError(f"{self.name} was never started")
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                output = self.output()
                raise ServiceStartError(
                    f"{self.name} exited with status {process.returncode} while starting:\n"
                    f"{output[-OUTPUT_TAIL_CHARS:]}",
                    returncode=process.returncode,
                    output=output,
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.stop()
        output = self.output()
        tail = f"; its output:\n{output[-OUTPUT_TAIL_CHARS:]}" if output else ""
        raise ServiceStartError(f"{self.name} was not ready within {timeout_s:.0f} s{tail}", output=output)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (the service drains and saves its sessions), wait; SIGKILL only if it hangs.

        Nothing happens when the process is not running.

        Example:
            >>> ServiceProcess(["ckpt"]).stop()  # never started: nothing to do
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final snapshot (a crash); nothing happens when it is not running.

        Example:
            >>> ServiceProcess([Path("checkpoints/point-nav")]).start().kill()  # doctest: +SKIP
        """
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self, timeout_s: float = 120.0) -> Self:
        """:meth:`stop`, then :meth:`start` again on the same port.

        Example:
            >>> service.restart().url == url  # doctest: +SKIP
            True
        """
        self.stop()
        return self.start(timeout_s)

    def output(self) -> str:
        """Everything the process printed so far (over every start).

        Example:
            >>> print(service.output())  # doctest: +SKIP
        """
        if self._closed_output is not None:
            return self._closed_output
        try:
            return self._log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """:meth:`stop`, then remove the output file (:meth:`output` still answers).

        Example:
            >>> ServiceProcess(["ckpt"]).close()
        """
        self.stop()
        if self._closed_output is None:
            self._closed_output = self.output()
        self._remove_log()

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
