"""Artifact transfers: ``S3Store`` and the published-output helpers against raw boto3, on the
same S3 endpoint (moto's server on a loopback port) with the same TransferConfig; and
``LocalStore`` against ``shutil.copyfile``.

* one ~64 MiB file of random bytes: ``S3Store.put_file`` / ``get_file`` vs
  ``client.upload_file`` / ``download_file``;
* a directory of a few files (a checkpoint's shape): ``publish_directory`` (sha256 of every
  file, stale-object cleanup, manifest) / ``download_published`` (verifies every sha256) vs
  raw ``upload_file`` / ``download_file`` of the same files;
* LocalStore put/get (atomic: temp file, fsync, rename) vs ``shutil.copyfile``.

Each measurement runs once as a warm-up, then is repeated (alternating with its baseline)
and the median kept; the ratio is baseline time / our time, i.e. our throughput as a
fraction of the raw one.

    python -m bench.bench_artifacts        # prints one JSON object
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MiB = 1 << 20
FILE_BYTES = 64 * MiB
# A checkpoint-like directory: two weight shards, a tokenizer, a config.
DIRECTORY = {
    "model-00001-of-00002.safetensors": 28 * MiB,
    "model-00002-of-00002.safetensors": 28 * MiB,
    "tokenizer.json": 4 * MiB,
    "config.json": 2_000,
}
REPEATS = 3
TARGET = 0.8
TIME_LIMIT_S = 100.0  # repeats stop early (at least one is kept) past this

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3_server(log_path: Path) -> Iterator[str]:
    """Endpoint URL of a moto S3 server subprocess on a loopback port (as the ``s3_server``
    fixture of tests/conftest.py starts it), with dummy credentials in this process's
    environment meanwhile."""
    saved = {k: os.environ.get(k) for k in (*AWS_ENV, "AWS_PROFILE", "AWS_SESSION_TOKEN")}
    os.environ.update(AWS_ENV)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    proc: subprocess.Popen[bytes] | None = None
    endpoint = None
    try:
        with open(log_path, "ab") as log:
            for _attempt in range(5):
                port = _free_loopback_port()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "MOTO_PORT": str(port)},
                )
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and proc.poll() is None:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        endpoint = f"http://127.0.0.1:{port}"
                        break
                    except OSError:
                        time.sleep(0.1)
                if endpoint:
                    break
                proc.kill()
                proc.wait()
        if not endpoint:
            raise RuntimeError(f"moto S3 server did not start:\n{log_path.read_text()[-2000:]}")
        yield endpoint
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _random_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = min(left, 8 * MiB)
            f.write(os.urandom(chunk))
            left -= chunk


def _clock(action: Callable[[], Any], before: Callable[[], Any] | None = None) -> float:
    if before is not None:
        before()
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


class Pairs:
    """Our operation and its baseline, run alternately ``REPEATS`` times (bounded in time)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.results: dict[str, dict[str, Any]] = {}

    def measure(
        self,
        name: str,
        nbytes: int,
        ours: Callable[[], Any],
        raw: Callable[[], Any],
        before: Callable[[], Any] | None = None,
    ) -> None:
        ours_s: list[float] = []
        raw_s: list[float] = []
        for action in (ours, raw):  # warm-up, not counted: connections, first-write paths
            _clock(action, before)
        for repeat in range(REPEATS):
            if repeat and time.monotonic() > self.deadline:
                break
            # Alternate which goes first, so neither always gets the warmer caches.
            first, second = ((ours, ours_s), (raw, raw_s))[:: 1 if repeat % 2 == 0 else -1]
            for action, times in (first, second):
                times.append(_clock(action, before))
        ours_t, raw_t = statistics.median(ours_s), statistics.median(raw_s)
        self.results[name] = {
            "ratio": round(raw_t / ours_t, 3),
            "ours_s": round(ours_t, 3),
            "raw_s": round(raw_t, 3),
            "ours_mib_s": round(nbytes / MiB / ours_t, 1),
            "raw_mib_s": round(nbytes / MiB / raw_t, 1),
            "repeats": len(ours_s),
            # Best of the repeats: less sensitive to other load on the machine than the median.
            "ratio_of_best": round(min(raw_s) / min(ours_s), 3),
        }


