"""Job routes: submit, inspect, list, follow events, cancel, download artifacts.

Every route is authenticated (``service.auth``) and scoped to the caller's tenant: another
tenant's job answers 404, exactly like an unknown id. Submissions are admitted by
``service.submission`` (policy, concurrency limit, ``Idempotency-Key``, dispatch).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path as PathLib
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import crud
from service.api.admission import (
    SUBMIT_RESPONSES,
    IdempotencyKey,
    checked_idempotency_key,
    refusals_as_http,
    replayed,
)
from service.api.deps import SessionDep, SettingsDep, get_celery, get_store, model_response
from service.auth import Principal, PrincipalDep, get_principal
from service.errors import APIError, coded
from service.models import Job
from service.pipeline import is_linked, pipeline_of
from service.schemas import ArtifactLink, EventOut, JobKind, JobOut, JobPage, JobStatus
from service.submission import plan_submission, submit_job
from shortened.render import ranking_markdown
from shortened.specs import EvalSpec, PruneSpec, RetrainSpec, SearchSpec

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/jobs",
    tags=["jobs"],
    dependencies=[Depends(get_principal)],
    responses={401: coded("Missing, invalid or revoked API key")},
)

JobId = Annotated[str, Path(max_length=64, description="Job id")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No job with this id"}}


def _job_or_404(session: Any, job_id: str, principal: Principal | None = None) -> Job:
    job = crud.get_job(session, job_id, principal.scope if principal else None)
    if job is None:
        raise HTTPException(404, detail=f"job {job_id} not found")
    return job


DryRun = Annotated[
    bool,
    Query(
        description="Plan only: validate and admit as a real submission (422 when it could not "
        "run, including insufficient_memory), then answer 200 with the plan (parameters, "
        "blocks, output size, peak memory per stage); no job is created"
    ),
]
DRY_RUN_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Replay of an Idempotency-Key (a job), or with dry_run=true the plan: "
        '{"dry_run": true, "kind", "plan"} (plan null when the model\'s config.json is not '
        "readable by the API: hub models, a job still running)"
    }
}


def _submit(request: Request, kind: str, spec: dict[str, Any], dry_run: bool = False) -> Response:
    principal: Principal = request.state.principal
    state = request.app.state
    if dry_run:
        with state.sessionmaker() as session, refusals_as_http():
            plan = plan_submission(session, state.settings, principal, kind, spec)
        return JSONResponse({"dry_run": True, "kind": kind, "plan": plan})
    # Its own session rather than SessionDep: a generator dependency costs two thread-pool
    # round trips per request (enter and exit), and this is the busiest write.
    with state.sessionmaker() as session, refusals_as_http():
        submitted = submit_job(
            session,
            state.settings,
            get_celery(request),
            tenant=principal.tenant,
            kind=kind,
            spec=spec,
            principal=principal,
            idempotency_key=checked_idempotency_key(request),
        )
    response = model_response(JobOut.from_row(submitted.job), 202)
    if submitted.replayed:
        replayed(response, f"/jobs/{submitted.job.id}")
    else:
        response.headers["Location"] = f"/jobs/{submitted.job.id}"
    return response


@router.post(
    "/prune",
    status_code=202,
    response_model=JobOut,
    responses={**SUBMIT_RESPONSES, **DRY_RUN_RESPONSE},
)
def submit_prune(
    spec: PruneSpec,
    request: Request,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> Response:
    """Queue a one-shot depth-pruning job."""
    return _submit(request, "prune", spec.model_dump(mode="json"), dry_run)


@router.post(
    "/retrain",
    status_code=202,
    response_model=JobOut,
    responses={**SUBMIT_RESPONSES, **DRY_RUN_RESPONSE},
)
def submit_retrain(
    spec: RetrainSpec,
    request: Request,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> Response:
    """Queue a retraining job (LoRA, continued pretraining, or both)."""
    return _submit(request, "retrain", spec.model_dump(mode="json"), dry_run)


@router.post(
    "/eval",
    status_code=202,
    response_model=JobOut,
    responses={**SUBMIT_RESPONSES, **DRY_RUN_RESPONSE},
)
def submit_eval(
    spec: EvalSpec,
    request: Request,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> Response:
    """Queue an evaluation job (perplexity, zero-shot accuracy, efficiency)."""
    return _submit(request, "eval", spec.model_dump(mode="json"), dry_run)


@router.post(
    "/search",
    status_code=202,
    response_model=JobOut,
    responses={**SUBMIT_RESPONSES, **DRY_RUN_RESPONSE},
)
def submit_search(
    spec: SearchSpec,
    request: Request,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> Response:
    """Queue a search: every criterion at every block count the budget admits, ranked by
    perplexity on held-out calibration documents; the best is pruned and published."""
    return _submit(request, "search", spec.model_dump(mode="json"), dry_run)


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
async def get_job(job_id: JobId, request: Request, principal: PrincipalDep) -> Response:
    # The busiest route (clients poll it): a coroutine, so that no thread hand-over is paid
    # for it. The row and its attempts are read by the lean path of the job store, on the
    # event loop with PostgreSQL (crud.read_job_async), on a worker thread with SQLite; the
    # pipeline only for a linked job (on a thread: the ORM); the model serialised once.
    state = request.app.state
    if state.reads is not None:
        job = await crud.read_job_async(state.reads, job_id, principal.scope)
    else:
        job = await run_in_threadpool(crud.read_job, state.engine, job_id, principal.scope)
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
