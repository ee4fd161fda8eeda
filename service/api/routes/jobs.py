"""Job routes: submit, inspect, list, follow events, cancel, download artifacts.

Every route is authenticated (``service.auth``) and scoped to the caller's tenant: another
tenant's job answers 404, exactly like an unknown id. Submissions go through the source and
size policy (``service.policy``), the tenant's concurrency limit, and ``Idempotency-Key``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path as PathLib
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from sqlalchemy import text

from service import crud
from service.api.deps import SessionDep, SettingsDep, get_celery, get_store
from service.auth import Principal, PrincipalDep, get_principal
from service.errors import APIError, coded
from service.models import Job
from service.pipeline import pipeline_of
from service.policy import PolicyViolation, check_submission
from service.queue import RUN_JOB_TASK
from service.schemas import ArtifactLink, EventOut, JobKind, JobOut, JobPage, JobStatus
from shortened.specs import EvalSpec, PruneSpec, RetrainSpec

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/jobs",
    tags=["jobs"],
    dependencies=[Depends(get_principal)],
    responses={401: coded("Missing, invalid or revoked API key")},
)

JobId = Annotated[str, Path(max_length=64, description="Job id")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No job with this id"}}
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY.pattern,
        description="Retrying with the same key returns the same job (200) instead of a new one; "
        "the same key with a different body is a 422. Scoped to the tenant.",
    ),
]
SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": JobOut,
        "description": "Replay: the job created earlier with this Idempotency-Key",
    },
    400: {"description": "The body is not JSON"},
    413: coded("Request body too large"),
    429: coded("The tenant has too many queued or running jobs"),
    503: coded("The broker is unreachable; the job is not accepted (it is marked failed)"),
}


def _job_or_404(session: Any, job_id: str, principal: Principal | None = None) -> Job:
    job = crud.get_job(session, job_id, principal.scope if principal else None)
    if job is None:
        raise HTTPException(404, detail=f"job {job_id} not found")
    return job


def _request_hash(kind: str, spec: dict[str, Any]) -> str:
    canonical = json.dumps({"kind": kind, "spec": spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise RequestValidationError(
            [
                {
                    "loc": ("header", "Idempotency-Key"),
                    "msg": "must be 1 to 255 printable ASCII characters without spaces",
                    "type": "value_error",
                }
            ]
        )
    return key


def _replay(job: Job, request_hash: str, response: Response) -> JobOut:
    if job.request_hash != request_hash:
        raise RequestValidationError(
            [
                {
                    "loc": ("header", "Idempotency-Key"),
                    "msg": f"this Idempotency-Key was used for job {job.id} with a different request",
                    "type": "value_error",
                }
            ]
        )
    response.status_code = 200
    response.headers["Location"] = f"/jobs/{job.id}"
    response.headers["Idempotent-Replayed"] = "true"
    return JobOut.from_row(job)


def _lock_tenant(session: Any, tenant: str) -> None:
    """Serialise a tenant's submissions until commit, so two concurrent requests cannot
    both pass its concurrency limit (PostgreSQL; SQLite serialises writers anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"submit:{tenant}"}
        )


def _submit(
    request: Request, response: Response, session: Any, kind: str, spec: dict[str, Any]
) -> JobOut:
    principal: Principal = request.state.principal
    settings = request.app.state.settings
    key = _idempotency_key(request)
    request_hash = _request_hash(kind, spec)
    if key is not None and (
        existing := crud.find_by_idempotency_key(session, principal.tenant, key)
    ):
        return _replay(existing, request_hash, response)
    try:
        check_submission(settings, session, principal, spec)
    except PolicyViolation as exc:
        raise RequestValidationError(exc.errors) from exc
    _lock_tenant(session, principal.tenant)
    limit = settings.limits_for(principal.tenant).max_concurrent_jobs
    active = crud.count_active_jobs(session, principal.tenant)
    if active >= limit:
        session.rollback()
        raise APIError(
            429,
            "too_many_jobs",
            f"tenant {principal.tenant!r} has {active} queued or running jobs (limit {limit}); "
            "retry when one has finished",
            {"Retry-After": "30"},
        )
    try:
        job = crud.create_job(
            session,
            kind,
            spec,
            tenant=principal.tenant,
            idempotency_key=key,
            request_hash=request_hash,
        )
    except crud.DuplicateIdempotencyKey:  # a concurrent retry of the same request won
        existing = crud.find_by_idempotency_key(session, principal.tenant, key or "")
        assert existing is not None
        return _replay(existing, request_hash, response)
    try:
        # The message carries the id only; the worker reads the spec from the job store.
        get_celery(request).send_task(RUN_JOB_TASK, args=[job.id])
    except Exception as exc:
        log.exception("could not queue job %s", job.id)
        crud.fail_queued_job(session, job.id, "enqueue_failed", f"could not queue the job: {exc}")
        raise APIError(
            503,
            "broker_unavailable",
            f"job {job.id} could not be queued: the broker is unavailable; retry later",
            {"Retry-After": "10"},
        ) from exc
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobOut.from_row(job)


