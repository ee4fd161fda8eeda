"""Errors the API answers with a stable machine-readable ``code`` next to ``detail``.

``{"detail": "human readable", "code": "artifact_corrupted"}``; FastAPI's own 422 keeps its
``detail`` list of field errors.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field


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
