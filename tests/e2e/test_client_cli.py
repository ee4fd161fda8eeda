"""The typed client (``shortened.client``) and ``shortened jobs ...`` against a real service:
the API under uvicorn (API keys required), a real Celery worker on Redis, PostgreSQL, a
local artifact directory, and a second API serving the same jobs from S3 (moto) so that
presigned-URL downloads are covered too. The CLI runs as a real subprocess, once on a
pseudo-terminal to see its progress bar.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import httpx
import pytest

from shortened.client import ShortenedAPIError, ShortenedClient
from shortened.specs import CalibrationSpec, PruneSpec
from tests.e2e_service import (
    CALIBRATION,
    FINISHED,
    REPO,
    base_env,
    free_port,
    generate,
    postgres_database,
    prune_spec,
    redis_namespace,
    s3_bucket,
    start_api,
    wait_until,
    worker_and_api,
)

pytestmark = pytest.mark.e2e

SHORTENED = Path(sys.executable).with_name("shortened")  # the installed console script
CLI = [str(SHORTENED)] if SHORTENED.exists() else [sys.executable, "-m", "shortened.cli"]


class RecordingTransport(httpx.HTTPTransport):
    """The real HTTP transport, remembering each request and the status it got."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[tuple[httpx.Request, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.exchanges.append((request, response.status_code))
        return response


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """API (keys required; tenant 'limited' may have one active job) + worker, sharing a
    PostgreSQL job store and a local artifact directory."""
    from service.auth import create_api_key
    from service.db import make_engine, make_sessionmaker, upgrade_database

    root = tmp_path_factory.mktemp("client")
    with redis_namespace() as (broker_url, queue), postgres_database() as database_url:
        upgrade_database(database_url)
        engine = make_engine(database_url)
        with make_sessionmaker(engine)() as session:
            key = create_api_key(session, "acme")[1]
            limited_key = create_api_key(session, "limited")[1]
        engine.dispose()
        common = {
            "SHORTENED_DATABASE_URL": database_url,
            "SHORTENED_BROKER_URL": broker_url,
            "SHORTENED_QUEUE": queue,
            "SHORTENED_ARTIFACTS_URL": f"file://{root / 'artifacts'}",
            "SHORTENED_AUTH_REQUIRED": "true",
            "SHORTENED_TENANT_LIMITS": json.dumps({"limited": {"max_concurrent_jobs": 1}}),
        }
        with worker_and_api(common, queue, root) as (worker, url):
            yield {
                "url": url,
                "key": key,
                "limited_key": limited_key,
                "worker": worker,
                "root": root,
                "common": common,
            }


def cli(stack, *args: str, key: str | None = None, stdin: str | None = None, timeout: float = 300):
    env = base_env({"SHORTENED_URL": stack["url"], "SHORTENED_API_KEY": key or stack["key"]})
    result = subprocess.run(
        [*CLI, "jobs", *args],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def client(stack, **kwargs) -> ShortenedClient:
    return ShortenedClient(stack["url"], api_key=kwargs.pop("api_key", stack["key"]), **kwargs)


def tiny_spec(**overrides) -> dict:
    return prune_spec(**{"num_blocks": 1, **overrides})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_job(stack, tmp_path_factory):
    """`jobs submit prune SPEC --wait` through the CLI, piped (no terminal): its result."""
    spec_file = tmp_path_factory.mktemp("spec") / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec()))
    started = time.monotonic()
    result = cli(stack, "submit", "prune", str(spec_file), "--wait", "--poll-interval", "0.2")
    return {"result": result, "seconds": time.monotonic() - started}


# ---------------------------------------------------------------------------- the happy path


