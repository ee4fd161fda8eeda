"""Webhooks: signed (Standard Webhooks) notifications of job state changes, written
to an outbox in the transaction of the change, sent and retried with backoff by a
dispatcher, every try visible through the API.

Messages are received by a real HTTP server on a loopback port (stdlib ``http.server`` on a
thread) and verified with the ``standardwebhooks`` library. The end-to-end part runs the API
under uvicorn with a real Celery worker on Redis and PostgreSQL, in auth-required mode.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.auth import create_api_key
from service.db import make_engine, make_sessionmaker, upgrade_database
from service.main import create_app
from service.models import Job, WebhookAttempt, WebhookDelivery, WebhookEndpoint, utcnow
from service.stores.events import append_event
from service.stores.job_admission import create_job, new_job_id
from service.stores.job_lifecycle import claim_job, finish_job, request_cancel
from service.stores.job_reads import get_job
from service.stores.job_recovery import reap_expired_leases
from service.webhooks import WebhookDispatcher, new_secret
from shortened.config import Settings
from tests.e2e_service import (
    REPO,
    base_env,
    failing_in_worker_spec,
    free_port,
    postgres_database,
    prune_spec,
    redis_namespace,
    start_api,
    start_worker,
    wait_for_job,
    wait_until,
)

# ---------------------------------------------------------------------------- receiver


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()
    status: int

    @property
    def payload(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """A loopback HTTP server recording every POST; ``behaviour[path](n)`` gives the status
    answered to the n-th (1-based) request of a message (its webhook-id) on that path."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.behaviour: dict[str, Callable[[int], int]] = {}
        self._counts: dict[tuple[str, str], int] = defaultdict(int)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver._lock:
                    key = (self.path, headers.get("webhook-id", ""))
                    receiver._counts[key] += 1
                    status = receiver.behaviour.get(self.path, lambda n: 200)(receiver._counts[key])
                    receiver.received.append(
                        Received(self.path, headers, body, time.monotonic(), status)
                    )
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def on(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def verified(message: Received, secret: str) -> dict:
    for header in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        assert message.headers.get(header), (header, message.headers)
    assert message.headers["webhook-signature"].startswith("v1,")
    return Webhook(secret).verify(message.body, message.headers)


# ---------------------------------------------------------------------------- API checks (TestClient)


def local_settings(tmp_path: Path, **overrides) -> Settings:
    values = dict(
        data_dir=tmp_path / "var",
        auth_required=False,
        allowed_local_roots=[REPO],
        reaper_interval_s=0,
        scheduler_interval_s=0,
        webhook_interval_s=0,
    )
    values.update(overrides)
    return Settings(**values)


def error_locs(response) -> list[tuple]:
    assert response.status_code == 422, response.text
    return [tuple(error["loc"]) for error in response.json()["detail"]]


def test_bad_and_private_urls_are_422_naming_the_url(tmp_path: Path):
    settings = local_settings(tmp_path, webhook_allow_private_targets=False)
    with TestClient(create_app(settings)) as client:
        for url in [
            "ftp://example.com/hook",
            "not a url",
            "http:///no-host",
            "http://user:pw@93.184.216.34/hook",
        ]:
            assert error_locs(client.post("/webhooks", json={"url": url})) == [("body", "url")]
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://localhost/hook",
            "http://10.1.2.3/hook",
            "http://192.168.0.10/hook",
            "http://169.254.169.254/latest/meta-data",  # cloud metadata
            "http://[::1]/hook",
            "http://[::ffff:127.0.0.1]/hook",
            "http://0.0.0.0/hook",
            "http://100.64.0.1/hook",  # CGNAT
        ]:
            response = client.post("/webhooks", json={"url": url})
            assert error_locs(response) == [("body", "url")], url
            assert "not allowed" in response.json()["detail"][0]["msg"], response.text
        assert error_locs(
            client.post("/webhooks", json={"url": "https://93.184.216.34/h", "event_types": ["x"]})
        ) == [("body", "event_types", 0)]

        # The same check for a job's own callback URL, at submission.
        spec = prune_spec(webhook={"url": "http://10.0.0.7/hook"})
        assert error_locs(client.post("/jobs/prune", json=spec)) == [("body", "webhook", "url")]
        spec = prune_spec(webhook={"url": "gopher://example.com/"})
        assert error_locs(client.post("/jobs/prune", json=spec)) == [("body", "webhook", "url")]

        # A public address is accepted; its secret is shown at creation only.
        created = client.post(
            "/webhooks", json={"url": "https://93.184.216.34/hook", "event_types": ["job.failed"]}
        )
        assert created.status_code == 201, created.text
        endpoint = created.json()
        assert endpoint["secret"].startswith("whsec_") and len(endpoint["secret"]) > 40
        Webhook(endpoint["secret"])  # a valid Standard Webhooks secret
        assert created.headers["location"] == f"/webhooks/{endpoint['id']}"
        listed = client.get("/webhooks").json()
        assert [e["id"] for e in listed] == [endpoint["id"]]
        assert "secret" not in listed[0]
        assert "secret" not in client.get(f"/webhooks/{endpoint['id']}").json()
        # Unknown ids and a retry of an unknown delivery.
        assert client.get("/webhooks/nope").status_code == 404
        assert client.post("/webhooks/deliveries/msg_nope/retry").status_code == 404
        assert client.delete(f"/webhooks/{endpoint['id']}").status_code == 204
        assert client.get(f"/webhooks/{endpoint['id']}").status_code == 404


