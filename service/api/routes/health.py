"""Liveness (/healthz: the process answers) and readiness (/readyz: its dependencies do)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.db import check_schema, ping
from service.queue import filesystem_broker_folders
from service.schemas import ComponentOut, ReadinessOut

if TYPE_CHECKING:
    from shortened.storage import LocalStore

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 5.0


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(request: Request) -> None:
    ping(request.app.state.engine)
    check_schema(request.app.state.engine)


def _check_broker(request: Request) -> None:
    settings = request.app.state.settings
    if settings.resolved_broker_url.startswith("filesystem://"):
        for folder in filesystem_broker_folders(settings):
            if not os.access(folder, os.W_OK):
                raise OSError(f"broker folder {folder} is missing or not writable")
        return
    with request.app.state.celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=3)


def _check_storage(request: Request) -> None:
    from service.api.deps import get_store
    from shortened.storage import LocalStore

    store = get_store(request)
    store.ping()
    if isinstance(store, LocalStore):
        check_local_store(store, request.app.state.settings.min_free_disk_gb)


def check_local_store(store: LocalStore, min_free_gb: float) -> None:
    """A real write where uploads are staged (a permission bit says nothing on a read-only
    mount or to root), then the free space against the floor. The messages name no path:
    /readyz answers anyone."""
    staging = store.root / store.STAGING
    try:
        staging.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=staging, prefix="readyz-", suffix=".partial") as f:
            f.write(b"ready?")
            f.flush()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise OSError(f"the artifact store is not writable: {reason}") from exc
    free_gb = shutil.disk_usage(store.root).free / 1e9
    if free_gb < min_free_gb:
        raise OSError(
            f"the artifact store has {free_gb:.2f} GB free, below the floor of {min_free_gb:g} GB"
        )


CHECKS: dict[str, Callable[[Request], None]] = {
    "database": _check_database,
    "broker": _check_broker,
    "storage": _check_storage,
}


@router.get(
    "/readyz",
    response_model=ReadinessOut,
    responses={503: {"model": ReadinessOut, "description": "A dependency is unreachable"}},
)
def readyz(request: Request) -> JSONResponse:
    pool = ThreadPoolExecutor(max_workers=len(CHECKS))
    try:
        futures = {name: pool.submit(check, request) for name, check in CHECKS.items()}
        wait(futures.values(), timeout=CHECK_TIMEOUT_S)
        components: dict[str, ComponentOut] = {}
        for name, future in futures.items():
            if not future.done():
                components[name] = ComponentOut(
                    ok=False, error=f"no answer within {CHECK_TIMEOUT_S:g}s"
                )
            elif (exc := future.exception()) is not None:
                detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
                components[name] = ComponentOut(ok=False, error=f"{type(exc).__name__}: {detail}")
            else:
                components[name] = ComponentOut(ok=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    ready = all(c.ok for c in components.values())
    body = ReadinessOut(status="ready" if ready else "unavailable", components=components)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
