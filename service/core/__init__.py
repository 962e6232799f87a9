"""The service without HTTP: models, sessions, batching and acting, in plain classes tests drive directly.

* :mod:`~service.core.registry` -- the model registry: every loaded version of every model by name,
  and the sessions on them;
* :mod:`~service.core.acting` -- a step, a list of steps or a columnar tick, across versions;
* :mod:`~service.core.engine` -- one loaded model: its :mod:`~service.core.forward` pass and slot pool,
  its :mod:`~service.core.session_table` and its :mod:`~service.core.batcher`;
* :mod:`~service.core.migration` -- activation, canaries, sessions moved between versions;
* :mod:`~service.core.snapshots` -- sessions' state out and back in; :mod:`~service.core.snapshot_file`
  on disk; :mod:`~service.core.recording` -- recorded sessions' steps as Parquet;
* :mod:`~service.core.records` and :mod:`~service.core.errors` -- what goes in and out: plain records,
  and refusals with a code (their HTTP status is chosen at the edge, in ``service.api.errors``).

Nothing here imports FastAPI, pydantic or ``service.api`` (checked by import-linter in ``make lint``).
"""