def test_submit_wait_download_gives_a_loadable_verified_checkpoint(
    stack, finished_job, tmp_path: Path
):
    result = finished_job["result"]
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert len(job_id) == 32 and result.stdout.count("\n") == 1  # only the id on stdout
    # Not a terminal: plain stage lines, no progress bar.
    assert f"job {job_id} succeeded" in result.stderr
    assert "[" in result.stderr and "%|" not in result.stderr
    assert "removed blocks [" in result.stderr and "12 -> 11 layers" in result.stderr

    download = cli(stack, "download", job_id, str(tmp_path / "model"))
    assert download.returncode == 0, download.stderr
    with client(stack) as api:
        job = api.get(job_id)
        links = api.artifacts(job_id)
    assert job.succeeded and job.result and job.result["num_layers_after"] == 11
    names = {link.name for link in links}
    assert {"config.json", "model.safetensors", "report.json"} <= names
    assert {a.name for a in job.artifacts or []} == names
    assert all(link.url.startswith(f"/jobs/{job_id}/artifacts/") for link in links)  # API paths
    for link in links:
        path = tmp_path / "model" / link.name
        assert path.stat().st_size == link.size and sha256(path) == link.sha256
    assert sorted(download.stdout.split()) == sorted(str(tmp_path / "model" / n) for n in names)
    assert not [p for p in (tmp_path / "model").rglob("*") if p.name.endswith(".part")]
    assert json.loads((tmp_path / "model" / "config.json").read_text())["num_hidden_layers"] == 11
    assert generate(tmp_path / "model")  # loads with transformers and generates

    # Downloading again keeps the verified files: only the artifact list is requested.
    transport = RecordingTransport()
    with client(stack, transport=transport) as api:
        again = api.download(job_id, tmp_path / "model")
    assert sorted(p.name for p in again) == sorted(names)
    assert [r.url.path for r, _ in transport.exchanges] == [f"/jobs/{job_id}/artifacts"]


def test_get_and_list(stack, finished_job):
    job_id = finished_job["result"].stdout.strip()

    got = cli(stack, "get", job_id, "--json")
    assert got.returncode == 0, got.stderr
    body = json.loads(got.stdout)
    assert body["id"] == job_id and body["status"] == "succeeded" and body["kind"] == "prune"
    assert body["spec"]["num_blocks"] == 1 and body["result"]["num_layers_after"] == 11

    human = cli(stack, "get", job_id)
    assert human.returncode == 0, human.stderr
    lines = dict(line.split(None, 1) for line in human.stdout.splitlines())
    assert lines["job"] == job_id and lines["status"] == "succeeded" and lines["kind"] == "prune"
    assert lines["result"].startswith("removed blocks [") and "-> 11 layers" in lines["result"]
    assert lines["artifacts"].split()[0] == str(len(body["artifacts"]))

    table = cli(stack, "list", "--limit", "5")
    assert table.returncode == 0, table.stderr
    [row] = [line for line in table.stdout.splitlines() if job_id in line]
    assert row.split()[1:3] == ["prune", "succeeded"]  # id, kind, status, stage, ...
    header = table.stdout.splitlines()[0].split()
    assert header == ["id", "kind", "status", "stage", "progress", "created"]

    only_failed = json.loads(cli(stack, "list", "--status", "failed", "--json").stdout)
    assert job_id not in [j["id"] for j in only_failed["items"]]
    listed = json.loads(cli(stack, "list", "--kind", "prune", "--json").stdout)
    assert job_id in [j["id"] for j in listed["items"]]


# ---------------------------------------------------------------------------- cancel, progress bar