def test_private_targets_allowed_by_default_only_without_auth(tmp_path: Path):
    # Keyless local mode (loopback only): a developer's receiver on localhost is fine.
    assert local_settings(tmp_path).resolved_webhook_allow_private_targets is True
    assert (
        local_settings(tmp_path, auth_required=True).resolved_webhook_allow_private_targets is False
    )
    with TestClient(create_app(local_settings(tmp_path))) as client:
        response = client.post("/webhooks", json={"url": "http://127.0.0.1:9/hook"})
        assert response.status_code == 201, response.text


def test_job_callback_secret_is_created_on_first_use_and_rotated(
    tmp_path: Path, receiver: Receiver
):
    from service.models import WebhookSigningSecret

    settings = local_settings(tmp_path)
    with TestClient(create_app(settings)) as client:
        dispatcher = WebhookDispatcher(settings, client.app.state.sessionmaker)
        hook = {"url": receiver.url("/rotating")}
        response = client.post("/jobs/prune", json=prune_spec(webhook=hook))
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert response.json()["spec"]["webhook"] == {"url": hook["url"], "event_types": None}
        assert dispatcher.run_once().succeeded  # job.queued, no worker here
        with client.app.state.sessionmaker() as session:
            first = session.get(WebhookSigningSecret, "default").secret  # created on first use
        (queued,) = receiver.on("/rotating")
        assert verified(queued, first)["type"] == "job.queued"

        rotated = client.post("/webhooks/signing-secret")
        assert rotated.status_code == 201, rotated.text
        second = rotated.json()["secret"]
        assert second != first and second.startswith("whsec_")
        assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
        assert dispatcher.run_once().succeeded
        cancelled = receiver.on("/rotating")[-1]
        assert verified(cancelled, second)["type"] == "job.cancelled"
        with pytest.raises(WebhookVerificationError):
            Webhook(first).verify(cancelled.body, cancelled.headers)
        log = client.get(f"/jobs/{job_id}/webhooks").json()
        assert [(d["event_type"], d["endpoint_id"], d["status"]) for d in log] == [
            ("job.queued", None, "succeeded"),
            ("job.cancelled", None, "succeeded"),
        ]
        dispatcher.stop()


def test_pipeline_follow_ups_inherit_the_callback(tmp_path: Path):
    from service.pipeline import followup_specs

    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    hook = {"url": "https://93.184.216.34/pipeline", "event_types": None}
    own = {"url": "https://93.184.216.34/eval-only", "event_types": ["job.succeeded"]}
    evaluation = {"perplexity": {"datasets": ["data/calibration.jsonl"]}}
    with make_sessionmaker(engine)() as session:
        job = create_job(session, "prune", prune_spec(webhook=hook, eval=evaluation))
        ((kind, spec),) = followup_specs(session, job)
        assert kind == "eval" and spec["webhook"] == hook
        job = create_job(
            session, "prune", prune_spec(webhook=hook, eval={**evaluation, "webhook": own})
        )
        ((kind, spec),) = followup_specs(session, job)
        assert spec["webhook"] == own  # a step's own callback wins
        job = create_job(session, "prune", prune_spec(eval=evaluation))
        ((kind, spec),) = followup_specs(session, job)
        assert spec.get("webhook") is None
    engine.dispose()


