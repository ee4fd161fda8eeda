"""Helpers for the service end-to-end tests: real Redis, PostgreSQL, S3 (moto), a Celery
worker subprocess and the API under uvicorn in a subprocess.

Everything is namespaced per test session (a Redis DB and queue name, a PostgreSQL
database, a bucket) and removed afterwards, so concurrent sessions do not interfere.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "models" / "tiny-llama"
CALIBRATION = REPO / "data" / "calibration.jsonl"

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
FINISHED = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHORTENED_")}
    env.update(settings_env)
    env.update(
        HF_HUB_OFFLINE="1",  # nothing may be downloaded: fail fast instead of hanging
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


# ---------------------------------------------------------------------------- namespaces


# Keys kombu shares between all queues of a Redis DB (remote control, unacked messages).
KOMBU_SHARED_KEYS = {
    "_kombu.binding_deadlines",
    "_kombu.binding.celery.pidbox",
    "_kombu.binding.reply.celery.pidbox",
    "_kombu.binding.celeryev",
    "unacked",
    "unacked_index",
    "unacked_mutex",
}


@contextmanager
def redis_namespace() -> Iterator[tuple[str, str]]:
    """(broker URL, queue name): a random empty Redis DB if there is one, and a unique queue.
    Afterwards the queue's keys are deleted, and kombu's shared keys too when nothing else
    is left in the DB."""
    import redis

    empty = [db for db in range(1, 16) if redis.Redis(REDIS_HOST, REDIS_PORT, db=db).dbsize() == 0]
    db = random.choice(empty) if empty else 15
    queue = f"e2e-{uuid.uuid4().hex[:10]}"
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}", queue
    finally:
        client = redis.Redis(REDIS_HOST, REDIS_PORT, db=db, decode_responses=True)
        ours = list(client.scan_iter(match=f"*{queue}*"))
        if ours:
            client.delete(*ours)
        rest = set(client.scan_iter())
        if rest and rest <= KOMBU_SHARED_KEYS:
            client.delete(*rest)
        client.close()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    import sqlalchemy as sa

    name = f"shortened_e2e_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def s3_bucket(endpoint: str) -> Iterator[str]:
    import boto3

    bucket = f"e2e-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    try:
        yield bucket
    finally:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
        client.delete_bucket(Bucket=bucket)


# ---------------------------------------------------------------------------- processes


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def start_process(args: list[str], env: dict[str, str], log_path: Path) -> Process:
    log = open(log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
    popen = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    return Process(popen, log_path)


def wait_until(
    predicate, timeout: float, what: str, process: Process | None = None, interval: float = 0.2
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.popen.poll() is not None:
            raise AssertionError(
                f"{what}: process exited ({process.popen.returncode}):\n{process.log()[-5000:]}"
            )
        time.sleep(interval)
    tail = process.log()[-5000:] if process else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def start_worker(env: dict[str, str], queue: str, log_path: Path) -> Process:
    process = start_process(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-Q",
            queue,
            "--concurrency",
            "1",
            "--pool",
            "prefork",
            "--loglevel",
            "INFO",
            "--hostname",
            f"{queue}@%h",
            "--without-mingle",
            "--without-gossip",
        ],
        env,
        log_path,
    )
    wait_until(lambda: " ready." in process.log(), 60, "the Celery worker", process)
    return process


def start_api(env: dict[str, str], port: int, log_path: Path) -> tuple[Process, str]:
    process = start_process(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env,
        log_path,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(url + "/healthz"), 60, "the API", process)
    return process, url


@contextmanager
def worker_and_api(common: dict[str, str], queue: str, root: Path) -> Iterator[tuple[Process, str]]:
    """A Celery worker on ``queue`` and the API under uvicorn, both with the settings
    ``common`` but each its own data directory under ``root`` (they share only the database,
    broker and artifact store). Yields ``(worker, url)``; both are stopped on exit."""
    worker = start_worker(
        base_env({**common, "SHORTENED_DATA_DIR": str(root / "worker")}), queue, root / "worker.log"
    )
    try:
        api_process, url = start_api(
            base_env({**common, "SHORTENED_DATA_DIR": str(root / "api")}),
            free_port(),
            root / "api.log",
        )
        try:
            yield worker, url
        finally:
            api_process.stop()
    finally:
        worker.stop(timeout=60)


@contextmanager
def s3_stack(
    s3_server: str,
    root: Path,
    allowed_roots: Sequence[Path] = (),
    settings: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """The distributed service: API + worker (``worker_and_api``) against Redis, PostgreSQL and
    S3, each namespaced for this stack, the database migrated (a deploy step with PostgreSQL).
    ``allowed_roots``: local directories jobs may name; ``settings``: more environment for
    both. Yields ``api`` (an httpx client),
    ``worker``, ``root``, ``worker_dir``, ``s3`` (a boto3 client), ``bucket``, ``broker_url``
    and ``queue``."""
    import json

    import boto3

    from service.db import upgrade_database

    with (
        redis_namespace() as (broker_url, queue),
        postgres_database() as database_url,
        s3_bucket(s3_server) as bucket,
    ):
        common = {
            "SHORTENED_DATABASE_URL": database_url,
            "SHORTENED_BROKER_URL": broker_url,
            "SHORTENED_QUEUE": queue,
            "SHORTENED_ARTIFACTS_URL": f"s3://{bucket}/artifacts",
            "SHORTENED_S3_ENDPOINT_URL": s3_server,
        }
        if allowed_roots:
            common["SHORTENED_ALLOWED_LOCAL_ROOTS"] = json.dumps([str(p) for p in allowed_roots])
        common.update(settings or {})
        upgrade_database(database_url)
        with (
            worker_and_api(common, queue, root) as (worker, url),
            httpx.Client(base_url=url, timeout=30) as api,
        ):
            yield {
                "api": api,
                "worker": worker,
                "root": root,
                "worker_dir": root / "worker",
                "s3": boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1"),
                "bucket": bucket,
                "broker_url": broker_url,
                "queue": queue,
            }


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------------------- API client helpers


def prune_spec(**overrides) -> dict:
    spec = {
        "model": str(TINY_MODEL),
        "criterion": "ppl",
        "num_blocks": 2,
        "calibration": {"source": str(CALIBRATION), "n_samples": 4},
        "device": "cpu",
    }
    spec.update(overrides)
    return spec


def failing_in_worker_spec(**overrides) -> dict:
    """A job admission accepts and the worker fails at once: no calibration document is as
    long as ``seq_len`` (knowable only after tokenizing), ``bad_calibration_data``."""
    return prune_spec(
        calibration={"source": str(CALIBRATION), "n_samples": 4, "seq_len": 4096}, **overrides
    )


def message_ignored(log: str, job_id: str) -> int:
    """How many messages of a job a worker did not run: dropped in its main process before the
    pool (the job was no longer queued), or refused by the task's own claim."""
    return len(re.findall(rf"job {job_id} is (?:not queued|\w+: message dropped)", log))