def test_wait_on_a_terminal_draws_a_bar_and_cancel_stops_the_job(stack, finished_job):
    """A slow job (iterative perplexity: many scored blocks); `jobs wait` on a terminal shows
    a tqdm bar, `jobs cancel` stops the job, and the wait exits 1 naming the outcome. A job
    queued behind it is cancelled at once."""
    spec = tiny_spec(
        criterion="iterative_ppl",
        num_blocks=4,
        protect_first=1,
        protect_last=1,
        calibration={"source": str(CALIBRATION), "n_samples": 16},
    )
    submitted = cli(stack, "submit", "prune", "-", stdin=json.dumps(spec))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    queued = cli(stack, "submit", "prune", "-", stdin=json.dumps(tiny_spec()))
    queued_id = queued.stdout.strip()

    with client(stack) as api:

        def scoring():
            job = api.get(job_id)
            return (
                job if job.finished or (job.stage == "scoring" and job.progress.done >= 1) else None
            )

        assert (
            wait_until(scoring, 300, "scoring", stack["worker"], interval=0.1).status == "running"
        )

        cancelled = cli(stack, "cancel", queued_id)
        assert (
            cancelled.returncode == 0 and cancelled.stdout.strip() == f"job {queued_id} cancelled"
        )
        assert api.get(queued_id).status == "cancelled"

        # `jobs wait` with its stderr on a pseudo-terminal.
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # rows, columns
        env = base_env(
            {"SHORTENED_URL": stack["url"], "SHORTENED_API_KEY": stack["key"], "COLUMNS": "120"}
        )
        waiting = subprocess.Popen(
            [*CLI, "jobs", "wait", job_id, "--poll-interval", "0.2"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
        )
        os.close(slave)
        screen = bytearray()

        def read() -> None:
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    return
                if not data:
                    return
                screen.extend(data)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            wait_until(lambda: b"%|" in screen, 60, "a progress bar on the terminal")
            cancel = cli(stack, "cancel", job_id)
            assert cancel.returncode == 0, cancel.stderr
            assert "cancel requested" in cancel.stdout
            assert waiting.wait(timeout=120) == 1
        finally:
            if waiting.poll() is None:
                waiting.kill()
            reader.join(timeout=10)
            os.close(master)
        text = screen.decode(errors="replace")
        assert "[scoring]" in text and "blocks" in text  # stage line, then the bar's unit
        assert f"job {job_id} was cancelled" in text
        assert api.get(job_id).status == "cancelled"

        again = cli(stack, "cancel", job_id)
        assert (
            again.returncode == 1 and "409" in again.stderr and "already cancelled" in again.stderr
        )


# ---------------------------------------------------------------------------- errors


def test_bad_spec_is_a_usage_error_naming_the_field(stack, tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tiny_spec(num_blocks=0)))
    result = cli(stack, "submit", "prune", str(bad))
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line == (
        "shortened jobs submit: error: 422 spec.num_blocks: Input should be greater than or equal to 1"
    )

    nested = cli(
        stack,
        "submit",
        "prune",
        "-",
        stdin=json.dumps(tiny_spec(calibration={"source": str(CALIBRATION), "n_samples": -1})),
    )
    assert nested.returncode == 2 and "spec.calibration.n_samples" in nested.stderr

    not_json = tmp_path / "broken.json"
    not_json.write_text("{nope")
    result = cli(stack, "submit", "prune", str(not_json))
    assert result.returncode == 2 and "is not valid JSON" in result.stderr

    result = cli(stack, "submit", "shrink", str(bad))  # argparse: usage error
    assert result.returncode == 2 and "invalid choice" in result.stderr

    with client(stack) as api, pytest.raises(ShortenedAPIError) as raised:
        api.submit_prune(tiny_spec(num_blocks=0))
    error = raised.value
    assert (error.status_code, error.code, error.fields) == (
        422,
        "validation_error",
        ["spec.num_blocks"],
    )
    assert str(error) == "422 spec.num_blocks: Input should be greater than or equal to 1"


def test_a_failed_job_exits_1_with_its_error_code(stack):
    spec = tiny_spec(calibration={"source": str(CALIBRATION), "n_samples": 4, "seq_len": 4096})
    result = cli(
        stack, "submit", "prune", "-", "--wait", "--poll-interval", "0.2", stdin=json.dumps(spec)
    )
    assert result.returncode == 1
    job_id = result.stdout.strip()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"shortened jobs submit: error: job {job_id} failed: bad_calibration_data: "
    )
    human = cli(stack, "get", job_id).stdout
    assert "status    failed" in human and "error     bad_calibration_data: " in human