def test_a_name_is_checked_by_what_it_resolves_to_and_pinned(monkeypatch, tmp_path: Path):
    """DNS is the one part that cannot run here (no resolver for public names): answers are
    substituted for a made-up name. A name is refused when any of its addresses is private,
    and a send connects to the address that was checked (no second lookup to rebind)."""
    import socket

    from service.webhooks import target_error

    answers = {"hooks.example.test": ["93.184.216.34"], "rebound.example.test": ["10.0.0.5"]}

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert target_error("https://hooks.example.test/h", allow_private=False) is None
    # The range is named, not the address: this server's DNS answers are not the tenant's.
    refused = target_error("https://rebound.example.test/h", allow_private=False)
    assert "private use" in refused and "10.0.0.5" not in refused
    assert "does not resolve" in target_error("https://nxdomain.example.test/", False)
    assert target_error("https://rebound.example.test/h", allow_private=True) is None

    dispatcher = WebhookDispatcher(local_settings(tmp_path, auth_required=True), None)
    url, headers, extensions = dispatcher._pinned("https://hooks.example.test:8443/h?x=1")
    assert str(url) == "https://93.184.216.34:8443/h?x=1"
    assert headers == {"host": "hooks.example.test:8443"}
    assert extensions == {"sni_hostname": "hooks.example.test"}  # TLS still checks the name
    answers["hooks.example.test"] = ["93.184.216.34", "127.0.0.1"]  # DNS changed since
    result = dispatcher.send("https://hooks.example.test/h", "msg_x", "{}", new_secret())
    assert result.status_code is None and result.error.startswith("refused:")


# ---------------------------------------------------------------------------- outbox and dispatcher


@pytest.fixture(scope="module")
def pg_sessions(postgres_url):
    engine = make_engine(postgres_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def add_endpoint(session, tenant: str, url: str, event_types=None) -> WebhookEndpoint:
    row = WebhookEndpoint(
        id=new_job_id(),
        tenant=tenant,
        url=url,
        secret=new_secret(),
        event_types=event_types,
        enabled=True,
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    return row


def deliveries_of(session, job_id: str) -> list[WebhookDelivery]:
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
            .execution_options(populate_existing=True)
        )
    )


def test_outbox_is_written_and_rolled_back_with_the_state_change(pg_sessions):
    tenant = "outbox"
    with pg_sessions() as session:
        everything = add_endpoint(session, tenant, "https://93.184.216.34/all")
        add_endpoint(session, tenant, "https://93.184.216.34/final", ["job.succeeded"])
        add_endpoint(session, "someone-else", "https://93.184.216.34/other")
        job = create_job(session, "prune", prune_spec(), tenant=tenant)
        rows = deliveries_of(session, job.id)
        assert [(r.endpoint_id, r.event_type) for r in rows] == [(everything.id, "job.queued")]
        payload = rows[0].payload
        assert payload["type"] == "job.queued" and payload["data"]["id"] == job.id
        assert payload["data"]["status"] == "queued" and payload["data"]["tenant"] == tenant
        assert payload["data"]["links"]["job"] == f"/jobs/{job.id}"

        # A state change that rolls back leaves no notification behind.
        session.execute(update(Job).where(Job.id == job.id).values(status="running"))
        append_event(session, job.id, "status", "running", {"status": "running"})
        session.flush()
        assert len(deliveries_of(session, job.id)) == 2  # written in the same transaction
        session.rollback()
        assert [r.event_type for r in deliveries_of(session, job.id)] == ["job.queued"]
        assert get_job(session, job.id).status == "queued"

        # Committed, it is there; a cancel request (no state change) notifies nothing.
        assert claim_job(session, job.id, "w1") is not None
        request_cancel(session, job.id)
        assert [r.event_type for r in deliveries_of(session, job.id)] == [
            "job.queued",
            "job.running",
        ]
        assert finish_job(session, job.id, "cancelled", message="cancelled")
        types = [(r.endpoint_id, r.event_type) for r in deliveries_of(session, job.id)]
        assert types == [
            (everything.id, "job.queued"),
            (everything.id, "job.running"),
            (everything.id, "job.cancelled"),
        ]
        times = [r.created_at for r in deliveries_of(session, job.id)]
        assert times == sorted(times) and len(set(times)) == 3


