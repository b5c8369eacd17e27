"""Prometheus metrics, served on ``/metrics`` by ``moko-guard serve``.

Each Guard has its own registry, so several guards in one process (tests, the
demo) do not collide.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "GuardMetrics", "LabelledHistogram"]

AUTH_CHECK_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class _HistogramChild:
    """The counts of one label value: one slot per bucket bound, then one for +Inf."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # A bound is inclusive ("le"), so a value equal to it counts in its bucket.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class LabelledHistogram(Collector):
    """A histogram with one label, for the per-request hot path.

    prometheus_client's Histogram takes a lock and walks the buckets on every
    observation. This one finds the bucket by bisection and takes no lock,
    because the guard observes only from its event loop thread.
    It renders the same series as a Histogram would.
    """

    def __init__(self, name: str, documentation: str, label: str, bounds: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = tuple(bounds)
        self._children: dict[str, _HistogramChild] = {}
        registry.register(self)

    def labels(self, value: str) -> _HistogramChild:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = _HistogramChild(self.bounds)
        return child

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.label])

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, child in self._children.items():
            running = 0
            buckets = []
            for bound, count in zip((*self.bounds, float("inf")), child.counts):
                running += count
                buckets.append((_bound_text(bound), running))
            family.add_metric([value], buckets, child.total)
        yield family


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class GuardMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sign_ins = Counter(
            "moko_guard_sign_ins", "Sign-in attempts by provider, outcome and reason",
            ["provider", "outcome", "reason"], registry=self.registry,
        )
        self.auth_checks = LabelledHistogram(
            "moko_guard_auth_check_seconds", "Time to decide one request (session check)",
            "decision", AUTH_CHECK_BUCKETS, self.registry,
        )
        self.active_sessions = Gauge(
            "moko_guard_active_sessions", "Unexpired, unrevoked sessions in the store",
            registry=self.registry,
        )
        self.provider_errors = Counter(
            "moko_guard_provider_errors", "Failed calls to providers by reason",
            ["provider", "reason"], registry=self.registry,
        )
        self.store_errors = Counter(
            "moko_guard_store_errors", "Store operations that failed", ["operation"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "moko_guard_rate_limited", "Requests refused by the sign-in rate limit", ["endpoint"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
