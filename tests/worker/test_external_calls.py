"""Calls to infrastructure the service does not own, against hostile names and servers: registered-model names are refused at admission
exactly where MLflow's own validator refuses them, registered names are scoped per tenant, a
slow-drip tracking server holds a job no longer than the whole-call deadline, and no URI with
user-info nor a client library's raw text reaches a response or an event."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.db import make_engine, make_sessionmaker, upgrade_database
from service.stores.events import list_events
from service.stores.job_admission import create_job
from shortened.config import Settings
from shortened.deadline import DeadlineExceeded, call_with_deadline
from shortened.redact import redact_uri
from shortened.specs import MlflowTrackingSpec
from worker.tracking import registered_name, start_tracking

HOSTILE_NAMES = ["a/b", "a:b", "./a", "../a", "a/../b", "", " ", ".", "..", "/abs", "x" * 300,
                 "name\n", "a\\b", "ümlaut", "-lead"]  # fmt: skip


def mlflow_accepts(name: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException:
        return False
    return True


def spec_accepts(name: str) -> bool:
    try:
        MlflowTrackingSpec(experiment="e", register_as=name)
    except ValidationError as exc:
        assert exc.errors()[0]["loc"] == ("register_as",)
        return False
    return True


@given(st.text(alphabet="ab/:. _-@+\\\n", max_size=12))
@settings(max_examples=300, deadline=None)
def test_every_name_admission_accepts_mlflow_accepts(name: str) -> None:
    if spec_accepts(name):
        assert mlflow_accepts(name), name


def test_names_mlflow_refuses_are_refused_at_admission() -> None:
    for name in HOSTILE_NAMES:
        if not mlflow_accepts(name):
            assert not spec_accepts(name), name
    assert spec_accepts("tiny-llama pruned.v2@prod")


def test_registered_names_are_scoped_per_tenant() -> None:
    scoped = Settings(mlflow_registry_scope="tenant")
    assert registered_name("model", "acme", scoped) == "acme.model"
    assert registered_name("model", "ac/me:x", scoped) == "ac-me-x.model"
    assert mlflow_accepts(registered_name("model", "ac/me:x", scoped))
    assert registered_name("model", "acme", Settings(mlflow_registry_scope="global")) == "model"


def test_uris_are_shown_without_credentials() -> None:
    assert redact_uri("https://user:s3cret@mlflow.internal:5000/api?token=abc#x") == (
        "https://mlflow.internal:5000/api"
    )
    assert redact_uri("http://[::1]:8080/") == "http://[::1]:8080/"
    settings_ = Settings(
        mlflow_tracking_uri="https://svc:pw1@mlflow.a",
        mlflow_allowed_tracking_uris=["https://svc:pw2@mlflow.b?key=k"],
    )
    refusal = settings_.mlflow_uri_refusal("https://elsewhere.example")
    assert refusal is not None and "mlflow.b" in refusal
    assert "pw1" not in refusal and "pw2" not in refusal and "key=k" not in refusal


def test_a_call_past_its_deadline_is_abandoned() -> None:
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        call_with_deadline(lambda: time.sleep(30), 0.5, "a slow call")
    assert time.monotonic() - started < 5
    assert call_with_deadline(lambda: 42, 5, "a quick call") == 42
    with pytest.raises(ZeroDivisionError):
        call_with_deadline(lambda: 1 / 0, 5, "a failing call")


@pytest.fixture
def drip_server():
    """An HTTP server that answers every request one byte every half second, status line and
    headers included (never finishing within a minute): each read is quick, the call is not."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b" " * 100
            for byte in answer:
                if stop.wait(0.5):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed at the end of the test
                return
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


def test_a_slow_drip_tracking_server_holds_a_job_no_longer_than_the_deadline(
    drip_server: str, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade_database(url)
    sessions = make_sessionmaker(make_engine(url))
    # The operator's URI carries credentials: they must not reach the job's events.
    uri = drip_server.replace("http://", "http://svc:hunter2@")
    settings_ = Settings(
        data_dir=tmp_path / "var",
        database_url=url,
        mlflow_tracking_uri=uri,
        mlflow_request_timeout_s=5,
        mlflow_request_retries=0,
        mlflow_call_deadline_s=2,
    )
    with sessions() as session:
        job = create_job(session, "prune", {"model": "m", "num_blocks": 1})
        session.commit()
    started = time.monotonic()
    tracking = start_tracking(sessions, job, settings_)
    tracking.end("succeeded", {"params_after": 1}, tmp_path)
    assert time.monotonic() - started < 10  # the deadline, not the server's minute
    with sessions() as session:
        events = [e.message for e in list_events(session, job.id)]
    warnings = [m for m in events if m.startswith("mlflow:")]
    assert warnings and "no answer in time" in warnings[0] and "without tracking" in warnings[0]
    assert not any("hunter2" in m or "svc:" in m for m in events)


def test_a_slow_drip_webhook_receiver_holds_a_send_no_longer_than_its_deadline(
    drip_server: str, tmp_path: Path
) -> None:
    import base64

    from service.webhooks.dispatcher import WebhookDispatcher

    settings_ = Settings(
        data_dir=tmp_path / "var", webhook_timeout_s=1, webhook_allow_private_targets=True
    )
    dispatcher = WebhookDispatcher(settings_, sessions=None)  # type: ignore[arg-type]
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    started = time.monotonic()
    result = dispatcher.send(drip_server + "/hook", "msg_1", "{}", secret)
    assert time.monotonic() - started < 8  # 2 x the timeout, not the receiver's minute
    assert result.error is not None and "no complete answer within 2 s" in result.error


def test_a_slow_drip_object_store_holds_an_admission_no_longer_than_its_deadline(
    drip_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shortened.admission import Unknown, s3_lookups

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    lookups = s3_lookups(drip_server, timeout_s=1)
    assert lookups.s3_head is not None
    started = time.monotonic()
    with pytest.raises(Unknown, match="no answer in time"):
        lookups.s3_head("s3://bucket/model/config.json")
    assert time.monotonic() - started < 8  # 2 x the timeout: the store is not held against it
