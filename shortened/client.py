"""A typed Python client of the shortened job API.

    from shortened.client import ShortenedClient

    with ShortenedClient("http://127.0.0.1:8000", api_key="sk_...") as client:
        job = client.submit_prune({"model": "models/tiny-llama", "num_blocks": 2,
                                   "calibration": {"source": "data/calibration.jsonl"}})
        job = client.wait(job.id, on_update=lambda j: print(j.stage, j.progress.done))
        if job.succeeded:
            client.download(job.id, "pruned-model")

Every call returns a pydantic model (``shortened.client_models``) and every failure raises
:class:`ShortenedAPIError`. Reads (GET) and submissions (which always carry an
``Idempotency-Key``, generated when not given) are retried on connection errors, 429 and
503, honouring ``Retry-After`` up to a bound; a retried submission can therefore never
create a second job.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from pydantic import BaseModel, TypeAdapter

from shortened.permissions import as_if_created

from .client_models import (
    FINISHED_STATUSES,
    Artifact,
    ArtifactInfo,
    Batch,
    BatchSummary,
    Event,
    Job,
    JobError,
    JobPage,
    Progress,
)

__all__ = [
    "FINISHED_STATUSES",
    "Artifact",
    "Batch",
    "BatchSummary",
    "ArtifactInfo",
    "Event",
    "Job",
    "JobError",
    "JobPage",
    "Progress",
    "ShortenedAPIError",
    "ShortenedClient",
]

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})
_CHUNK = 1 << 20

# Codes for errors whose body carries none (FastAPI's own HTTPException and 422).
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
}

_EVENT_LIST = TypeAdapter(list[Event])
_ARTIFACT_LIST = TypeAdapter(list[Artifact])


def _field(loc: Any) -> str:
    """``["body", "calibration", "n_samples"]`` -> ``spec.calibration.n_samples``: a request
    body is always a job spec."""
    parts = [str(p) for p in loc] if isinstance(loc, list | tuple) else [str(loc)]
    if parts and parts[0] == "body":
        parts[0] = "spec"
    return ".".join(parts) or "request"


class ShortenedAPIError(Exception):
    """Any failure of a client call.

    ``status_code`` is the HTTP status, or None for failures without one (the server is
    unreachable, a downloaded file does not match its checksum, a wait timed out). ``code``
    is the server's machine-readable code when it sent one (``model_not_found``,
    ``too_many_jobs``, ...), else one derived from the status (``not_found``,
    ``validation_error``) or the client's own (``unreachable``, ``artifact_corrupted``,
    ``timeout``). ``details`` holds a 422's field errors (``loc``, ``msg``, ``type``).
    """

    def __init__(
        self,
        status_code: int | None,
        code: str,
        message: str,
        details: builtins.list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details or []

    def __str__(self) -> str:
        if self.status_code is None:
            return f"{self.code}: {self.message}"
        if self.status_code == 422 and self.details:
            return f"422 {self.message}"  # the message already names each field
        return f"{self.status_code} {self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"ShortenedAPIError({self.status_code!r}, {self.code!r}, {self.message!r})"

    @property
    def fields(self) -> builtins.list[str]:
        """The fields a 422 complains about, e.g. ``["spec.num_blocks"]``."""
        return [_field(d.get("loc", ())) for d in self.details]

    @classmethod
    def from_response(cls, response: httpx.Response) -> ShortenedAPIError:
        try:
            body = response.json()
        except ValueError:
            body = None
        detail = body.get("detail") if isinstance(body, dict) else None
        code = body.get("code") if isinstance(body, dict) else None
        status = response.status_code
        details: builtins.list[dict[str, Any]] = []
        if isinstance(detail, list):  # FastAPI's validation errors
            details = [d for d in detail if isinstance(d, dict)]
            message = "; ".join(f"{_field(d.get('loc', ()))}: {d.get('msg', '')}" for d in details)
        elif isinstance(detail, str):
            message = detail
        else:
            message = response.text.strip()[:300] or response.reason_phrase
        if not isinstance(code, str) or not code:
            code = _STATUS_CODES.get(status, f"http_{status}")
        return cls(status, code, message or response.reason_phrase, details)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _spec_body(spec: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, BaseModel):
        # Only what was set: the server applies its own defaults to the rest.
        return spec.model_dump(mode="json", exclude_unset=True)
    return dict(spec)


def _local_target(dest: Path, name: str) -> Path:
    """Where artifact ``name`` goes under ``dest``; refuses names that would escape it."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise ShortenedAPIError(None, "unsafe_artifact_name", f"refusing artifact name {name!r}")
    return dest.joinpath(*parts)