def test_a_requeue_by_the_reaper_is_notified(pg_sessions):
    with pg_sessions() as session:
        endpoint = add_endpoint(session, "requeue", "https://93.184.216.34/requeue")
        job = create_job(session, "prune", prune_spec(), tenant="requeue")
        claim_job(session, job.id, "w1", lease_ttl_s=0.01)
        time.sleep(0.05)
        reaped = reap_expired_leases(session, max_attempts=3)
        assert [r.job_id for r in reaped if r.action == "requeued"] == [job.id]
        rows = deliveries_of(session, job.id)
        assert [r.event_type for r in rows] == ["job.queued", "job.running", "job.requeued"]
        assert {r.endpoint_id for r in rows} == {endpoint.id}
        assert rows[2].payload["data"]["status"] == "queued"
        assert rows[2].payload["data"]["attempt"] == 1


def test_dispatcher_keeps_a_jobs_messages_in_order_and_claims_each_once(
    pg_sessions, receiver: Receiver, tmp_path: Path
):
    settings = local_settings(
        tmp_path,
        webhook_retry_schedule_s=[0.3, 0.6],
        webhook_retry_jitter=0.0,
        webhook_allow_private_targets=True,
    )
    first, second = (
        WebhookDispatcher(settings, pg_sessions),
        WebhookDispatcher(settings, pg_sessions),
    )
    answers = iter([500])  # the first request on the path fails, every other succeeds
    receiver.behaviour["/ordered"] = lambda n: next(answers, 200)
    tenant = "ordered"
    with pg_sessions() as session:
        # Only this test's messages are due (the outbox test's targets are not reachable).
        session.execute(update(WebhookDelivery).values(status="failed"))
        session.commit()
        endpoint = add_endpoint(session, tenant, receiver.url("/ordered"))
        job = create_job(session, "prune", prune_spec(), tenant=tenant)
        claim_job(session, job.id, "w1")
        queued, running = deliveries_of(session, job.id)

    claims = first.claim()
    assert [c.delivery_id for c in claims] == [queued.id]  # running waits for queued
    assert second.claim() == []  # already claimed, and the other one held back
    assert first.deliver(claims[0]) == "retrying"  # 500
    assert first.claim() == [] and second.claim() == []  # queued waits for its retry
    time.sleep(0.35)
    assert first.run_once().succeeded == [queued.id]
    assert second.run_once().succeeded == [running.id]
    got = [(m.headers["webhook-id"], m.status) for m in receiver.on("/ordered")]
    assert got == [(queued.id, 500), (queued.id, 200), (running.id, 200)]
    for message in receiver.on("/ordered"):
        assert verified(message, endpoint.secret)["data"]["id"] == job.id

    # Two dispatchers racing over many due messages never take the same one.
    with pg_sessions() as session:
        many = add_endpoint(session, "many", "https://93.184.216.34/many")
        for _ in range(30):
            create_job(session, "prune", prune_spec(), tenant="many")
        ids = set(
            session.scalars(
                select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == many.id)
            )
        )
    results: dict[str, list] = {}
    barrier = threading.Barrier(2)

    def take(name: str, dispatcher: WebhookDispatcher) -> None:
        barrier.wait()
        results[name] = [c.delivery_id for c in dispatcher.claim(limit=100)]

    threads = [threading.Thread(target=take, args=(n, d)) for n, d in (("a", first), ("b", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken_a, taken_b = set(results["a"]) & ids, set(results["b"]) & ids
    assert not taken_a & taken_b
    assert taken_a | taken_b == ids
    first.stop()
    second.stop()


def test_send_time_checks_and_unreachable_targets(tmp_path: Path, receiver: Receiver):
    """A target registered while allowed (or whose DNS changed since) is refused at send
    time; a closed port is logged as an error without a status code, then retried."""
    url = f"sqlite:///{tmp_path / 'wh.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    strict = local_settings(
        tmp_path, auth_required=True, webhook_retry_schedule_s=[60.0], webhook_timeout_s=2.0
    )
    assert strict.resolved_webhook_allow_private_targets is False
    dispatcher = WebhookDispatcher(strict, sessions)
    with sessions() as session:
        add_endpoint(session, "t", receiver.url("/must-not-arrive"))
        add_endpoint(session, "t", f"http://127.0.0.1:{free_port()}/closed")
        job = create_job(session, "prune", prune_spec(), tenant="t")
    report = dispatcher.run_once()
    assert len(report.retrying) == 2
    assert receiver.on("/must-not-arrive") == []
    with sessions() as session:
        rows = {r.url.rsplit("/", 1)[-1]: r for r in deliveries_of(session, job.id)}
        attempts = {a.delivery_id: a for a in session.scalars(select(WebhookAttempt))}
    refused = attempts[rows["must-not-arrive"].id]
    assert refused.status_code is None and refused.error.startswith("refused:")
    assert "127.0.0.1" in refused.error
    assert rows["must-not-arrive"].status == "pending"
    assert rows["must-not-arrive"].next_attempt_at > utcnow() + timedelta(seconds=40)
    # Allowed (the keyless default), the same dispatcher code reaches the closed port.
    lenient = WebhookDispatcher(
        local_settings(tmp_path, webhook_retry_schedule_s=[60.0], webhook_timeout_s=2.0),
        sessions,
    )
    with sessions() as session:
        session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))
        session.commit()
    lenient.run_once()
    with sessions() as session:
        closed = session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id == rows["closed"].id)
            .order_by(WebhookAttempt.attempt)
        ).all()
        final = session.get(WebhookDelivery, rows["closed"].id)
    assert [a.status_code for a in closed] == [None, None]
    assert closed[0].error.startswith("refused:") and "ConnectError" in closed[1].error
    assert final.status == "failed" and final.attempts == 2  # schedule of one retry: 2 tries
    dispatcher.stop()
    lenient.stop()
    engine.dispose()


