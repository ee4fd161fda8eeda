"""Job routes: inspect, list, follow events, cancel, download artifacts (the submit routes,
one per job kind, are ``service.api.routes.submit``).

Every route is authenticated (``service.auth``) and scoped to the caller's tenant: another
tenant's job answers 404, exactly like an unknown id. Submissions are admitted by
``service.submission`` (policy, concurrency limit, ``Idempotency-Key``, dispatch).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import artifact_stream
from service.api.deps import SessionDep, SettingsDep, get_store, model_response
from service.auth import Principal, PrincipalDep, get_principal
from service.errors import coded
from service.models import Job
from service.pipeline import is_linked, pipeline_of
from service.schemas.jobs import ArtifactLink, EventOut, JobKind, JobOut, JobPage, JobStatus
from service.stores import events, job_lifecycle, job_reads
from service.stores.paging import InvalidCursor
from shortened.render import ranking_markdown

router = APIRouter(
    prefix="/jobs",
    tags=["jobs"],
    dependencies=[Depends(get_principal)],
    responses={401: coded("Missing, invalid or revoked API key")},
)

JobId = Annotated[str, Path(max_length=64, description="Job id")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No job with this id"}}


def _job_or_404(session: Any, job_id: str, principal: Principal | None = None) -> Job:
    job = job_reads.get_job(session, job_id, principal.scope if principal else None)
    if job is None:
        raise HTTPException(404, detail=f"job {job_id} not found")
    return job


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
        jobs, next_cursor = job_reads.list_jobs(
            session, kind=kind, status=status, limit=limit, after=after, tenant=principal.scope
        )
    except InvalidCursor as exc:
        raise HTTPException(
            422, detail=[{"loc": ["query", "after"], "msg": str(exc), "type": "value_error"}]
        ) from exc
    return JobPage(items=[JobOut.from_row(job) for job in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
async def get_job(job_id: JobId, request: Request, principal: PrincipalDep) -> Response:
    # The busiest route (clients poll it): a coroutine, so that no thread hand-over is paid
    # for it. The row and its attempts are read by the lean path of the job store, on the
    # event loop with PostgreSQL (job_reads.read_job_async), on a worker thread with SQLite; the
    # pipeline only for a linked job (on a thread: the ORM); the model serialised once.
    state = request.app.state
    if state.reads is not None:
        job = await job_reads.read_job_async(state.reads, job_id, principal.scope)
    else:
        job = await run_in_threadpool(job_reads.read_job, state.engine, job_id, principal.scope)
    if job is None:
        raise HTTPException(404, detail=f"job {job_id} not found")
    out = JobOut.from_row(job)
    if is_linked(job):
        out.pipeline = await run_in_threadpool(_pipeline_of, state.sessionmaker, job)
    return model_response(out)


def _pipeline_of(sessionmaker: Any, job: Any) -> Any:
    with sessionmaker() as session:
        return pipeline_of(session, job)


@router.get(
    "/{job_id}/ranking",
    responses={
        200: {"content": {"text/markdown": {}}},
        409: {"description": "Not a search job, or it has not succeeded"},
        **NOT_FOUND,
    },
)
def get_ranking(
    job_id: JobId,
    session: SessionDep,
    principal: PrincipalDep,
    format: Annotated[Literal["json", "markdown"], Query()] = "json",  # noqa: A002
) -> Any:
    """A succeeded search's ranked candidates, best first: the ``search`` section of its
    report (``format=json``) or its ranking as a Markdown table (``format=markdown``)."""
    job = _job_or_404(session, job_id, principal)
    search = (job.result or {}).get("search") if job.status == "succeeded" else None
    if job.kind != "search" or not isinstance(search, dict):
        raise HTTPException(
            409, detail=f"job {job_id} is a {job.status} {job.kind} job: no search ranking"
        )
    if format == "markdown":
        return PlainTextResponse(ranking_markdown(search), media_type="text/markdown")
    return search


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
    return [EventOut.from_row(e) for e in events.list_events(session, job_id, after_seq, limit)]


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
        outcome = job_lifecycle.request_cancel(session, job_id, principal.scope)
    except job_lifecycle.JobFinished as exc:
        raise HTTPException(409, detail=f"job {job_id} has already {exc.job.status}") from exc
    if outcome is None:
        raise HTTPException(404, detail=f"job {job_id} not found")
    response.status_code = 200 if outcome.immediate else 202
    return JobOut.from_row(outcome.job)


def _published_files(
    request: Request, session: Any, job_id: str, principal: Principal
) -> tuple[Job, list[dict[str, Any]]]:
    job = _job_or_404(session, job_id, principal)
    if job.status != "succeeded":
        raise HTTPException(
            409, detail=f"job {job_id} is {job.status}; only succeeded jobs have artifacts"
        )
    files = artifact_stream.published_files(get_store(request), job)
    if files is None:
        raise HTTPException(404, detail=f"no published artifacts for job {job.id}")
    return job, files


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
    root_path = request.scope.get("root_path", "")
    return artifact_stream.download_links(
        get_store(request), job, files, root_path, settings.presign_expiry_s
    )


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
    job, files = _published_files(request, session, job_id, principal)
    entry = next((f for f in files if f["name"] == name), None)
    if entry is None:  # also rejects '..', absolute and otherwise unsafe names
        raise HTTPException(404, detail=f"job {job_id} has no artifact {name!r}")
    spool = settings.data_dir.resolve() / "tmp" / "downloads"
    handle = artifact_stream.open_verified(get_store(request), spool, job, entry)
    return StreamingResponse(
        artifact_stream.stream(handle),
        media_type="application/octet-stream",
        headers=artifact_stream.download_headers(entry),
    )