def submit(api: httpx.Client, spec: dict) -> str:
    response = api.post("/jobs/prune", json=spec)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_for_job(
    api: httpx.Client,
    job_id: str,
    statuses=FINISHED,
    timeout: float = 300,
    worker: Process | None = None,
    **fields,
) -> dict:
    def check():
        job = api.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses and all(job.get(k) == v for k, v in fields.items()):
            return job
        return None

    return wait_until(
        check, timeout, f"job {job_id} to reach {statuses} {fields or ''}", worker, interval=0.25
    )


def download_artifacts(api: httpx.Client, job_id: str, dest: Path) -> list[dict]:
    """Fetch every artifact through the URL the API gives (presigned S3 or API stream) and
    check each against the sha256 and size of the job's manifest."""
    links = api.get(f"/jobs/{job_id}/artifacts").json()
    dest.mkdir(parents=True, exist_ok=True)
    for link in links:
        url = urljoin(str(api.base_url), link["url"])
        response = httpx.get(url, timeout=60)
        assert response.status_code == 200, (link["name"], response.text[:500])
        assert len(response.content) == link["size"], link["name"]
        assert hashlib.sha256(response.content).hexdigest() == link["sha256"], link["name"]
        target = dest / link["name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(response.content)
    return links


def stage_history(api: httpx.Client, job_id: str) -> list[str]:
    events = api.get(f"/jobs/{job_id}/events").json()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    return [e["data"]["stage"] for e in events if e["type"] == "stage"]


def generate(model_dir: Path, prompt: str = "the quick brown") -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(
        **inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert output.shape[1] > inputs["input_ids"].shape[1]
    return tokenizer.decode(output[0])