# ---------------------------------------------------------------------------- end to end

SCHEDULE = [0.4, 1.2, 2.4]  # 4 tries; the e2e API retries fast


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver: Receiver):
    """API (uvicorn) + Celery worker on Redis and PostgreSQL, API keys required."""
    root = tmp_path_factory.mktemp("webhooks")
    with redis_namespace() as (broker_url, queue), postgres_database() as database_url:
        upgrade_database(database_url)
        engine = make_engine(database_url)
        sessions = make_sessionmaker(engine)
        keys = {}
        for name, tenant, role in [
            ("acme", "acme", "member"),
            ("globex", "globex", "member"),
            ("admin", "ops", "admin"),
        ]:
            with sessions() as session:
                keys[name] = create_api_key(session, tenant, role)[1]
        env = base_env(
            {
                "SHORTENED_DATABASE_URL": database_url,
                "SHORTENED_BROKER_URL": broker_url,
                "SHORTENED_QUEUE": queue,
                "SHORTENED_DATA_DIR": str(root / "var"),
                "SHORTENED_AUTH_REQUIRED": "true",
                "SHORTENED_ALLOWED_LOCAL_ROOTS": json.dumps([str(REPO)]),
                "SHORTENED_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",  # the receiver is loopback
                "SHORTENED_WEBHOOK_INTERVAL_S": "0.1",
                "SHORTENED_WEBHOOK_RETRY_SCHEDULE_S": json.dumps(SCHEDULE),
                "SHORTENED_WEBHOOK_RETRY_JITTER": "0.1",
                "SHORTENED_SCHEDULER_INTERVAL_S": "0",
            }
        )
        worker = start_worker(env, queue, root / "worker.log")
        try:
            api_process, url = start_api(env, free_port(), root / "api.log")
            clients = {
                name: httpx.Client(
                    base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"}
                )
                for name, key in keys.items()
            }
            try:
                yield {"worker": worker, "api_log": api_process.log, **clients}
            finally:
                for client in clients.values():
                    client.close()
                api_process.stop()
        finally:
            worker.stop(timeout=60)
            engine.dispose()


