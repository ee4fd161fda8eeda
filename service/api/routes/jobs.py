"""Job routes: submit, inspect, list, follow events, cancel, download artifacts."""

from __future__ import annotations

import logging
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from service import crud
from service.api.deps import SessionDep, SettingsDep, get_celery, get_store
from service.models import Job
from service.schemas import ArtifactLink, EventOut, JobKind, JobOut, JobPage, JobStatus
from shortened.specs import PruneSpec
from worker.celery_app import RUN_JOB_TASK

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[str, Path(max_length=64, description="Job id")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No job with this id"}}


def _job_or_404(session: Any, job_id: str) -> Job:
    job = crud.get_job(session, job_id)
    if job is None:
        raise HTTPException(404, detail=f"job {job_id} not found")
    return job


def _submit(
    request: Request, response: Response, session: Any, kind: str, spec: dict[str, Any]
) -> JobOut:
    job = crud.create_job(session, kind, spec)
    try:
        # The message carries the id only; the worker reads the spec from the job store.
        get_celery(request).send_task(RUN_JOB_TASK, args=[job.id])
    except Exception as exc:
        log.exception("could not queue job %s", job.id)
        crud.fail_queued_job(session, job.id, "enqueue_failed", f"could not queue the job: {exc}")
        raise HTTPException(
            503, detail=f"job {job.id} could not be queued: broker unavailable"
        ) from exc
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobOut.from_row(job)


@router.post(
    "/prune",
    status_code=202,
    response_model=JobOut,
    responses={503: {"description": "The broker is unreachable; the job is marked failed"}},
)
def submit_prune(
    spec: PruneSpec, request: Request, response: Response, session: SessionDep
) -> JobOut:
    """Queue a one-shot depth-pruning job."""
    return _submit(request, response, session, "prune", spec.model_dump(mode="json"))


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    kind: JobKind | None = None,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    after: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobPage:
    """Jobs, newest first, one page at a time."""
    try:
        jobs, next_cursor = crud.list_jobs(
            session, kind=kind, status=status, limit=limit, after=after
        )
    except crud.InvalidCursor as exc:
        raise HTTPException(
            422, detail=[{"loc": ["query", "after"], "msg": str(exc), "type": "value_error"}]
        ) from exc
    return JobPage(items=[JobOut.from_row(job) for job in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
def get_job(job_id: JobId, session: SessionDep) -> JobOut:
    return JobOut.from_row(_job_or_404(session, job_id))


@router.get("/{job_id}/events", response_model=list[EventOut], responses=NOT_FOUND)
def list_events(
    job_id: JobId,
    session: SessionDep,
    after_seq: Annotated[int, Query(ge=0, description="Only events after this seq")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> list[EventOut]:
    """The job's events in order: stage and status changes, warnings, metrics, logs."""
    _job_or_404(session, job_id)
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
def cancel_job(job_id: JobId, response: Response, session: SessionDep) -> JobOut:
    try:
        outcome = crud.request_cancel(session, job_id)
    except crud.JobFinished as exc:
        raise HTTPException(409, detail=f"job {job_id} has already {exc.job.status}") from exc
    if outcome is None:
        raise HTTPException(404, detail=f"job {job_id} not found")
    response.status_code = 200 if outcome.immediate else 202
    return JobOut.from_row(outcome.job)


def _published_files(
    request: Request, session: Any, job_id: str
) -> tuple[Job, list[dict[str, Any]]]:
    from shortened.storage import read_manifest

    job = _job_or_404(session, job_id)
    if job.status != "succeeded":
        raise HTTPException(
            409, detail=f"job {job_id} is {job.status}; only succeeded jobs have artifacts"
        )
    store = get_store(request)
    try:
        manifest = read_manifest(store, f"jobs/{job.id}")
    except Exception as exc:
        raise HTTPException(503, detail=f"artifact store error: {exc}") from exc
    if manifest is None:
        raise HTTPException(404, detail=f"no published artifacts for job {job_id}")
    return job, manifest["files"]


@router.get(
    "/{job_id}/artifacts", response_model=list[ArtifactLink], responses={409: {}, **NOT_FOUND}
)
def list_artifacts(
    job_id: JobId, request: Request, session: SessionDep, settings: SettingsDep
) -> list[ArtifactLink]:
    """The published files with their checksums and a download URL each: a presigned
    object-store URL, or (local store) a path on this API that streams the file."""
    job, files = _published_files(request, session, job_id)
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


@router.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 409: {}, **NOT_FOUND},
)
def download_artifact(
    job_id: JobId, name: str, request: Request, session: SessionDep
) -> StreamingResponse:
    """Stream one published file. Only names listed in the job's manifest are served."""
    from shortened.storage import ArtifactNotFound

    job, files = _published_files(request, session, job_id)
    entry = next((f for f in files if f["name"] == name), None)
    if entry is None:  # also rejects '..', absolute and otherwise unsafe names
        raise HTTPException(404, detail=f"job {job_id} has no artifact {name!r}")
    try:
        stream = get_store(request).open_stream(f"jobs/{job.id}/{entry['name']}")
    except ArtifactNotFound as exc:
        raise HTTPException(404, detail=f"artifact {name!r} is listed but missing") from exc
    filename = quote(entry["name"].rsplit("/", 1)[-1])
    return StreamingResponse(
        stream,
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(entry["size"]),
            "ETag": f'"{entry["sha256"]}"',
            "Content-Disposition": f"attachment; filename*=UTF-8''{filename}",
        },
    )
