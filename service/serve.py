"""``shortened serve``: migrations, one Celery worker subprocess and the API in one command.

With the default settings this is the embedded mode (SQLite, filesystem broker, local
artifacts under ./var) and needs no other service; with SHORTENED_DATABASE_URL /
SHORTENED_BROKER_URL / SHORTENED_ARTIFACTS_URL it runs the same pieces against PostgreSQL,
Redis and S3.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from uvicorn.supervisors.multiprocess import Process as UvicornProcess

from service.db import make_engine, make_sessionmaker, upgrade_database
from shortened.config import Settings, get_settings
from shortened.logs import configure_logging, resolve_format

log = logging.getLogger(__name__)

# How long a stopping worker may take to finish its current job before it is killed.
WORKER_STOP_TIMEOUT_S = 10.0


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as SHORTENED_* variables, so the worker subprocess sees exactly what
    this process was given (flags included), not just this process's environment."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, Path):
            value = value.resolve()
        elif isinstance(value, list):  # list settings are read back as JSON
            value = json.dumps([str(v.resolve()) if isinstance(v, Path) else v for v in value])
        elif isinstance(value, dict):
            value = json.dumps(value)
        if value is not None:
            env[f"SHORTENED_{name.upper()}"] = str(value)
    return env


def _die_with_parent() -> None:
    # Linux: have the kernel SIGTERM the worker if this process dies without cleaning up
    # (SIGKILL); elsewhere this is a no-op and the finally block below is all there is.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# The Celery app the worker subprocess runs (tests point it at an instrumented copy).
WORKER_APP = "worker.celery_app"


def worker_command(settings: Settings) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        WORKER_APP,
        "worker",
        "-Q",
        settings.queue,
        "--concurrency",
        str(settings.worker_concurrency),
        "--pool",
        "prefork",
        "--loglevel",
        settings.log_level,
        "--hostname",
        f"shortened-{uuid.uuid4().hex[:8]}@%h",
        # Single-worker deployment: no cluster chatter to wait for at start-up.
        "--without-mingle",
        "--without-gossip",
    ]


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings_env(settings)}
    return subprocess.Popen(
        worker_command(settings),
        env=env,
        # Own session: Ctrl-C in the terminal reaches only this process, which then stops
        # the worker in order (warm shutdown first) instead of both racing to exit.
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )


def stop_worker(
    process: subprocess.Popen[bytes], timeout_s: float = WORKER_STOP_TIMEOUT_S
) -> int | None:
    """SIGTERM (warm shutdown: finish the current task), then SIGQUIT (cold), then SIGKILL
    to the whole process group (the pool children too)."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGKILL:
                os.killpg(process.pid, sig)
            else:  # only the main process: it stops its pool children in order
                os.kill(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait_s)
    return process.poll()


def recover_embedded_jobs(settings: Settings) -> None:
    """With the filesystem broker this process's worker is the only one, and it has not
    started yet: a job still 'running' died with a previous `serve` (crash, power loss) and
    its message is gone. Its lease is expired now and the reaper's rules apply at once, as in
    the distributed mode: re-queued with a fresh message while attempts remain
    (``max_attempts``), else failed with ``worker_lost``; its unpublished objects removed."""
    if not settings.resolved_broker_url.startswith("filesystem://"):
        return
    from service.queue import make_celery
    from service.reaper import Reaper
    from service.stores.job_recovery import expire_running_leases

    engine = make_engine(settings.resolved_database_url)
    celery = make_celery(settings)
    try:
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            if not expire_running_leases(session):
                return
        reaper = Reaper(settings, sessions, celery)
        while True:
            report = reaper.run_once()
            if report.requeued or report.failed:
                log.warning(
                    "jobs left running by a previous run: re-queued %s, failed %s",
                    report.requeued,
                    report.failed,
                )
            if not (report.requeued or report.failed or report.cancelled):
                break
    finally:
        celery.close()
        engine.dispose()


def _stop_on_sigterm(signum: int, _frame: object) -> None:
    # The same orderly stop as Ctrl-C: uvicorn has drained its requests, the worker is
    # stopped next, and the exit status is 0.
    raise KeyboardInterrupt


