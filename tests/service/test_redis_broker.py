"""The Redis broker transport: messages sent through it land in the queue as kombu's would,
and sending reuses one redis-py client per connection pool instead of building one each time."""

from __future__ import annotations

import json

import redis

from service.queue import RUN_JOB_TASK, broker_transport, make_celery, send_run_job
from service.redis_broker import RedisTransport
from shortened.config import Settings
from tests.e2e_service import redis_namespace


def test_only_plain_redis_urls_get_the_transport():
    assert broker_transport("redis://127.0.0.1:6379/0") == "service.redis_broker:RedisTransport"
    assert broker_transport("rediss://cache.internal:6380/0") is not None
    assert broker_transport("sentinel://10.0.0.1:26379") is None
    assert broker_transport("filesystem://") is None


def test_messages_reach_the_queue_and_the_client_is_built_once(tmp_path):
    with redis_namespace() as (broker_url, queue):
        celery = make_celery(
            Settings(broker_url=broker_url, queue=queue, data_dir=tmp_path / "var")
        )
        try:
            built = []
            with celery.connection_for_write() as connection:
                assert isinstance(connection.transport, RedisTransport)
                channel = connection.default_channel
                create = channel._create_client

                def counted(*args, **kwargs):
                    built.append(1)
                    return create(*args, **kwargs)

                channel._create_client = counted
                for n in range(5):  # a producer on this connection: its default channel
                    celery.send_task(RUN_JOB_TASK, args=[f"job-{n}"], connection=connection)
            assert len(built) <= 1  # the channel's client, made at most once
            raw = redis.Redis.from_url(broker_url)
            bodies = [json.loads(m) for m in raw.lrange(queue, 0, -1)]
            assert len(bodies) == 5
            headers = [b["headers"] for b in bodies]
            assert {h["task"] for h in headers} == {RUN_JOB_TASK}
            assert sorted(h["argsrepr"] for h in headers) == [f"['job-{n}']" for n in range(5)]
        finally:
            celery.close()


def test_the_queue_is_declared_with_the_first_message_only(tmp_path, monkeypatch):
    import kombu.messaging

    declared = []
    real = kombu.messaging.maybe_declare

    def counted(entity, *args, **kwargs):
        declared.append(entity.name)
        return real(entity, *args, **kwargs)

    monkeypatch.setattr(kombu.messaging, "maybe_declare", counted)
    with redis_namespace() as (broker_url, queue):
        celery = make_celery(
            Settings(broker_url=broker_url, queue=queue, data_dir=tmp_path / "var")
        )
        try:
            for n in range(4):
                send_run_job(celery, f"job-{n}")
            raw = redis.Redis.from_url(broker_url)
            bodies = [json.loads(m) for m in raw.lrange(queue, 0, -1)]
            assert sorted(b["headers"]["argsrepr"] for b in bodies) == [
                f"['job-{n}']" for n in range(4)
            ]
            assert declared == [queue]  # the first message's declaration, no more
        finally:
            celery.close()
