"""trmrl-sim: simulators, a robot loop, the demo and a service launcher, on the ``trmrl_client`` library.

* :mod:`trmrl_sim.sim` -- ``trmrl-sim``: K environments of a task family, each a session of the service;
* :mod:`trmrl_sim.robot_loop` -- ``trmrl-robot-loop``: a fixed-rate control loop with a fallback action;
* :mod:`trmrl_sim.demo` -- ``make demo``: serve the bundled checkpoints and run held-out tasks through them;
* :mod:`trmrl_sim.launch` -- run ``python -m service`` as a child process (demos, tests, benchmarks).

The task definitions come from the ``trmrl`` package (its torch-free ``trmrl.tasks``).
"""

__version__ = "0.1.0"
