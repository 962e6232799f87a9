"""The fleet feed: what ``GET /v1/fleet`` returns and the ``/ui`` page draws, without HTTP.

Everything here is read from counters the service keeps anyway; nothing is added per request:

* :class:`Fleet` reads, once a second (:meth:`Fleet.run`), the engines' step and forward-pass
  counters, the batch-size and queue-wait histograms and the request-latency histograms
  (:class:`service.metrics.ServiceMetrics`), and keeps a short ring of those readings and a five-minute
  ring of what happened between two of them. Rates, percentiles and error counts are differences of
  those counters, so a reading costs the same whatever the traffic.
* each engine's :class:`~service.core.adaptation.AdaptationCurves` give the adaptation curves and
  the sessions' returns.
* :meth:`Fleet.feed` builds the feed as plain dictionaries (the API layer documents its shape): the
  recent sessions are the ``limit`` most recently active ones, found with array operations over the
  session tables (``argpartition`` of their last-active times), so 10,000 sessions cost well under a
  millisecond of the event loop.

:func:`~service.fleet_query.parse_query` validates the feed's filter; :mod:`service.fleet_readings`
reads the histograms.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from service.core.background import cancel
from service.fleet_query import ID_PREFIX, FleetQuery
from service.fleet_readings import (
    Point,
    Reading,
    bucket_counts,
    counts_since,
    encode_text,
    finite,
    json_number,
    quantile,
    version_label,
)
from service.metrics import _BATCH_BUCKETS, _LATENCY_BUCKETS, _WAIT_BUCKETS

if TYPE_CHECKING:
    from service.core.engine import Engine
    from service.core.registry import ModelRegistry
    from service.metrics import ServiceMetrics

#: Seconds between two readings of the counters.
SAMPLE_INTERVAL_S = 1.0
#: Readings kept for the charts: five minutes at one a second.
HISTORY = 300
#: The span the feed's current figures (rates, percentiles, errors) are computed over.
WINDOW_S = 10.0


@dataclass
class Fleet:
    """Periodic readings of the service's counters and the feed computed from them.

    :meth:`attach` the registry, then run :meth:`run` as a task (:meth:`start`/:meth:`stop`).
    """

    metrics: ServiceMetrics
    interval_s: float = SAMPLE_INTERVAL_S
    history: int = HISTORY
    window_s: float = WINDOW_S
    registry: ModelRegistry | None = None
    started_at: float = field(default_factory=time.monotonic)
    _readings: deque[Reading] = field(init=False)
    _times: deque[str] = field(init=False)
    _columns: dict[str, deque[str]] = field(init=False)
    _actions: dict[str, deque[str]] = field(init=False)
    _device_bytes: dict[tuple[str, str], int] = field(init=False, default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self._readings = deque(maxlen=max(2, math.ceil(self.window_s / self.interval_s) + 1))
        self._clear_series()

    def _clear_series(self) -> None:
        """The charts' columns: one value per reading interval, appended by :meth:`tick` already
        encoded as JSON (a point never changes once read), so a feed only joins them."""
        self._times = deque(maxlen=self.history)
        names = ("requests_per_s", "errors_per_s", "latency_p50_ms", "latency_p99_ms")
        self._columns = {name: deque(maxlen=self.history) for name in names}
        self._actions = {}

    # -- readings ---------------------------------------------------------------------------------------
    def attach(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._readings.clear()
        self._clear_series()
        self._readings.append(self.read())

    def start(self, registry: ModelRegistry) -> None:
        """Attach ``registry`` and take a reading every ``interval_s`` from now on."""
        self.attach(registry)
        self._task = asyncio.create_task(self.run(), name="fleet-readings")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.tick()

    def engines(self) -> list[Engine]:
        return [] if self.registry is None else self.registry.all_engines()

    def read(self) -> Reading:
        """The counters now (tens of microseconds: a few dictionaries of small lists)."""
        return Reading(
            at=time.monotonic(),
            steps={(e.name, e.version): (e.stepped, e.ticks) for e in self.engines()},
            batch=bucket_counts(self.metrics.batch_size, len(_BATCH_BUCKETS)),
            wait=bucket_counts(self.metrics.queue_wait, len(_WAIT_BUCKETS)),
            requests=self.metrics.request_counts(),
        )

    def tick(self) -> None:
        """Take a reading and keep what happened since the previous one."""
        now = self.read()
        if self._readings:
            self._append(self._between(self._readings[-1], now))
        self._readings.append(now)

    def _append(self, point: Point) -> None:
        self._times.append(json_number(round(point.at - self.started_at, 1)))
        values = (point.requests, point.errors, point.p50_ms, point.p99_ms)
        for column, value in zip(self._columns.values(), values, strict=True):
            column.append(json_number(value))
        for label in point.actions:
            if label not in self._actions:  # a version loaded since: nothing before it
                self._actions[label] = deque(["null"] * (len(self._times) - 1), maxlen=self.history)
        for label, column in list(self._actions.items()):
            value = point.actions.get(label)
            column.append(json_number(value))
            if value is None and all(v == "null" for v in column):
                del self._actions[label]  # retired, and out of the charts' span

    def _between(self, then: Reading, now: Reading) -> Point:
        span = max(now.at - then.at, 1e-9)
        actions = {}
        for key, (steps, _) in now.steps.items():
            before = then.steps.get(key, (0, 0))[0]
            actions[version_label(*key)] = round((steps - before) / span, 2)
        merged = [0] * (len(_LATENCY_BUCKETS) + 1)
        requests = errors_seen = 0
        for request, (counts, _) in now.requests.items():
            old = then.requests.get(request)
            delta = counts_since(counts, None if old is None else old[0])
            n = sum(delta)
            requests += n
            if request[2] >= 400:
                errors_seen += n
            merged = [a + b for a, b in zip(merged, delta, strict=True)]
        p50, p99 = quantile(0.5, _LATENCY_BUCKETS, merged), quantile(0.99, _LATENCY_BUCKETS, merged)
        return Point(
            at=now.at,
            actions=actions,
            requests=round(requests / span, 2),
            errors=round(errors_seen / span, 2),
            p50_ms=None if p50 is None else round(p50 * 1e3, 3),
            p99_ms=None if p99 is None else round(p99 * 1e3, 3),
        )

    # -- the feed ---------------------------------------------------------------------------------------
    def feed(self, query: FleetQuery | None = None, *, series: bool = True) -> dict[str, Any]:
        """The whole feed (see ``service.api.routes.fleet.FleetFeed`` for its documented shape); without
        ``series``, all but the charts' series."""
        query = query or FleetQuery()
        registry = self.registry
        # The newest reading (at most ``interval_s`` old): a feed reads no counter itself. Before the
        # first reading after the start, a fresh one.
        now = self._readings[-1] if len(self._readings) > 1 else self.read()
        base = self._readings[0] if self._readings else now
        span = now.at - base.at
        rate = 1.0 / span if span > 0 else 0.0
        engines = self.engines()
        models = [self._model_row(e, registry, now, base, rate) for e in engines]
        routes, errors_rows, requests_total, errors_total = self._routes(now, base, rate)
        devices = []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                devices.append(
                    {"device": f"cuda:{index}", "allocated_bytes": torch.cuda.memory_allocated(index)}
                )
        return {
            "service": {
                "uptime_s": round(time.monotonic() - self.started_at, 1),
                "window_s": round(span, 3),
                "sample_interval_s": self.interval_s,
                "draining": bool(registry is not None and registry.draining),
            },
            "totals": {
                "sessions": sum(m["sessions"] for m in models),
                "actions_per_s": round(sum(m["actions_per_s"] for m in models), 2),
                "requests_per_s": round(requests_total * rate, 2),
                "errors_per_s": round(errors_total * rate, 3),
                "device_bytes": sum(m["device_bytes"] for m in models),
            },
            "models": models,
            "routes": routes,
            "errors": errors_rows,
            "devices": devices,
            **({"series": self._series()} if series else {}),
            "adaptation": [self._curve(e) for e in engines],
            "sessions": self._sessions(engines, query, now.at),
        }

    def _model_row(
        self, engine: Engine, registry: ModelRegistry | None, now: Reading, base: Reading, rate: float
    ) -> dict[str, Any]:
        key = (engine.name, engine.version)
        steps, passes = now.steps.get(key, (0, 0))
        steps_then, passes_then = base.steps.get(key, (0, 0))
        stepped, forwards = steps - steps_then, passes - passes_then
        batch_now, batch_then = now.batch.get(key), base.batch.get(key)
        wait_now, wait_then = now.wait.get(key), base.wait.get(key)
        batch_counts = (
            counts_since(batch_now.counts, batch_then.counts if batch_then else None) if batch_now else []
        )
        wait_counts = (
            counts_since(wait_now.counts, wait_then.counts if wait_then else None) if wait_now else []
        )
        wait_sum = (wait_now.total - (wait_then.total if wait_then else 0.0)) if wait_now else 0.0
        waits = sum(wait_counts)
        active = registry is not None and registry.engines.get(engine.name) is engine
        canary = registry.canary.get(engine.name) if registry is not None else None
        canary_share = canary[1] if canary is not None and canary[0] == engine.version else 0.0
        sums, counts = engine.reward_sums, engine.reward_counts
        p50_wait = quantile(0.5, _WAIT_BUCKETS, wait_counts) if waits else None
        p99_wait = quantile(0.99, _WAIT_BUCKETS, wait_counts) if waits else None
        return {
            "model": engine.name,
            "version": engine.version,
            "task_family": engine.checkpoint.info.task_family,
            "active": active,
            "canary_share": canary_share,
            "sessions": len(engine.table),
            "queued_steps": engine.queued_steps,
            "actions_per_s": round(stepped * rate, 2),
            "forward_passes_per_s": round(forwards * rate, 2),
            "batch_mean": finite(stepped / forwards if forwards else None, 2),
            "batch_p50": finite(
                quantile(0.5, _BATCH_BUCKETS, batch_counts, interpolate=False) if forwards else None, 2
            ),
            "batch_p99": finite(
                quantile(0.99, _BATCH_BUCKETS, batch_counts, interpolate=False) if forwards else None, 2
            ),
            "queue_wait_mean_ms": finite(wait_sum / waits * 1e3 if waits else None, 3),
            "queue_wait_p50_ms": finite(None if p50_wait is None else p50_wait * 1e3, 3),
            "queue_wait_p99_ms": finite(None if p99_wait is None else p99_wait * 1e3, 3),
            "device_bytes": self._held(engine),
            "steps_total": engine.stepped,
            "reward_first20": finite(float(sums[0]) / int(counts[0]) if counts[0] else None),
            "reward_after20": finite(float(sums[1]) / int(counts[1]) if counts[1] else None),
            "cache": engine.cache_stats(),
        }

    def _held(self, engine: Engine) -> int:
        """An engine's device memory (weights and slot pool: fixed once loaded, so counted once; a trial
        cache grows, so it is read each time)."""
        if engine.trial_context:
            return engine.device_bytes
        key = (engine.name, engine.version)
        held = self._device_bytes.get(key)
        if held is None:
            held = self._device_bytes[key] = engine.device_bytes
        return held

    def _routes(
        self, now: Reading, base: Reading, rate: float
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, int]:
        by_route: dict[tuple[str, str], list[int]] = {}
        failed: dict[tuple[str, str], int] = {}
        error_rows = []
        requests_total = errors_total = 0
        for (route, method, status), (counts, _) in now.requests.items():
            old = base.requests.get((route, method, status))
            delta = counts_since(counts, None if old is None else old[0])
            n = sum(delta)
            requests_total += n
            merged = by_route.setdefault((route, method), [0] * len(counts))
            for i, c in enumerate(delta):
                merged[i] += c
            if status >= 400:
                errors_total += n
                failed[(route, method)] = failed.get((route, method), 0) + n
                error_rows.append(
                    {
                        "status": status,
                        "route": route,
                        "method": method,
                        "count": n,
                        "per_s": round(n * rate, 3),
                        "total": sum(counts),
                    }
                )
        routes = []
        for (route, method), counts in by_route.items():
            n = sum(counts)
            if not n:
                continue
            p50, p99 = quantile(0.5, _LATENCY_BUCKETS, counts), quantile(0.99, _LATENCY_BUCKETS, counts)
            routes.append(
                {
                    "route": route,
                    "method": method,
                    "count": n,
                    "requests_per_s": round(n * rate, 2),
                    "p50_ms": None if p50 is None else round(p50 * 1e3, 3),
                    "p99_ms": None if p99 is None else round(p99 * 1e3, 3),
                    "errors": failed.get((route, method), 0),
                }
            )
        routes.sort(key=lambda r: (-r["count"], r["route"], r["method"]))
        error_rows.sort(key=lambda r: (-r["count"], -r["total"], r["status"], r["route"]))
        return routes, error_rows, requests_total, errors_total

    def feed_json(self, query: FleetQuery | None = None) -> bytes:
        """:meth:`feed` encoded as JSON; the charts' series (most of its numbers) are joined from the
        points' encodings, kept since their readings."""
        text = encode_text(self.feed(query, series=False))
        return f'{text[:-1]},"series":{self._series_text()}}}'.encode()

    def _series_text(self) -> str:
        def array(column: Iterable[str]) -> str:
            return f"[{','.join(column)}]"

        actions = ",".join(
            f"{json.dumps(label)}:{array(self._actions[label])}" for label in sorted(self._actions)
        )
        parts = [f'"at_s":{array(self._times)}', f'"actions_per_s":{{{actions}}}']
        parts += [f'"{name}":{array(column)}' for name, column in self._columns.items()]
        return "{" + ",".join(parts) + "}"

    def _series(self) -> dict[str, Any]:
        series: dict[str, Any] = json.loads(self._series_text())
        return series

    @staticmethod
    def _curve(engine: Engine) -> dict[str, Any]:
        first, later, first_n, later_n = engine.curves.curves()
        return {
            "model": engine.name,
            "version": engine.version,
            "first_episode": first,
            "later_episodes": later,
            "first_rewards": first_n,
            "later_rewards": later_n,
        }

    @staticmethod
    def _sessions(engines: list[Engine], query: FleetQuery, at: float) -> dict[str, Any]:
        """The ``limit`` most recently active sessions matching the filter: per engine, its live slots'
        last-active times and an ``argpartition``; then a merge of at most ``limit`` per engine."""
        limit = query.limit
        chosen = [
            e
            for e in engines
            if (query.model is None or e.name == query.model)
            and (query.version is None or e.version == query.version)
        ]
        candidates: list[tuple[float, Engine, int]] = []
        matching = 0
        for engine in chosen:
            table = engine.table
            live = np.flatnonzero(table.in_use)
            matching += len(table)
            if len(live) > limit:
                top = np.argpartition(table.last_active[live], len(live) - limit)[len(live) - limit :]
                live = live[top]
            candidates += zip(
                table.last_active[live].tolist(), [engine] * len(live), live.tolist(), strict=True
            )
        candidates.sort(key=lambda c: -c[0])
        picked: dict[int, list[int]] = {}
        for _, engine, slot in candidates[:limit]:
            picked.setdefault(id(engine), []).append(slot)
        # Each engine's chosen rows in one gather per column, not one numpy scalar per cell.
        columns: dict[tuple[int, int], tuple[Any, ...]] = {}
        for engine in chosen:
            slots = picked.get(id(engine))
            if not slots:
                continue
            table = engine.table
            at_slots = np.asarray(slots)
            gathered = zip(
                slots,
                table.next_step[at_slots].tolist(),
                table.episodes[at_slots].tolist(),
                np.round(table.last_return[at_slots], 4).tolist(),
                np.round(table.episode_return[at_slots], 4).tolist(),
                strict=True,
            )
            for slot, *values in gathered:
                columns[(id(engine), slot)] = tuple(values)
        rows = []
        for last_active, engine, slot in candidates[:limit]:
            session_id = engine.table.slot_ids[slot]
            if session_id is None:
                continue
            steps, episodes, last_return, episode_return = columns[(id(engine), slot)]
            rows.append(
                {
                    "id_prefix": session_id[:ID_PREFIX],
                    "model": engine.name,
                    "version": engine.version,
                    "steps": steps,
                    "episodes": episodes,
                    "last_return": last_return if math.isfinite(last_return) else None,
                    "episode_return": episode_return if math.isfinite(episode_return) else None,
                    "idle_s": round(max(0.0, at - last_active), 1),
                }
            )
        return {
            "matching": matching,
            "limit": limit,
            "filter": {"model": query.model, "version": query.version},
            "rows": rows,
        }
