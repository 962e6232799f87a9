"""Shared fixtures, and the service logs of a failing test in its report.

Every ``python -m service`` a test starts (``trmrl_sim.launch.ServiceProcess`` and its subclasses,
the benchmarks' servers included) writes its output to a file. When a test fails, what each of them
wrote while the test ran is added to the test's report, so the failure in a CI log comes with the
server's side of it (tracebacks, warnings, session lifecycle lines) under "Captured service log".
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from trmrl_sim.launch import ServiceProcess

os.environ.setdefault("MUJOCO_GL", "disable")
# One intra-op thread for the tests' own forward passes: their tensors are small, and on a busy machine
# (CI shares its cores) every parallel op of a multi-threaded torch waits for a second core -- measured
# here 4-5x slower under load for the trial-pool tests, for no gain when the machine is quiet.
torch.set_num_threads(int(os.environ.get("TRMRL_TEST_TORCH_THREADS", "1")))
# gymnasium's MuJoCo environments import glfw, whose import walks its own module namespace; imported
# late in a run (after other tests' threads and GL contexts exist) that walk was seen failing once with
# "dictionary changed size during iteration". Imported here, before any test runs, it happens once, alone.
with contextlib.suppress(Exception):
    import glfw  # noqa: F401
# Child services log at info (session lifecycle), not the launcher's default of warnings only: the
# lines go to a file and are shown only for a failing test.
os.environ.setdefault("TRMRL_LOG_LEVEL", "info")

#: How much of one service's output a failing test's report shows (its end).
LOG_TAIL_CHARS = 20_000

#: Every service started so far that is still referenced (those of module and session fixtures).
_services: weakref.WeakSet[ServiceProcess] = weakref.WeakSet()
#: The services the current test started, held until it is reported: a benchmark's server is closed
#: and dropped before the test's assertion fails, and its output must still be shown.
_this_test: list[ServiceProcess] = []
_offsets = pytest.StashKey[dict[int, int]]()


@pytest.fixture(scope="session", autouse=True)
def _record_service_processes() -> Iterator[None]:
    start = ServiceProcess.start

    @functools.wraps(start)  # the client's docstring tests read the method's docstring
    def recorded_start(self: ServiceProcess, *args: Any, **kwargs: Any) -> ServiceProcess:
        _services.add(self)
        _this_test.append(self)
        return start(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ServiceProcess, "start", recorded_start)
        yield


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    import torch

    torch.manual_seed(0)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Where each running service's output stood when the test began (module and session fixtures
    # start theirs earlier): the report shows what came after.
    _this_test.clear()
    item.stash[_offsets] = {id(service): len(service.output()) for service in _services}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield
    if report.failed:
        offsets = item.stash.get(_offsets, {})
        for service in dict.fromkeys([*_services, *_this_test]):  # each once, in no particular order
            output = service.output()[offsets.get(id(service), 0) :]
            if output.strip():
                if len(output) > LOG_TAIL_CHARS:
                    cut = len(output) - LOG_TAIL_CHARS
                    output = f"[... {cut} characters before]\n{output[cut:]}"
                report.sections.append((f"Captured service log ({service.name} at {service.url})", output))
    return report