def test_unknown_job_is_a_clear_error(stack, tmp_path: Path):
    missing = "0" * 32
    for args in (
        ["get", missing],
        ["wait", missing],
        ["cancel", missing],
        ["download", missing, str(tmp_path)],
    ):
        result = cli(stack, *args)
        assert result.returncode == 1, (args, result.stderr)
        [line] = result.stderr.strip().splitlines()
        assert line == f"shortened jobs {args[0]}: error: 404 not_found: job {missing} not found", (
            line
        )
    with client(stack) as api, pytest.raises(ShortenedAPIError) as raised:
        api.get(missing)
    assert (raised.value.status_code, raised.value.code) == (404, "not_found")


def test_wrong_or_missing_api_key_is_401(stack):
    with client(stack, api_key="sk_" + "x" * 43) as api, pytest.raises(ShortenedAPIError) as raised:
        api.list()
    assert (raised.value.status_code, raised.value.code) == (401, "unauthorized")
    assert "invalid or revoked API key" in str(raised.value)

    with ShortenedClient(stack["url"]) as anonymous, pytest.raises(ShortenedAPIError) as raised:
        anonymous.submit_prune(tiny_spec())
    assert raised.value.status_code == 401 and "API key is required" in raised.value.message

    result = cli(stack, "list", key="sk_wrong")
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "shortened jobs list: error: 401 unauthorized: invalid or revoked API key"
    )
    # --api-key after the sub-command overrides the environment.
    result = cli(stack, "list", "--api-key", stack["key"], "--json", key="sk_wrong")
    assert result.returncode == 0, result.stderr


