"""The fleet feed's readings: bucket counts of the service's histograms, percentiles from them, and the
small encoders the feed's text uses (:mod:`service.fleet`)."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import Histogram


@dataclass
class BucketCounts:
    """Bucket counts (not cumulative; the last is +Inf), their sum and total."""

    counts: list[float]
    total: float

    @property
    def n(self) -> float:
        return sum(self.counts)


@dataclass
class Reading:
    """The counters at one moment."""

    at: float
    steps: dict[tuple[str, str], tuple[int, int]]
    """Per (model, version): steps and forward passes."""
    batch: dict[tuple[str, str], BucketCounts]
    wait: dict[tuple[str, str], BucketCounts]
    requests: dict[tuple[str, str, int], tuple[list[int], float]]


@dataclass
class Point:
    """What happened between two readings (a point of the charts)."""

    at: float
    actions: dict[str, float]
    """Actions/s per ``model@version``."""
    requests: float
    errors: float
    p50_ms: float | None
    p99_ms: float | None


def bucket_counts(metric: Histogram, bounds: int) -> dict[tuple[str, str], BucketCounts]:
    """A labelled prometheus-client histogram's buckets per (model, version), made non-cumulative."""
    out: dict[tuple[str, str], BucketCounts] = {}
    for family in metric.collect():
        cumulative: dict[tuple[str, str], list[float]] = {}
        sums: dict[tuple[str, str], float] = {}
        for sample in family.samples:
            key = (sample.labels.get("model", ""), sample.labels.get("version", ""))
            if sample.name.endswith("_bucket"):
                cumulative.setdefault(key, []).append(sample.value)
            elif sample.name.endswith("_sum"):
                sums[key] = sample.value
        for key, running in cumulative.items():
            if len(running) != bounds + 1:
                continue
            counts = [running[0]] + [b - a for a, b in itertools.pairwise(running)]
            out[key] = BucketCounts(counts, sums.get(key, 0.0))
    return out


def quantile(
    q: float, bounds: tuple[float, ...], counts: Sequence[float], *, interpolate: bool = True
) -> float | None:
    """The ``q`` quantile of bucketed observations (``counts[i]`` in ``(bounds[i-1], bounds[i]]``, the
    last beyond every bound), interpolated within its bucket as Prometheus' ``histogram_quantile``
    (or, without ``interpolate``, its bucket's upper bound: for whole numbers such as batch sizes).

    >>> quantile(0.5, (1.0, 2.0), [0, 4, 0])
    1.5
    >>> quantile(0.99, (1.0, 2.0), [1, 0, 5])  # beyond the last bound: that bound
    2.0
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    running = 0.0
    for i, count in enumerate(counts):
        if count > 0 and running + count >= rank:
            if i >= len(bounds):
                return bounds[-1]
            if not interpolate:
                return bounds[i]
            low = bounds[i - 1] if i > 0 else 0.0
            return low + (bounds[i] - low) * (rank - running) / count
        running += count
    return bounds[-1]


def counts_since(now: list[Any], then: list[Any] | None) -> list[Any]:
    return list(now) if then is None else [a - b for a, b in zip(now, then, strict=True)]


def finite(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def encode_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def json_number(value: float | None) -> str:
    """A number as JSON (``null`` for none, or for NaN and infinities, which JSON lacks)."""
    return "null" if value is None or not math.isfinite(value) else repr(float(value))


def version_label(name: str, version: str) -> str:
    return f"{name}@{version}"
