"""Prometheus metrics, served on ``/metrics`` by ``moko-guard serve``.

Each Guard has its own registry, so several guards in one process (tests, the
demo) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "GuardMetrics"]


class GuardMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sign_ins = Counter(
            "moko_guard_sign_ins", "Sign-in attempts by provider, outcome and reason",
            ["provider", "outcome", "reason"], registry=self.registry,
        )
        self.auth_checks = Histogram(
            "moko_guard_auth_check_seconds", "Time to decide one request (session check)",
            ["decision"], registry=self.registry,
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
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
