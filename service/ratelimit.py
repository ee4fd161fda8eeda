"""The write rate of each tenant: a token bucket charged by every authenticated request that
changes something (POST, PUT, PATCH, DELETE: submissions, cancels, schedule and webhook
changes), so one tenant's submit/cancel loop cannot flood the queue; over it, 429
``rate_limited`` with ``Retry-After``. ``write_rate_per_s`` and ``write_burst`` are settings
with per-tenant overrides.

With a Redis broker the buckets live in Redis (:class:`RedisBuckets`: one Lua script takes a
token atomically, timed by the Redis server's clock), so every API process and replica
charges the same bucket: a tenant gets the configured rate however many processes serve it
and however its clients connect. The embedded mode (no Redis) keeps the buckets in the
process. If Redis does not answer, the process's own bucket is used meanwhile (a warning is
logged): the limit degrades to per-process rather than failing the request.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from fastapi import Request

from service.errors import APIError
from shortened.config import Settings

log = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


# KEYS[1] the bucket; ARGV rate (tokens/s), burst. Returns the wait in seconds (0: taken).
TAKE_TOKEN = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or burst
local at = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisBuckets:
    """The tenants' buckets in Redis, shared by every API process using the same broker."""

    def __init__(self, url: str, namespace: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.script = self.client.register_script(TAKE_TOKEN)
        self.namespace = namespace

    def take(self, tenant: str, rate: float, burst: int) -> float:
        key = f"shortened:{self.namespace}:write-rate:{tenant}"
        return float(self.script(keys=[key], args=[rate, burst]))


class RateLimiter:
    """Token buckets of write requests, one per tenant (in Redis when the broker is Redis)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant: (tokens, at)
        self._lock = threading.Lock()  # sync routes run on a thread pool
        url = settings.resolved_broker_url
        self.shared = (
            RedisBuckets(url, settings.queue) if url.startswith(("redis://", "rediss://")) else None
        )

    def take(self, tenant: str) -> float:
        """Take a token of ``tenant``'s bucket: 0 when taken, else seconds until one is."""
        limits = self.settings.limits_for(tenant)
        rate, burst = limits.write_rate_per_s, limits.write_burst
        assert rate is not None and burst is not None
        if self.shared is not None:
            try:
                return self.shared.take(tenant, rate, burst)
            except Exception as exc:  # Redis unreachable: the process's bucket meanwhile
                log.warning("shared write-rate bucket unavailable (%s); using this process's", exc)
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
