"""The write rate of each tenant: a token bucket charged by every authenticated request that
changes something (POST, PUT, PATCH, DELETE: submissions, cancels, schedule and webhook
changes), so one tenant's submit/cancel loop cannot flood the queue; over it, 429
``rate_limited`` with ``Retry-After``. ``write_rate_per_s`` and ``write_burst`` are settings
with per-tenant overrides. Buckets live in the API process: with N API processes
(``SHORTENED_API_WORKERS``) and R replicas a tenant may write up to N x R times the rate
(each connection is served by one process, so a single client sees the configured rate).
Set the rate for one process accordingly; see docs/operations.md.
"""

from __future__ import annotations

import math
import threading
import time

from fastapi import Request

from service.errors import APIError
from shortened.config import Settings

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class RateLimiter:
    """Token buckets of write requests, one per tenant."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant: (tokens, at)
        self._lock = threading.Lock()  # sync routes run on a thread pool

    def take(self, tenant: str) -> float:
        """Take a token of ``tenant``'s bucket: 0 when taken, else seconds until one is."""
        limits = self.settings.limits_for(tenant)
        rate, burst = limits.write_rate_per_s, limits.write_burst
        assert rate is not None and burst is not None
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(tenant, (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate)
            if tokens >= 1:
                self._buckets[tenant] = (tokens - 1, now)
                return 0.0
            self._buckets[tenant] = (tokens, now)
            return (1 - tokens) / rate


def charge_write(request: Request, tenant: str) -> None:
    """429 ``rate_limited`` with ``Retry-After`` when ``tenant`` writes faster than allowed."""
    if request.method not in WRITE_METHODS:
        return
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        return
    wait = limiter.take(tenant)
    if wait > 0:
        limits = limiter.settings.limits_for(tenant)
        raise APIError(
            429,
            "rate_limited",
            f"tenant {tenant!r} is over its write rate limit (write_rate_per_s="
            f"{limits.write_rate_per_s:g}, write_burst={limits.write_burst}); retry later",
            {"Retry-After": str(max(1, math.ceil(wait)))},
        )
