"""Prometheus metrics, one registry per app.

Per request the service reads the clock at each end and observes one request-latency histogram: a
plain list of bucket counts, only ever touched from the event loop, so a bisection and two additions
(about 0.3 us; prometheus-client's locked histogram costs several times that, and the act routes
answer thousands of requests a second). Per forward pass, two prometheus-client observations.
Everything the engines already count -- sessions, evictions, steps, device memory -- is read at
scrape time by a collector, so it costs nothing on the hot path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from service.core.engine import Engine
    from service.core.registry import ModelRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = tuple(float(2**i) for i in range(14))
_WAIT_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class _LoopHistogram:
    """Bucket counts of one label set, updated only from the event loop (so needing no lock)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, value)] += 1
        self.total += value


class _RequestCollector(Collector):
    """Exposes the request-latency histograms at scrape time."""

    def __init__(self, histograms: dict[tuple[str, str, int], _LoopHistogram]) -> None:
        self._histograms = histograms

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "trmrl_request_duration_seconds",
            "Time from a request's arrival to its reply, per route and status (its count counts replies).",
            labels=["route", "method", "status"],
        )
        bounds = [str(b) for b in _LATENCY_BUCKETS] + ["+Inf"]
        for (route, method, status), histogram in list(self._histograms.items()):
            cumulative, running = [], 0
            for bound, count in zip(bounds, histogram.counts, strict=True):
                running += count
                cumulative.append((bound, float(running)))
            family.add_metric([route, method, str(status)], cumulative, histogram.total)
        yield family


