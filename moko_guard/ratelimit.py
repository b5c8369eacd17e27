"""Per-client rate limit for sign-in starts and callbacks (a token bucket per IP).

It keeps a script from flooding the provider or the store through the guard.
Buckets live in this process's memory; with several replicas each enforces
its own share.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

_MAX_CLIENTS = 100_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, per_minute: int, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, key: str) -> tuple[bool, int]:
        """Take one token for ``key``; return whether allowed and the seconds to wait if not."""
        if self.rate <= 0:
            return True, 0
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_CLIENTS:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True, 0
        wait = (1.0 - bucket.tokens) / self.rate
        return False, max(1, int(wait + 0.999))

    def _prune(self, now: float) -> None:
        full = [k for k, b in self._buckets.items()
                if b.tokens + (now - b.updated) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
        while len(self._buckets) >= _MAX_CLIENTS:
            self._buckets.pop(next(iter(self._buckets)))