class ShortenedClient:
    """A synchronous client of the shortened API (a context manager; or call ``close()``).

    ``retries`` bounds the retries of one call (reads, submissions, downloads) on connection
    errors, 429 and 503; each wait is the server's ``Retry-After`` or an exponential backoff,
    at most ``max_retry_wait`` seconds. ``transport`` is passed to httpx (e.g. for a Unix
    socket or ASGI app).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        *,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        backoff: float = 0.5,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.retries = max(0, retries)
        self.max_retry_wait = max(0.0, max_retry_wait)
        self.backoff = backoff
        headers = {"User-Agent": "shortened-client", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._api = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        # Presigned object-store URLs carry their own authorisation: never send them the key.
        self._plain = httpx.Client(timeout=timeout, transport=transport, follow_redirects=True)

    def __enter__(self) -> ShortenedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._api.close()
        self._plain.close()

    # ------------------------------------------------------------------ transport

    def _wait_before_retry(self, attempt: int, response: httpx.Response | None) -> None:
        delay = _retry_after(response) if response is not None else None
        if delay is None:
            delay = self.backoff * 2**attempt * (0.5 + random.random())
        time.sleep(min(delay, self.max_retry_wait))

    def _send(
        self,
        method: str,
        url: str,
        *,
        retry: bool,
        stream: bool = False,
        authenticated: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request, retried when ``retry`` on connection errors, 429 and 503; any other
        error status raises :class:`ShortenedAPIError`."""
        client = self._api if authenticated else self._plain
        attempt = 0
        while True:
            request = client.build_request(method, url, **kwargs)
            try:
                response = client.send(request, stream=stream)
            except httpx.UnsupportedProtocol as exc:  # a malformed base URL: retrying won't help
                raise ShortenedAPIError(None, "invalid_url", f"{request.url}: {exc}") from exc
            except httpx.TransportError as exc:
                if not retry or attempt >= self.retries:
                    raise ShortenedAPIError(
                        None,
                        "unreachable",
                        f"cannot reach the service ({method} {request.url}): {type(exc).__name__}: {exc}",
                    ) from exc
                self._wait_before_retry(attempt, None)
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            if stream:
                response.read()
                response.close()
            if retry and response.status_code in RETRY_STATUSES and attempt < self.retries:
                self._wait_before_retry(attempt, response)
                attempt += 1
                continue
            raise ShortenedAPIError.from_response(response)

    def _get(self, path: str, **params: Any) -> Any:
        params = {k: v for k, v in params.items() if v is not None}
        return self._send("GET", path, retry=True, params=params).json()

    # ------------------------------------------------------------------ jobs

    def submit(
        self,
        kind: str,
        spec: BaseModel | Mapping[str, Any],
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a job of ``kind`` (prune, retrain, eval, search). The ``Idempotency-Key`` (generated
        when not given) makes retries safe: the server answers a repeat with the same job."""
        key = idempotency_key or f"shortened-client-{uuid.uuid4().hex}"
        response = self._send(
            "POST",
            f"jobs/{kind}",
            retry=True,
            json=_spec_body(spec),
            headers={"Idempotency-Key": key},
        )
        return Job.model_validate(response.json())

    def submit_prune(
        self, spec: BaseModel | Mapping[str, Any], idempotency_key: str | None = None
    ) -> Job:
        return self.submit("prune", spec, idempotency_key)

    def submit_retrain(
        self, spec: BaseModel | Mapping[str, Any], idempotency_key: str | None = None
    ) -> Job:
        return self.submit("retrain", spec, idempotency_key)

    def submit_eval(
        self, spec: BaseModel | Mapping[str, Any], idempotency_key: str | None = None
    ) -> Job:
        return self.submit("eval", spec, idempotency_key)

    def submit_search(
        self, spec: BaseModel | Mapping[str, Any], idempotency_key: str | None = None
    ) -> Job:
        """Queue a search (``SearchSpec``): the best pruning within a budget, published
        like a prune job's output; its ranking is in the result's ``search`` section and at
        :meth:`ranking`."""
        return self.submit("search", spec, idempotency_key)

    def ranking(self, job_id: str, format: str = "json") -> Any:  # noqa: A002
        """A succeeded search's ranking: the ``search`` section (``json``) or a Markdown
        table (``markdown``)."""
        response = self._send(
            "GET", f"jobs/{job_id}/ranking", retry=True, params={"format": format}
        )
        return response.text if format == "markdown" else response.json()

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._get(f"jobs/{job_id}"))

    # ------------------------------------------------------------------ batches

    def submit_batch(
        self,
        base: BaseModel | Mapping[str, Any],
        grid: Mapping[str, Sequence[Any]],
        *,
        kind: str = "prune",
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> Batch:
        """Queue one job per combination of ``grid`` (dotted spec field -> values) on top
        of ``base``, e.g. ``grid={"num_blocks": [2, 4], "criterion": ["ppl", "taylor"]}``."""
        key = idempotency_key or f"shortened-client-{uuid.uuid4().hex}"
        body = {
            "kind": kind,
            "name": name,
            "base": _spec_body(base),
            "grid": {k: list(v) for k, v in grid.items()},
        }
        response = self._send(
            "POST", "jobs/batch", retry=True, json=body, headers={"Idempotency-Key": key}
        )
        return Batch.model_validate(response.json())

    def batch(self, batch_id: str) -> BatchSummary:
        """The batch's status counts and comparison table."""
        return BatchSummary.model_validate(self._get(f"batches/{batch_id}"))

    def list(
        self,
        kind: str | None = None,
        status: str | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> JobPage:
        """One page of jobs, newest first; pass ``page.next_cursor`` as ``after`` for the next."""
        data = self._get("jobs", kind=kind, status=status, limit=limit, after=after)
        return JobPage.model_validate(data)

    def iter_jobs(
        self, kind: str | None = None, status: str | None = None, page_size: int = 100
    ) -> Iterator[Job]:
        """Every matching job, newest first, fetching pages as needed."""
        after: str | None = None
        while True:
            page = self.list(kind=kind, status=status, limit=page_size, after=after)
            yield from page.items
            if not page.next_cursor:
                return
            after = page.next_cursor

    def events(self, job_id: str, after_seq: int = 0) -> builtins.list[Event]:
        """The job's events after ``after_seq``, in order (all of them, page by page)."""
        events: builtins.list[Event] = []
        while True:
            batch = _EVENT_LIST.validate_python(
                self._get(f"jobs/{job_id}/events", after_seq=after_seq, limit=1000)
            )
            events.extend(batch)
            if len(batch) < 1000:
                return events
            after_seq = batch[-1].seq

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one at once, a running one at its worker's next check (the
        returned job then has ``cancel_requested`` and is still running). A finished job is a
        409 error."""
        response = self._send("POST", f"jobs/{job_id}/cancel", retry=False)
        return Job.model_validate(response.json())

    def wait(
        self,
        job_id: str,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job has finished (succeeded, failed or cancelled) and return it;
        ``on_update(job)`` is called with every polled state, the final one included. A
        failed job is returned, not raised; over ``timeout`` seconds raises (code timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job.status in FINISHED_STATUSES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise ShortenedAPIError(
                    None,
                    "timeout",
                    f"job {job_id} is still {job.status} after {timeout:g}s",
                )
            pause = poll_interval
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(pause)

    # ------------------------------------------------------------------ artifacts

    def artifacts(self, job_id: str) -> builtins.list[Artifact]:
        """The published files of a succeeded job, with checksums and download URLs."""
        return _ARTIFACT_LIST.validate_python(self._get(f"jobs/{job_id}/artifacts"))

    def download(self, job_id: str, dest_dir: str | os.PathLike[str]) -> builtins.list[Path]:
        """Fetch every artifact of a succeeded job into ``dest_dir`` (created if needed).

        Each file is written under a temporary name and renamed into place only once its
        size and sha256 match the listed values; a mismatch raises (code
        ``artifact_corrupted``) and leaves no file under the real name. A file already
        present with the right checksum is kept without fetching it again.
        """
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        paths = []
        for artifact in self.artifacts(job_id):
            target = _local_target(dest, artifact.name)
            if not (target.is_file() and _matches(target, artifact)):
                self._download_one(artifact, target)
            paths.append(target)
        return paths

    def _download_one(self, artifact: Artifact, target: Path) -> None:
        url = urljoin(self.base_url, artifact.url)
        # The API's own paths need the key; anything else is a presigned URL that needs none.
        ours = urlsplit(url)[:2] == urlsplit(self.base_url)[:2]
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part", dir=target.parent
        )
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = self._fetch(url, ours, out)
            if size != artifact.size or digest != artifact.sha256:
                raise ShortenedAPIError(
                    None,
                    "artifact_corrupted",
                    f"{artifact.name}: got {size} bytes with sha256 {digest}, expected "
                    f"{artifact.size} bytes with sha256 {artifact.sha256}",
                )
            as_if_created(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def _fetch(self, url: str, authenticated: bool, out: Any) -> tuple[str, int]:
        """Stream ``url`` into ``out``; (sha256, size). A connection dropped mid-file is
        retried from the start, within the same bound as other calls."""
        attempt = 0
        while True:
            out.seek(0)
            out.truncate()
            digest, size = hashlib.sha256(), 0
            response = self._send("GET", url, retry=True, stream=True, authenticated=authenticated)
            try:
                for chunk in response.iter_bytes(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                return digest.hexdigest(), size
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise ShortenedAPIError(
                        None, "unreachable", f"GET {url}: {type(exc).__name__}: {exc}"
                    ) from exc
                self._wait_before_retry(attempt, None)
                attempt += 1
            finally:
                response.close()


def _matches(path: Path, artifact: ArtifactInfo) -> bool:
    if path.stat().st_size != artifact.size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == artifact.sha256
