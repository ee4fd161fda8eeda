"""The Redis broker transport: messages sent through it land in the queue exactly as Celery
would put them there, sending reuses one redis-py client per connection pool instead of
building one each time, and only the first message of a process declares the queue."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from celery import Celery, signals

import service.queue
from service.queue import RUN_JOB_TASK, broker_transport, make_celery, send_run_job
from service.redis_broker import RedisTransport
from shortened.config import Settings
from tests.e2e_service import redis_namespace


@contextmanager
def _celery(tmp_path: Path) -> Iterator[tuple[Celery, str, str]]:
    """The API's Celery app on a fresh Redis queue: (app, broker URL, queue)."""
    with redis_namespace() as (broker_url, queue):
        celery = make_celery(
            Settings(broker_url=broker_url, queue=queue, data_dir=tmp_path / "var")
        )
        try:
            yield celery, broker_url, queue
        finally:
            celery.close()


def _queued(broker_url: str, queue: str) -> list[dict]:
    """The queue's messages, oldest first, each body decoded."""
    messages = [json.loads(m) for m in redis.Redis.from_url(broker_url).lrange(queue, 0, -1)]
    for message in messages:
        message["body"] = json.loads(base64.b64decode(message["body"]))
    return messages[::-1]


def _without_message_ids(message: dict) -> dict:
    """The message without what differs from one message to the next (its ids, its job)."""
    message = json.loads(json.dumps(message))
    headers, properties = message["headers"], message["properties"]
    assert headers["id"] == headers["root_id"] == properties["correlation_id"]
    for key in ("id", "root_id", "argsrepr"):
        headers.pop(key)
    for key in ("correlation_id", "delivery_tag"):
        properties.pop(key)
    message["body"][0] = None
    return message


def test_only_plain_redis_urls_get_the_transport():
    assert broker_transport("redis://127.0.0.1:6379/0") == "service.redis_broker:RedisTransport"
    assert broker_transport("rediss://cache.internal:6380/0") is not None
    assert broker_transport("sentinel://10.0.0.1:26379") is None
    assert broker_transport("filesystem://") is None


def test_messages_reach_the_queue_and_the_client_is_built_once(tmp_path):
    with _celery(tmp_path) as (celery, broker_url, queue):
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
        headers = [m["headers"] for m in _queued(broker_url, queue)]
        assert {h["task"] for h in headers} == {RUN_JOB_TASK}
        assert [h["argsrepr"] for h in headers] == [f"['job-{n}']" for n in range(5)]


def test_the_queue_is_declared_with_the_first_message_only(tmp_path, monkeypatch):
    import kombu.messaging

    declared = []
    real = kombu.messaging.maybe_declare

    def counted(entity, *args, **kwargs):
        declared.append(entity.name)
        return real(entity, *args, **kwargs)

    monkeypatch.setattr(kombu.messaging, "maybe_declare", counted)
    with _celery(tmp_path) as (celery, broker_url, queue):
        for n in range(4):
            send_run_job(celery, f"job-{n}")
        assert [m["body"][0] for m in _queued(broker_url, queue)] == [
            [f"job-{n}"] for n in range(4)
        ]
        assert declared == [queue]  # the first message's declaration, no more


def test_later_messages_are_the_message_celery_sends(tmp_path):
    with _celery(tmp_path) as (celery, broker_url, queue):
        celery.send_task(RUN_JOB_TASK, args=["job-celery"])  # Celery's own, the reference
        for n in range(3):
            send_run_job(celery, f"job-{n}")  # the first through send_task, then direct
        assert celery in service.queue._direct  # the direct path was taken
        reference, *sent = _queued(broker_url, queue)
        assert [m["body"][0] for m in sent] == [["job-0"], ["job-1"], ["job-2"]]
        assert [m["headers"]["argsrepr"] for m in sent] == [f"['job-{n}']" for n in range(3)]
        for message in sent:
            assert _without_message_ids(message) == _without_message_ids(reference)
        ids = {m["headers"]["id"] for m in sent} | {m["properties"]["delivery_tag"] for m in sent}
        assert len(ids) == 6  # fresh ids for every message


def test_publish_signal_receivers_get_every_message(tmp_path):
    """Whatever hooks Celery's publishing (the OpenTelemetry instrumentation puts the trace
    context in the headers there) sees every message: none is pushed directly then."""
    seen = []

    def receiver(sender=None, headers=None, **kwargs):
        seen.append(headers["argsrepr"])
        headers["traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"

    signals.before_task_publish.connect(receiver, weak=False)
    try:
        with _celery(tmp_path) as (celery, broker_url, queue):
            for n in range(3):
                send_run_job(celery, f"job-{n}")
            assert seen == [f"['job-{n}']" for n in range(3)]
            assert all("traceparent" in m["headers"] for m in _queued(broker_url, queue))
    finally:
        signals.before_task_publish.disconnect(receiver)


def test_a_direct_send_that_fails_raises_and_the_next_one_reconnects(tmp_path):
    with _celery(tmp_path) as (celery, broker_url, queue):
        send_run_job(celery, "job-0")  # through send_task: the queue is declared
        send_run_job(celery, "job-1")  # direct
        pid, _ = service.queue._direct[celery]

        def broken(job_id: str) -> None:
            raise redis.ConnectionError("connection reset")

        service.queue._direct[celery] = (pid, broken)
        with pytest.raises(redis.ConnectionError):  # dispatch marks the job for the reaper
            send_run_job(celery, "job-2")
        send_run_job(celery, "job-3")
        assert [m["body"][0] for m in _queued(broker_url, queue)] == [
            ["job-0"],
            ["job-1"],
            ["job-3"],
        ]