class _EngineCollector(Collector):
    """Reads the engines' own counters when Prometheus scrapes."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        registry = self._metrics.models
        labels = ["model", "version"]
        sessions = GaugeMetricFamily(
            "trmrl_active_sessions", "Sessions resident on the device.", labels=labels
        )
        queued = GaugeMetricFamily("trmrl_queued_steps", "Steps waiting for a forward pass.", labels=labels)
        evictions = CounterMetricFamily(
            "trmrl_session_evictions", "Idle sessions evicted to make room (LRU).", labels=labels
        )
        expirations = CounterMetricFamily(
            "trmrl_session_expirations", "Sessions ended by their idle TTL.", labels=labels
        )
        steps = CounterMetricFamily("trmrl_steps", "Steps computed.", labels=labels)
        passes = CounterMetricFamily("trmrl_forward_passes", "Batched forward passes run.", labels=labels)
        held = GaugeMetricFamily(
            "trmrl_model_device_bytes",
            "Device memory held by a model's weights and slot pool.",
            labels=labels,
        )
        active = GaugeMetricFamily(
            "trmrl_model_active", "1 for the version new sessions get, else 0.", labels=labels
        )
        canary = GaugeMetricFamily(
            "trmrl_model_canary_share", "Share of new sessions a canary version gets.", labels=labels
        )
        blocks = GaugeMetricFamily(
            "trmrl_cache_blocks",
            "Key/value cache blocks of a trial-context model, held by sessions (state=held) or free for "
            "reuse (state=free); the store grows when none are free, unless TRMRL_CACHE_MIB fixes it.",
            labels=[*labels, "state"],
        )
        refused = CounterMetricFamily(
            "trmrl_cache_refused_steps",
            "Steps refused (503 cache_exhausted) because a fixed key/value cache had no free block.",
            labels=labels,
        )
        phase = [*labels, "phase"]
        reward_sum = CounterMetricFamily(
            "trmrl_reward",
            "Sum of rewards received, for an episode's first 20 actions (phase=first20) and later ones "
            "(phase=after20): divide by trmrl_reward_steps for the mean, the adaptation signal.",
            labels=phase,
        )
        reward_steps = CounterMetricFamily(
            "trmrl_reward_steps", "Rewards counted in trmrl_reward.", labels=phase
        )
        reward_mean = GaugeMetricFamily(
            "trmrl_reward_mean", "Mean reward per step since the version was loaded, by phase.", labels=phase
        )
        if registry is not None:
            for engine in registry.all_engines():
                key = [engine.name, engine.version]
                stats = engine.stats()
                sessions.add_metric(key, stats["sessions"])
                queued.add_metric(key, stats["queued_steps"])
                evictions.add_metric(key, stats["evictions"])
                expirations.add_metric(key, stats["expirations"])
                steps.add_metric(key, stats["steps"])
                passes.add_metric(key, stats["ticks"])
                held.add_metric(key, stats["device_bytes"])
                if "cache_blocks_held" in stats:
                    blocks.add_metric([*key, "held"], stats["cache_blocks_held"])
                    blocks.add_metric([*key, "free"], stats["cache_blocks_free"])
                    refused.add_metric(key, stats["cache_refused_steps"])
                active.add_metric(key, float(registry.engines.get(engine.name) is engine))
                share = registry.canary.get(engine.name)
                canary.add_metric(key, share[1] if share is not None and share[0] == engine.version else 0.0)
                for i, name in enumerate(("first20", "after20")):
                    total, count = float(engine.reward_sums[i]), int(engine.reward_counts[i])
                    reward_sum.add_metric([*key, name], total)
                    reward_steps.add_metric([*key, name], count)
                    if count:
                        reward_mean.add_metric([*key, name], total / count)
        yield from (sessions, queued, evictions, expirations, steps, passes, held, blocks, refused, active)
        yield canary
        yield from (reward_sum, reward_steps, reward_mean)
        recorded = CounterMetricFamily("trmrl_recorded_steps", "Steps written to recordings.")
        lost = CounterMetricFamily(
            "trmrl_recording_lost_steps",
            "Recorded steps not written: the buffer was full (reason=buffer_full) or the disk refused "
            "them (reason=write_error).",
            labels=["reason"],
        )
        recorder = registry.recorder if registry is not None else None
        if recorder is not None:
            recorded.add_metric([], recorder.rows_written)
            lost.add_metric(["buffer_full"], recorder.rows_dropped)
            lost.add_metric(["write_error"], recorder.rows_lost)
        yield from (recorded, lost)
        device = GaugeMetricFamily(
            "trmrl_device_memory_bytes", "Memory allocated on each CUDA device by torch.", labels=["device"]
        )
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                device.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
        yield device


class ServiceMetrics:
    """The app's metrics; :meth:`observe_request` is the one hook every route, the fast path and every
    stream frame (method ``WS``) call."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.models: ModelRegistry | None = None
        self._requests: dict[tuple[str, str, int], _LoopHistogram] = {}
        self.registry.register(_RequestCollector(self._requests))
        self.batch_size = Histogram(
            "trmrl_batch_size",
            "Steps per forward pass.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "trmrl_queue_wait_seconds",
            "Time a batch's first step waited before its forward pass began.",
            ["model", "version"],
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.streams = Gauge(
            "trmrl_open_streams", "Open WebSocket streams.", ["route"], registry=self.registry
        )
        self.registry.register(_EngineCollector(self))

    def attach(self, models: ModelRegistry) -> None:
        """Start reading ``models``' counters and recording their batches."""
        self.models = models
        for engine in models.all_engines():
            self.watch(engine)

    def watch(self, engine: Engine) -> None:
        """Record one engine's batches (every version, also one loaded at runtime)."""
        size = self.batch_size.labels(engine.name, engine.version)
        wait = self.queue_wait.labels(engine.name, engine.version)

        def on_batch(n: int, waited: float) -> None:
            size.observe(n)
            wait.observe(waited)

        engine.on_batch = on_batch

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        histogram = self._requests.get(key)
        if histogram is None:
            histogram = self._requests[key] = _LoopHistogram()
        histogram.observe(seconds)

    def request_counts(self) -> dict[tuple[str, str, int], tuple[list[int], float]]:
        """Each request histogram's bucket counts (a copy; buckets of ``_LATENCY_BUCKETS``, then +Inf)
        and total seconds, by (route, method, status): what ``service.fleet`` reads."""
        return {key: (h.counts.copy(), h.total) for key, h in list(self._requests.items())}

    def render(self) -> bytes:
        return generate_latest(self.registry)