def create_endpoint(api: httpx.Client, url: str, **body) -> dict:
    response = api.post("/webhooks", json={"url": url, **body})
    assert response.status_code == 201, response.text
    return response.json()


def submit(api: httpx.Client, spec: dict) -> str:
    response = api.post("/jobs/prune", json=spec)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def for_job(messages: list[Received], job_id: str) -> list[Received]:
    return [m for m in messages if m.payload["data"]["id"] == job_id]


def job_webhooks(api: httpx.Client, job_id: str) -> list[dict]:
    response = api.get(f"/jobs/{job_id}/webhooks")
    assert response.status_code == 200, response.text
    return response.json()


def failing_spec(**overrides) -> dict:
    """A job the worker fails at once: only its notifications matter."""
    return failing_in_worker_spec(**overrides)


@pytest.fixture(scope="module")
def pruned(stack, receiver: Receiver) -> dict:
    """A tenant endpoint and a per-job callback, then one real prune job to completion."""
    acme = stack["acme"]
    endpoint = create_endpoint(acme, receiver.url("/acme"), description="all events")
    signing = acme.post("/webhooks/signing-secret")
    assert signing.status_code == 201, signing.text
    callback = {"url": receiver.url("/callback"), "event_types": ["job.running", "job.succeeded"]}
    job_id = submit(acme, prune_spec(webhook=callback))
    job = wait_for_job(acme, job_id, worker=stack["worker"], timeout=240)
    assert job["status"] == "succeeded", job
    wait_until(
        lambda: (
            len(for_job(receiver.on("/acme"), job_id)) >= 3 and len(receiver.on("/callback")) >= 2
        ),
        30,
        "the job's notifications",
    )
    # A receiver answers before the dispatcher records the answer: wait for every delivery
    # of the job's five messages to leave "pending" before the tests read the log.
    wait_until(
        lambda: (
            len(log := job_webhooks(acme, job_id)) >= 5
            and all(d["status"] != "pending" for d in log)
        ),
        30,
        "the job's delivery log",
    )
    return {
        "job_id": job_id,
        "job": job,
        "endpoint": endpoint,
        "signing_secret": signing.json()["secret"],
    }


