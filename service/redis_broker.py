"""The Redis broker transport of the job queue (``service.queue.broker_transport`` names it;
kombu imports it when it first connects to a ``redis://`` or ``rediss://`` broker)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class _RedisChannel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel, but one redis-py client object per connection pool instead of a
    new one for every command outside the consumer's loop (every message sent): building a
    client (its table of response callbacks) was 0.2 ms of a 0.55 ms send. The client is
    thread-safe and uses the same pool the new one would; a new pool (after a fork, or a
    reconnect) gets a new client."""

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_client_for_pool")
        if cached is None or cached[0] is not pool:
            cached = self.__dict__["_client_for_pool"] = (pool, self._create_client())
        yield cached[1]


class RedisTransport(kombu_redis.Transport):  # type: ignore[misc]
    """``redis://`` and ``rediss://`` brokers (producer and consumer): kombu's transport with
    ``_RedisChannel``."""

    Channel = _RedisChannel
