"""Errors the API answers with a stable machine-readable ``code`` next to ``detail``.

``{"detail": "human readable", "code": "artifact_corrupted"}``; a 422 keeps FastAPI's
``detail`` list of field errors (made JSON-safe here), and any unexpected exception is a
500 ``{"detail": "internal error", "code": "internal_error"}`` whose traceback only the
server log has.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers


class CodedError(BaseModel):
    detail: str
    code: str = Field(description="Stable machine-readable code, e.g. artifact_corrupted")


async def api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(
        {"detail": exc.message, "code": exc.code},
        status_code=exc.status_code,
        headers=exc.headers,
    )


def coded(description: str) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry for a coded error."""
    return {"model": CodedError, "description": description}


# ---------------------------------------------------------------------------- 422 and 500

_MAX_ECHO = 256


def _echo(value: Any) -> Any:
    """A JSON-safe scalar echo of an input value, or ``_OMIT``: containers (a model-level
    error's input is the whole body) are not echoed, non-finite floats and integers beyond
    64 bits become their names, long strings are cut."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else "integer beyond 64 bits"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value if len(value) <= _MAX_ECHO else value[:_MAX_ECHO] + "…"
    return _OMIT


_OMIT = object()


def field_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Validation errors as the 422 body lists them: ``loc``, ``msg``, ``type``, and the
    ``input`` and ``ctx`` values only where they are JSON-safe scalars, so the response
    always encodes whatever was sent (NaN, 1e400, a 5000-digit integer)."""
    out: list[dict[str, Any]] = []
    for error in errors:
        item: dict[str, Any] = {
            "loc": [part if isinstance(part, (str, int)) else str(part) for part in error["loc"]],
            "msg": str(error.get("msg", "")),
            "type": str(error.get("type", "value_error")),
        }
        if "input" in error and (echo := _echo(error["input"])) is not _OMIT:
            item["input"] = echo
        if isinstance(ctx := error.get("ctx"), dict):
            safe = {str(k): _echo(v) for k, v in ctx.items()}
            # An exception in ctx (a validator's ValueError) is shown by its message.
            item["ctx"] = {k: str(ctx[k]) if v is _OMIT else v for k, v in safe.items()}
        out.append(item)
    return out


async def validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": field_errors(exc.errors())}, status_code=422)


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Any unexpected exception: the traceback goes to the server log under an error id,
    the client gets that id and nothing else (no message, path or version)."""
    error_id = uuid.uuid4().hex
    log.error(
        "internal error %s on %s %s",
        error_id,
        request.method,
        request.url.path,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"error_id": error_id},
    )
    return JSONResponse(
        {"detail": "internal error", "code": "internal_error"},
        status_code=500,
        headers={"X-Error-ID": error_id},
    )


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)