@router.post("/prune", status_code=202, response_model=JobOut, responses=SUBMIT_RESPONSES)
def submit_prune(
    spec: PruneSpec,
    request: Request,
    response: Response,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Queue a one-shot depth-pruning job."""
    return _submit(request, response, session, "prune", spec.model_dump(mode="json"))


@router.post("/retrain", status_code=202, response_model=JobOut, responses=SUBMIT_RESPONSES)
def submit_retrain(
    spec: RetrainSpec,
    request: Request,
    response: Response,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Queue a retraining job (LoRA, continued pretraining, or both)."""
    return _submit(request, response, session, "retrain", spec.model_dump(mode="json"))


@router.post("/eval", status_code=202, response_model=JobOut, responses=SUBMIT_RESPONSES)
def submit_eval(
    spec: EvalSpec,
    request: Request,
    response: Response,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Queue an evaluation job (perplexity, zero-shot accuracy, efficiency)."""
    return _submit(request, response, session, "eval", spec.model_dump(mode="json"))


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    kind: JobKind | None = None,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    after: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobPage:
    """Jobs, newest first, one page at a time: the caller's tenant's (an admin's: all)."""
    try:
        jobs, next_cursor = crud.list_jobs(
            session, kind=kind, status=status, limit=limit, after=after, tenant=principal.scope
        )
    except crud.InvalidCursor as exc:
        raise HTTPException(
            422, detail=[{"loc": ["query", "after"], "msg": str(exc), "type": "value_error"}]
        ) from exc
    return JobPage(items=[JobOut.from_row(job) for job in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
def get_job(job_id: JobId, session: SessionDep, principal: PrincipalDep) -> JobOut:
    job = _job_or_404(session, job_id, principal)
    out = JobOut.from_row(job)
    out.pipeline = pipeline_of(session, job)
    return out


@router.get("/{job_id}/events", response_model=list[EventOut], responses=NOT_FOUND)
def list_events(
    job_id: JobId,
    session: SessionDep,
    principal: PrincipalDep,
    after_seq: Annotated[
        int, Query(ge=0, le=2**31 - 1, description="Only events after this seq")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> list[EventOut]:
    """The job's events in order: stage and status changes, warnings, metrics, logs."""
    _job_or_404(session, job_id, principal)
    return [EventOut.from_row(e) for e in crud.list_events(session, job_id, after_seq, limit)]


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses={
        200: {"description": "The job was queued and is now cancelled"},
        202: {
            "model": JobOut,
            "description": "The job is running; its worker stops it at the next block",
        },
        409: {"description": "The job has already finished"},
        **NOT_FOUND,
    },
)
def cancel_job(
    job_id: JobId, response: Response, session: SessionDep, principal: PrincipalDep
) -> JobOut:
    try:
        outcome = crud.request_cancel(session, job_id, principal.scope)
    except crud.JobFinished as exc:
        raise HTTPException(409, detail=f"job {job_id} has already {exc.job.status}") from exc
    if outcome is None:
        raise HTTPException(404, detail=f"job {job_id} not found")
    response.status_code = 200 if outcome.immediate else 202
    return JobOut.from_row(outcome.job)


def _artifact_entries(job: Job, manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The job's files as recorded in the job store when it succeeded; the manifest in the
    store must agree, or the published output has been tampered with or damaged."""
    recorded = job.artifacts if job.artifacts is not None else (manifest or {}).get("files", [])
    if manifest is None:
        raise HTTPException(404, detail=f"no published artifacts for job {job.id}")

    def as_set(entries: list[dict[str, Any]]) -> set[tuple[str, int, str]]:
        return {(e["name"], e["size"], e["sha256"]) for e in entries}

    if as_set(manifest["files"]) != as_set(recorded):
        raise APIError(
            502,
            "artifact_corrupted",
            f"the published manifest of job {job.id} does not match the files recorded "
            "when it succeeded",
        )
    return [{"name": e["name"], "size": e["size"], "sha256": e["sha256"]} for e in recorded]


def _published_files(
    request: Request, session: Any, job_id: str, principal: Principal
) -> tuple[Job, list[dict[str, Any]]]:
    from shortened.storage import IntegrityError, read_manifest

    job = _job_or_404(session, job_id, principal)
    if job.status != "succeeded":
        raise HTTPException(
            409, detail=f"job {job_id} is {job.status}; only succeeded jobs have artifacts"
        )
    store = get_store(request)
    try:
        manifest = read_manifest(store, f"jobs/{job.id}")
    except IntegrityError as exc:
        raise APIError(502, "artifact_corrupted", f"job {job_id}: {exc}") from exc
    except Exception as exc:
        raise APIError(503, "storage_unavailable", f"artifact store error: {exc}") from exc
    return job, _artifact_entries(job, manifest)


ARTIFACT_ERRORS: dict[int | str, dict[str, Any]] = {
    409: {"description": "The job has not succeeded"},
    502: coded("artifact_corrupted: an object does not match its recorded sha256 or size"),
    503: coded("The artifact store is unreachable"),
    **NOT_FOUND,
}


@router.get("/{job_id}/artifacts", response_model=list[ArtifactLink], responses=ARTIFACT_ERRORS)
def list_artifacts(
    job_id: JobId,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> list[ArtifactLink]:
    """The published files with their checksums and a download URL each: a presigned
    object-store URL (verify the sha256 yourself), or (local store) a path on this API that
    streams the file after verifying it."""
    job, files = _published_files(request, session, job_id, principal)
    store = get_store(request)
    root_path = request.scope.get("root_path", "")
    links = []
    for entry in files:
        url = store.presigned_url(f"jobs/{job.id}/{entry['name']}", settings.presign_expiry_s)
        if url is None:
            url = f"{root_path}/jobs/{job.id}/artifacts/{quote(entry['name'], safe='/')}"
        links.append(
            ArtifactLink(name=entry["name"], size=entry["size"], sha256=entry["sha256"], url=url)
        )
    return links


def _stream_file(handle: Any, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(chunk_size):
            yield chunk


@router.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **ARTIFACT_ERRORS},
)
def download_artifact(
    job_id: JobId,
    name: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> StreamingResponse:
    """Stream one published file, verified first: the object is fetched and its size and
    sha256 checked against the job's record; a mismatch is a 502 ``artifact_corrupted``,
    never a download. Only names listed for the job are served."""
    from shortened.storage import ArtifactNotFound, IntegrityError

    job, files = _published_files(request, session, job_id, principal)
    entry = next((f for f in files if f["name"] == name), None)
    if entry is None:  # also rejects '..', absolute and otherwise unsafe names
        raise HTTPException(404, detail=f"job {job_id} has no artifact {name!r}")
    spool = settings.data_dir.resolve() / "tmp" / "downloads"
    spool.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{job.id}-", dir=spool)
    os.close(fd)
    tmp = PathLib(tmp_name)
    try:
        try:
            # Hashed while it downloads; the file appears only if size and sha256 match.
            get_store(request).get_file_verified(
                f"jobs/{job.id}/{entry['name']}", tmp, entry["name"], entry["size"], entry["sha256"]
            )
        except ArtifactNotFound as exc:
            raise APIError(
                502, "artifact_corrupted", f"artifact {name!r} is listed but missing from the store"
            ) from exc
        except IntegrityError as exc:
            log.error("job %s artifact %s does not match its sha256/size: %s", job.id, name, exc)
            raise APIError(
                502,
                "artifact_corrupted",
                f"artifact {name!r} of job {job_id} does not match its recorded sha256 and size",
            ) from exc
        except Exception as exc:
            raise APIError(503, "storage_unavailable", f"artifact store error: {exc}") from exc
        handle = tmp.open("rb")
    finally:
        # Unlinked at once: the open handle keeps the data until the stream is closed.
        tmp.unlink(missing_ok=True)
    filename = quote(entry["name"].rsplit("/", 1)[-1])
    return StreamingResponse(
        _stream_file(handle),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(entry["size"]),
            "ETag": f'"{entry["sha256"]}"',
            "Content-Disposition": f"attachment; filename*=UTF-8''{filename}",
        },
    )