@pytest.mark.e2e
def test_endpoint_receives_signed_state_changes_in_order(stack, receiver: Receiver, pruned):
    job_id, secret = pruned["job_id"], pruned["endpoint"]["secret"]
    messages = for_job(receiver.on("/acme"), job_id)
    payloads = [verified(m, secret) for m in messages]
    assert [p["type"] for p in payloads] == ["job.queued", "job.running", "job.succeeded"]
    assert all(m.status == 200 for m in messages)
    for payload in payloads:
        data = payload["data"]
        assert data["id"] == job_id and data["kind"] == "prune" and data["tenant"] == "acme"
        assert data["links"]["job"] == f"/jobs/{job_id}"
        assert payload["timestamp"]
    assert [p["data"]["status"] for p in payloads] == ["queued", "running", "succeeded"]
    assert payloads[2]["data"]["error"] is None
    summary = payloads[2]["data"]["result"]
    assert summary["removed_blocks"] == pruned["job"]["result"]["removed_blocks"]
    assert len(json.dumps(payloads[2])) < 4096  # small: the rest is behind links.job
    assert "secret" not in json.dumps(payloads)

    # A tampered body, a different secret or a replayed header set fails verification.
    message = messages[-1]
    tampered = message.body.replace(b'"job.succeeded"', b'"job.failed"')
    assert tampered != message.body
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, message.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(message.body, message.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(message.body, {**message.headers, "webhook-id": "msg_other"})

    # The delivery log: one message per event and URL, each with its single 200 try.
    log = job_webhooks(stack["acme"], job_id)
    assert [d["event_type"] for d in log] == [  # in the job's order
        "job.queued",
        "job.running",
        "job.running",
        "job.succeeded",
        "job.succeeded",
    ]
    assert {(d["event_type"], d["endpoint_id"]) for d in log} == {
        ("job.queued", pruned["endpoint"]["id"]),
        ("job.running", pruned["endpoint"]["id"]),
        ("job.running", None),  # the job's own callback
        ("job.succeeded", pruned["endpoint"]["id"]),
        ("job.succeeded", None),
    }
    assert all(d["status"] == "succeeded" and d["delivered_at"] for d in log)
    assert all([a["status_code"] for a in d["attempt_log"]] == [200] for d in log)
    sent_ids = {m.headers["webhook-id"] for m in receiver.on("/acme") + receiver.on("/callback")}
    assert {d["id"] for d in log} <= sent_ids
    listed = (
        stack["acme"]
        .get(
            "/webhooks/deliveries",
            params={"job_id": job_id, "endpoint_id": pruned["endpoint"]["id"]},
        )
        .json()
    )
    assert [d["event_type"] for d in listed["items"]] == [
        "job.succeeded",
        "job.running",
        "job.queued",
    ]  # newest first


@pytest.mark.e2e
def test_per_job_callback_gets_only_its_jobs_chosen_events(stack, receiver: Receiver, pruned):
    job_id = pruned["job_id"]
    messages = receiver.on("/callback")
    payloads = [verified(m, pruned["signing_secret"]) for m in messages]
    assert [p["type"] for p in payloads] == ["job.running", "job.succeeded"]
    assert {p["data"]["id"] for p in payloads} == {job_id}
    # Another job of the tenant, without a callback: the endpoint hears of it, the callback not.
    other = submit(stack["acme"], failing_spec())
    wait_for_job(stack["acme"], other, worker=stack["worker"], timeout=120)
    wait_until(
        lambda: (
            [m.payload["type"] for m in for_job(receiver.on("/acme"), other)]
            == ["job.queued", "job.running", "job.failed"]
        ),
        30,
        "the other job's notifications",
    )
    failed = for_job(receiver.on("/acme"), other)[-1].payload["data"]
    assert failed["status"] == "failed" and failed["error"]["code"]
    assert {m.payload["data"]["id"] for m in receiver.on("/callback")} == {job_id}


@pytest.mark.e2e
def test_retried_with_growing_gaps_until_it_succeeds(stack, receiver: Receiver):
    receiver.behaviour["/flaky"] = lambda n: 500 if n <= 2 else 200
    acme = stack["acme"]
    job_id = submit(
        acme, failing_spec(webhook={"url": receiver.url("/flaky"), "event_types": ["job.queued"]})
    )

    def delivered():
        log = [d for d in job_webhooks(acme, job_id) if d["endpoint_id"] is None]
        return log if log and log[0]["status"] == "succeeded" else None

    (delivery,) = wait_until(delivered, 30, "the flaky callback to succeed")
    assert [a["status_code"] for a in delivery["attempt_log"]] == [500, 500, 200]
    assert [a["attempt"] for a in delivery["attempt_log"]] == [1, 2, 3]
    assert delivery["attempt_log"][0]["error"].startswith("HTTP 500")
    assert delivery["attempt_log"][2]["error"] is None and delivery["last_status_code"] == 200
    # The receiver saw the same message three times, and the waits grew.
    tries = receiver.on("/flaky")
    assert [m.status for m in tries] == [500, 500, 200]
    assert len({m.headers["webhook-id"] for m in tries}) == 1
    assert tries[0].body == tries[2].body
    gaps = [b.at - a.at for a, b in zip(tries, tries[1:], strict=False)]
    assert SCHEDULE[0] * 0.9 <= gaps[0] < gaps[1], gaps
    assert gaps[1] >= SCHEDULE[1] * 0.9, gaps
    print(f"\nretry gaps: {[round(g, 2) for g in gaps]} s (schedule {SCHEDULE}, +-10%)")


@pytest.mark.e2e
def test_gives_up_after_the_last_try_and_can_be_retried(stack, receiver: Receiver):
    receiver.behaviour["/down"] = lambda n: 503
    acme = stack["acme"]
    job_id = submit(
        acme, failing_spec(webhook={"url": receiver.url("/down"), "event_types": ["job.queued"]})
    )

    def given_up():
        log = [d for d in job_webhooks(acme, job_id) if d["endpoint_id"] is None]
        return log[0] if log and log[0]["status"] == "failed" else None

    delivery = wait_until(given_up, 30, "the callback to be given up")
    tries = len(SCHEDULE) + 1
    assert [a["status_code"] for a in delivery["attempt_log"]] == [503] * tries
    assert delivery["attempts"] == tries and delivery["next_attempt_at"] is None
    assert delivery["last_error"].startswith("HTTP 503")
    assert len(receiver.on("/down")) == tries
    failed = acme.get("/webhooks/deliveries", params={"status": "failed", "job_id": job_id})
    assert [d["id"] for d in failed.json()["items"]] == [delivery["id"]]

    # The receiver is back: a manual retry sends the same message again.
    receiver.behaviour["/down"] = lambda n: 200
    response = acme.post(f"/webhooks/deliveries/{delivery['id']}/retry")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending"

    def redelivered():
        row = next(d for d in job_webhooks(acme, job_id) if d["id"] == delivery["id"])
        return row if row["status"] == "succeeded" else None

    row = wait_until(redelivered, 30, "the retried delivery")
    assert [a["status_code"] for a in row["attempt_log"]] == [503] * tries + [200]
    assert [a["attempt"] for a in row["attempt_log"]] == list(range(1, tries + 2))
    assert receiver.on("/down")[-1].headers["webhook-id"] == delivery["id"]
    # Only failed messages are retried.
    assert acme.post(f"/webhooks/deliveries/{delivery['id']}/retry").status_code == 409


@pytest.mark.e2e
def test_tenants_see_only_their_own_endpoints_and_deliveries(stack, pruned):
    acme, globex, admin = stack["acme"], stack["globex"], stack["admin"]
    endpoint_id, job_id = pruned["endpoint"]["id"], pruned["job_id"]
    acme_delivery = job_webhooks(acme, job_id)[0]["id"]

    assert globex.get("/webhooks").json() == []
    assert globex.get(f"/webhooks/{endpoint_id}").status_code == 404
    assert globex.delete(f"/webhooks/{endpoint_id}").status_code == 404
    assert globex.get(f"/jobs/{job_id}/webhooks").status_code == 404
    assert globex.post(f"/webhooks/deliveries/{acme_delivery}/retry").status_code == 404
    assert globex.get("/webhooks/deliveries").json()["items"] == []
    assert globex.get("/webhooks/deliveries", params={"job_id": job_id}).json()["items"] == []
    assert (
        globex.get("/webhooks/deliveries", params={"endpoint_id": endpoint_id}).json()["items"]
        == []
    )
    # globex's own endpoint is its own; acme does not see it; an admin sees both.
    mine = create_endpoint(globex, "http://127.0.0.1:9/globex")
    assert [e["id"] for e in globex.get("/webhooks").json()] == [mine["id"]]
    assert mine["id"] not in {e["id"] for e in acme.get("/webhooks").json()}
    assert {endpoint_id, mine["id"]} <= {e["id"] for e in admin.get("/webhooks").json()}
    assert admin.get(f"/jobs/{job_id}/webhooks").status_code == 200
    # Without a key: 401.
    anonymous = httpx.get(str(acme.base_url) + "/webhooks")
    assert anonymous.status_code == 401
    # Deleting an endpoint fails its undelivered messages and keeps the log.
    assert globex.delete(f"/webhooks/{mine['id']}").status_code == 204
    assert globex.get(f"/webhooks/{mine['id']}").status_code == 404


def test_dispatcher_runs_alone_as_a_module(tmp_path: Path, receiver: Receiver):
    """`python -m service.webhooks --once` sends what is due (a deployment without the
    dispatcher thread in the API)."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'alone.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        endpoint = add_endpoint(session, "default", receiver.url("/alone"))
        job = create_job(session, "prune", prune_spec())
    env = base_env({"SHORTENED_DATABASE_URL": url, "SHORTENED_DATA_DIR": str(tmp_path)})
    done = subprocess.run(
        [sys.executable, "-m", "service.webhooks", "--once"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (message,) = receiver.on("/alone")
    assert verified(message, endpoint.secret)["data"]["id"] == job.id
    with sessions() as session:
        assert (
            session.scalar(select(func.count()).where(WebhookDelivery.status == "succeeded")) == 1
        )
    engine.dispose()
