"""Every public class, function and method of the client library and the simulator client documents
itself with an example, and the examples that can run without a service do."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

MODULES = [
    *(
        f"trmrl_client.{name}"
        for name in (
            "errors",
            "routes",
            "protocol",
            "retry",
            "transport",
            "session",
            "http",
            "websocket",
            "stream",
            "vector",
            "codec",
        )
    ),
    *(f"trmrl_sim.{name}" for name in ("sim", "robot_loop", "demo", "launch", "render", "clips")),
]
#: The classes robots and simulators program against: their public methods need examples too.
API_CLASSES = {
    "http": ["PolicyClient", "AsyncPolicyClient"],
    "session": ["Session", "AsyncSession"],
    "stream": ["StreamingSession"],
    "vector": ["VectorSession", "AsyncVectorSession"],
    "robot_loop": ["RobotLoop"],
    "launch": ["ServiceProcess"],
}
CLI_HELPERS = {"parse_args", "free_port", "load_tasks_module", "run_demo"}
PLUMBING = {
    "send",
    "attempt",
    "run",
    "close",
    "aclose",
    "from_json",
    "to_json",
    "summary",
    "table",
    "footer",
    "update",
}


@pytest.mark.parametrize("name", MODULES)
def test_public_docstrings_have_examples_that_run(name: str) -> None:
    module = importlib.import_module(name)
    missing = []
    for attr, obj in vars(module).items():
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if attr in CLI_HELPERS:
            continue
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and "Example" not in (obj.__doc__ or ""):
            missing.append(attr)
    for cls_name in API_CLASSES.get(name.rpartition(".")[2], []):
        for attr, member in vars(getattr(module, cls_name)).items():
            if attr.startswith("_") or attr in PLUMBING or not inspect.isfunction(member):
                continue
            if "Example" not in (member.__doc__ or ""):
                missing.append(f"{cls_name}.{attr}")
    assert not missing, f"no example in the docstring of {missing}"
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0