def serve(settings: Settings | None = None, *, api_only: bool = False) -> None:
    """Run migrations, start a worker subprocess and serve the API until SIGINT/SIGTERM.
    ``api_only``: the API processes alone (a deployment whose workers and migrations run
    elsewhere, e.g. the compose file and the k8s Deployment)."""
    settings = settings or get_settings()
    settings.check_auth_binding()  # before anything starts
    # A terminal command: text logs unless SHORTENED_LOG_FORMAT says otherwise; the worker
    # subprocess is given the same format (through settings_env) so the two read alike.
    settings = settings.model_copy(
        update={"log_format": resolve_format(settings.log_format, "text")}
    )
    configure_logging(settings.log_format, settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not api_only:
        upgrade_database(settings)
        recover_embedded_jobs(settings)
    # Started before the API processes' metrics directory is put in the environment: the
    # worker has its own (worker.metrics), and must not share or empty the API's.
    worker = None if api_only else start_worker(settings)
    if worker is not None:
        log.info("worker started (pid %d)", worker.pid)
    try:
        serve_api(settings)
    finally:
        if worker is not None:
            log.info("stopping worker (pid %d)", worker.pid)
            stop_worker(worker)


# What each API process of a multi-process server imports (service.main builds it from the
# environment, which serve_api fills with the settings first).
API_APP = "service.main:app"
WORKER_HEALTHCHECK_TIMEOUT_S = 60


def run_processes(config: Any) -> None:
    """uvicorn's multi-process supervisor (health pings, restarts, graceful stop), with one
    listening socket per process where the platform has SO_REUSEPORT: the kernel then spreads
    new connections evenly over the processes. On one shared socket the process that wakes
    first accepts every connection waiting, so a burst of keep-alive clients (a platform's
    pollers starting together) could all land on one process and leave the others idle."""
    from uvicorn.supervisors import multiprocess

    if not hasattr(socket, "SO_REUSEPORT"):
        multiprocess.Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    # Bound without SO_REUSEPORT and closed again: a port in use fails here, at once, rather
    # than being shared with whatever else listens on it.
    config.bind_socket().close()
    shared = multiprocess.Process
    multiprocess.Process = ReusePortProcess  # type: ignore[misc]  # what the supervisor spawns
    try:
        multiprocess.Multiprocess(config, sockets=[]).run()
    finally:
        multiprocess.Process = shared  # type: ignore[misc]


def reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class ReusePortProcess(UvicornProcess):  # type: ignore[misc]
    """An API process that listens on a socket of its own (SO_REUSEPORT): what
    ``run_processes`` has uvicorn's supervisor spawn (picklable: a module-level class)."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:
        super().target([reuse_port_socket(self.config.host, self.config.port)])


def serve_api(settings: Settings) -> None:
    """The API on ``settings.api_host:api_port`` in ``resolved_api_workers`` processes, until
    SIGINT/SIGTERM; returns once they have drained and stopped.

    One process: the app runs here, background loops included. Several: uvicorn's
    supervisor (this process) spawns them on one listening socket (the kernel spreads the
    connections); each builds the app from the environment, which is given exactly these
    settings, with ``background_loops`` off: the reaper, scheduler and webhook dispatcher run
    once, on threads of this process. Their metrics go to files in a fresh multiprocess
    directory, and ``GET /metrics`` in any of them merges all (service.metrics)."""
    import uvicorn

    workers = settings.resolved_api_workers
    run_args: dict[str, Any] = {
        "host": settings.api_host,
        "port": settings.api_port,
        "log_level": settings.log_level.lower(),
        "log_config": None,  # configured already (configure_logging), uvicorn's loggers included
    }
    if workers == 1:
        from service.main import create_app

        app = create_app(settings)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal with
        # the handler that was installed before it: with the default SIGTERM handler the
        # process would die there and never stop the worker, so SIGTERM is handled as Ctrl-C.
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
        try:
            uvicorn.run(app, **run_args)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
        return

    from service.main import start_background_loops
    from service.multiproc import fresh_directory, use_multiprocess
    from service.queue import make_celery
    from service.scheduler import Scheduler

    directory, owned = fresh_directory(settings.data_dir, "api")
    use_multiprocess(directory)  # in the environment: the spawned API processes inherit it
    os.environ.update(settings_env(settings))
    os.environ["SHORTENED_BACKGROUND_LOOPS"] = "false"
    engine = make_engine(settings.resolved_database_url)
    celery = make_celery(settings)
    stop_loops = None
    if settings.background_loops:
        sessions = make_sessionmaker(engine)
        stop_loops = start_background_loops(
            settings, sessions, celery, Scheduler(settings, sessions, celery)
        )
    log.info("serving the API in %d processes (metrics merged from %s)", workers, directory)
    try:
        # The supervisor handles SIGINT/SIGTERM itself: it stops the processes (each drains
        # its requests) and returns.
        run_processes(
            uvicorn.Config(
                API_APP,
                workers=workers,
                # The supervisor restarts a process that does not answer its ping in time; a
                # process still importing the app on a busy host must not count as hung.
                timeout_worker_healthcheck=WORKER_HEALTHCHECK_TIMEOUT_S,
                **run_args,
            )
        )
    finally:
        if stop_loops is not None:
            stop_loops()
        celery.close()
        engine.dispose()
        if owned:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":  # the same as ``shortened serve``
    from shortened.cli.service_commands import start_service_command

    start_service_command("serve")
