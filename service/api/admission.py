"""What the submitting routes (``POST /jobs/*``, ``POST /jobs/batch``) share around
``service.submission``: the ``Idempotency-Key`` header, their documented responses, and the
translation of its refusals into HTTP answers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError

from service.batches import GridError
from service.errors import APIError, coded
from service.policy import PolicyViolation
from service.schemas import JobOut
from service.submission import IdempotencyConflict, LimitExceeded

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
    202: {
        "description": "Accepted and queued. If the broker is down the job is kept queued and "
        "its message is sent when the broker is back (a warning event says so)",
    },
    400: {"description": "The body is not JSON"},
    413: coded("Request body too large"),
    429: coded("The tenant has too many queued or running jobs"),
}


def _dry_run(
    request: Request,
    dry_run: Annotated[
        bool,
        Query(
            description="Plan only: validate and admit as a real submission (422 when it could "
            "not run, including insufficient_memory), then answer 200 with the plan (parameters, "
            "blocks, output size, peak memory per stage); nothing is created"
        ),
    ] = False,
) -> bool:
    # A repeated flag is ambiguous (``?dry_run=true&dry_run=false``): refused, never guessed.
    if len(request.query_params.getlist("dry_run")) > 1:
        raise RequestValidationError(
            [{"loc": ("query", "dry_run"), "msg": "given more than once", "type": "value_error"}]
        )
    return dry_run


# Every submitting route's ``dry_run`` (single kinds, batches, schedules): the same flag.
DryRun = Annotated[bool, Depends(_dry_run)]


def checked_idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key, checked (the header parameter documents it; this
    reads it for the handlers, which pass the raw request on)."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise _key_error("must be 1 to 255 printable ASCII characters without spaces")
    return key


def _key_error(message: str) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ("header", "Idempotency-Key"), "msg": message, "type": "value_error"}]
    )


def replayed(response: Any, location: str) -> None:
    response.status_code = 200
    response.headers["Location"] = location
    response.headers["Idempotent-Replayed"] = "true"


@contextmanager
def refusals_as_http() -> Iterator[None]:
    """Admission's refusals as the API answers them: 422 naming the field (policy, grid,
    a reused Idempotency-Key), 429 with Retry-After (the tenant's concurrency limit)."""
    try:
        yield
    except (PolicyViolation, GridError) as exc:
        raise RequestValidationError(exc.errors) from exc
    except IdempotencyConflict as exc:
        raise _key_error(str(exc)) from exc
    except LimitExceeded as exc:
        hint = (
            "retry when enough have finished or split the grid"
            if exc.batch
            else "retry when one has finished"
        )
        raise APIError(429, "too_many_jobs", f"{exc}; {hint}", {"Retry-After": "30"}) from exc