def _copy_fsync(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def run() -> dict:
    import boto3

    from shortened.storage import (
        LocalStore,
        S3Store,
        download_published,
        publish_directory,
        sha256_file,
    )

    started = time.perf_counter()
    deadline = time.monotonic() + TIME_LIMIT_S
    work = Path(tempfile.mkdtemp(prefix="bench-artifacts-"))
    pairs = Pairs(deadline)
    context: dict[str, Any] = {}
    try:
        big = work / "src" / "big.bin"
        _random_file(big, FILE_BYTES)
        checkpoint = work / "src" / "checkpoint"
        for name, size in DIRECTORY.items():
            _random_file(checkpoint / name, size)
        dir_bytes = sum(DIRECTORY.values())

        with moto_s3_server(work / "moto.log") as endpoint:
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            store = S3Store(bucket, "bench", endpoint_url=endpoint)
            config = store.transfer_config
            # Raw: a plain client on the same endpoint, the store's TransferConfig.
            raw = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            raw.create_bucket(Bucket=bucket)
            try:
                down = work / "down"

                def clear_down() -> None:
                    shutil.rmtree(down, ignore_errors=True)
                    down.mkdir()

                pairs.measure(
                    "s3_put_file",
                    FILE_BYTES,
                    lambda: store.put_file("file/big.bin", big),
                    lambda: raw.upload_file(str(big), bucket, "raw/big.bin", Config=config),
                )
                pairs.measure(
                    "s3_get_file",
                    FILE_BYTES,
                    lambda: store.get_file("file/big.bin", down / "ours.bin"),
                    lambda: raw.download_file(
                        bucket, "raw/big.bin", str(down / "raw.bin"), Config=config
                    ),
                    before=clear_down,
                )

                files = sorted(DIRECTORY)

                def raw_upload_dir() -> None:
                    for name in files:
                        raw.upload_file(
                            str(checkpoint / name), bucket, f"rawdir/{name}", Config=config
                        )

                def raw_download_dir() -> None:
                    for name in files:
                        raw.download_file(
                            bucket, f"rawdir/{name}", str(down / "raw" / name), Config=config
                        )

                def clear_down_dirs() -> None:
                    clear_down()
                    (down / "raw").mkdir()

                pairs.measure(
                    "s3_publish_directory",
                    dir_bytes,
                    lambda: publish_directory(
                        store, checkpoint, "published", extra={"bench": True}
                    ),
                    raw_upload_dir,
                )
                pairs.measure(
                    "s3_download_published",
                    dir_bytes,
                    lambda: download_published(store, "published", down / "ours"),
                    raw_download_dir,
                    before=clear_down_dirs,
                )
            finally:
                store.delete_prefix("")
                for page in raw.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    for obj in page.get("Contents", []):
                        raw.delete_object(Bucket=bucket, Key=obj["Key"])
                raw.delete_bucket(Bucket=bucket)

        hash_s = statistics.median(
            _clock(lambda: [sha256_file(checkpoint / n) for n in files]) for _ in range(REPEATS)
        )
        context["sha256"] = {
            "mib_s": round(dir_bytes / MiB / hash_s, 1),
            "seconds_per_directory": round(hash_s, 3),
            "share_of_publish": round(hash_s / pairs.results["s3_publish_directory"]["ours_s"], 3),
            "share_of_download_published": round(
                hash_s / pairs.results["s3_download_published"]["ours_s"], 3
            ),
        }

        local = LocalStore(work / "local-store")
        copies = work / "copies"
        copies.mkdir()
        pairs.measure(
            "local_put_file",
            FILE_BYTES,
            lambda: local.put_file("big.bin", big),
            lambda: shutil.copyfile(big, copies / "put.bin"),
        )
        pairs.measure(
            "local_get_file",
            FILE_BYTES,
            lambda: local.get_file("big.bin", copies / "ours.bin"),
            lambda: shutil.copyfile(local.root / "big.bin", copies / "get.bin"),
        )
        context["local_copyfile_plus_fsync_s"] = round(
            statistics.median(
                _clock(lambda: _copy_fsync(big, copies / "fsync.bin")) for _ in range(REPEATS)
            ),
            3,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    r = pairs.results
    rows = [
        ("S3Store.put_file / raw upload_file (64 MiB)", r["s3_put_file"]["ratio"], f">= {TARGET}"),
        ("S3Store.get_file / raw download_file (64 MiB)", r["s3_get_file"]["ratio"], f">= {TARGET}"),
        ("publish_directory incl. sha256 / raw uploads", r["s3_publish_directory"]["ratio"], f">= {TARGET}"),
        ("download_published incl. verify / raw downloads", r["s3_download_published"]["ratio"], f">= {TARGET}"),
        ("LocalStore.put_file (fsync) / shutil.copyfile", r["local_put_file"]["ratio"], "-"),
        ("LocalStore.get_file / shutil.copyfile", r["local_get_file"]["ratio"], "-"),
    ]  # fmt: skip
    context.update(
        endpoint="moto S3 server (Python, threaded) on a loopback port; same endpoint and "
        "TransferConfig for S3Store and raw boto3",
        transfer_config={
            "multipart_threshold_mib": config.multipart_threshold // MiB,
            "multipart_chunksize_mib": config.multipart_chunksize // MiB,
            "max_concurrency": config.max_concurrency,
        },
        file_mib=FILE_BYTES // MiB,
        directory={"files": len(DIRECTORY), "mib": round(dir_bytes / MiB, 1)},
        transfers=r,
        seconds=round(time.perf_counter() - started, 1),
    )
    return {"name": "artifacts", "rows": rows, "context": context}


if __name__ == "__main__":
    print(json.dumps(run()))