def test_unreachable_service_is_one_line(stack):
    env = base_env({"SHORTENED_URL": f"http://127.0.0.1:{free_port()}"})
    result = subprocess.run(
        [*CLI, "jobs", "list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("shortened jobs list: error: unreachable: cannot reach the service")


# ---------------------------------------------------------------------------- retries, idempotency


def test_submission_retries_429_with_the_same_idempotency_key(stack):
    """Tenant 'limited' may have one queued or running job: a second submission is 429
    (Retry-After) until the first is cancelled, and the client's retries then get it through,
    every attempt carrying the same generated Idempotency-Key."""
    spec = PruneSpec(
        model=str(REPO / "models" / "tiny-llama"),
        num_blocks=1,
        calibration=CalibrationSpec(source=str(CALIBRATION), n_samples=4),
        device="cpu",
    )
    with client(stack, api_key=stack["limited_key"]) as api:
        first = api.submit_prune(spec, idempotency_key="first-job")
        assert first.status in ("queued", "running") and first.spec["num_blocks"] == 1
        assert api.submit_prune(spec, idempotency_key="first-job").id == first.id  # a replay

        with (
            client(stack, api_key=stack["limited_key"], retries=0) as no_retry,
            pytest.raises(ShortenedAPIError) as raised,
        ):
            no_retry.submit_prune(spec)
        assert (raised.value.status_code, raised.value.code) == (429, "too_many_jobs")

        transport = RecordingTransport()
        outcome: dict = {}

        def submit() -> None:
            with client(
                stack,
                api_key=stack["limited_key"],
                transport=transport,
                retries=100,
                max_retry_wait=0.2,
            ) as retrying:
                outcome["job"] = retrying.submit_prune(spec)

        thread = threading.Thread(target=submit)
        thread.start()
        wait_until(lambda: len(transport.exchanges) >= 2, 30, "two refused attempts")
        api.cancel(first.id)
        assert api.wait(first.id, poll_interval=0.1, timeout=120).status == "cancelled"
        thread.join(timeout=60)
        second = outcome["job"]
        statuses = [status for _, status in transport.exchanges]
        assert statuses[-1] == 202 and set(statuses[:-1]) == {429} and len(statuses) >= 3
        keys = {request.headers["Idempotency-Key"] for request, _ in transport.exchanges}
        assert len(keys) == 1 and keys.pop().startswith("shortened-client-")
        assert second.id != first.id and second.status in ("queued", "running")
        api.cancel(second.id)
        assert api.wait(second.id, poll_interval=0.1, timeout=120).status in FINISHED


def test_iter_jobs_follows_the_cursor(stack, finished_job):
    with client(stack) as api:
        for _ in range(2):  # at least three jobs: submitted and cancelled at once
            api.cancel(api.submit_prune(tiny_spec()).id)
        every = [job.id for job in api.iter_jobs(page_size=1)]
        page = api.list(limit=1)
        assert len(page.items) == 1 and page.next_cursor
        events = api.events(every[-1])
    assert len(every) >= 3 and len(set(every)) == len(every)
    assert every[0] == page.items[0].id
    assert [e.seq for e in events] == list(range(1, len(events) + 1)) and events[0].type == "status"
    paged = json.loads(cli(stack, "list", "--all", "--limit", "1", "--json").stdout)
    assert [j["id"] for j in paged["items"]] == every and paged["next_cursor"] is None


# ---------------------------------------------------------------------------- S3: presigned URLs


def test_presigned_downloads_are_verified_and_never_see_the_key(
    stack, finished_job, s3_server, tmp_path: Path
):
    """A second API over the same job store, with the job's files in S3: downloads go to
    presigned URLs without the API key, and a tampered object is refused, leaving nothing."""
    import boto3

    from shortened.storage import S3Store

    job_id = finished_job["result"].stdout.strip()
    with s3_bucket(s3_server) as bucket:
        store = S3Store(bucket, "artifacts", endpoint_url=s3_server)
        store.upload_dir(stack["root"] / "artifacts" / "jobs" / job_id, f"jobs/{job_id}")
        env = {
            **stack["common"],
            "SHORTENED_ARTIFACTS_URL": f"s3://{bucket}/artifacts",
            "SHORTENED_S3_ENDPOINT_URL": s3_server,
        }
        process, url = start_api(
            base_env(
                {
                    **env,
                    "SHORTENED_DATA_DIR": str(tmp_path / "api"),
                    "SHORTENED_REAPER_INTERVAL_S": "0",
                }
            ),
            free_port(),
            tmp_path / "api-s3.log",
        )
        try:
            transport = RecordingTransport()
            with ShortenedClient(url, api_key=stack["key"], transport=transport) as api:
                links = api.artifacts(job_id)
                assert all(
                    link.url.startswith(s3_server) and "Signature" in link.url for link in links
                )
                paths = api.download(job_id, tmp_path / "model")
                for link, path in zip(links, paths, strict=True):
                    assert path == tmp_path / "model" / link.name and sha256(path) == link.sha256
                to_s3 = [r for r, _ in transport.exchanges if str(r.url).startswith(s3_server)]
                assert len(to_s3) == len(links) and all(
                    "Authorization" not in r.headers for r in to_s3
                )
                assert all(
                    r.headers["Authorization"] == f"Bearer {stack['key']}"
                    for r, _ in transport.exchanges
                    if r not in to_s3
                )

                # The object store now serves other bytes under a listed name.
                boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").put_object(
                    Bucket=bucket,
                    Key=f"artifacts/jobs/{job_id}/config.json",
                    Body=b'{"tampered": true}',
                )
                with pytest.raises(ShortenedAPIError) as raised:
                    api.download(job_id, tmp_path / "fresh")
                assert raised.value.code == "artifact_corrupted" and "config.json" in str(
                    raised.value
                )
            assert not (tmp_path / "fresh" / "config.json").exists()
            assert not [p for p in (tmp_path / "fresh").rglob("*") if p.name.endswith(".part")]

            result = cli({**stack, "url": url}, "download", job_id, str(tmp_path / "cli"))
            assert result.returncode == 1 and "artifact_corrupted" in result.stderr
            assert not (tmp_path / "cli" / "config.json").exists()
        finally:
            process.stop()
