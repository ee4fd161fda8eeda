"""FastAPI dependencies: everything comes from the app's state, built by ``create_app``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session

from shortened.config import Settings

if TYPE_CHECKING:
    from celery import Celery

    from shortened.storage import ArtifactStore


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, from the app's sessionmaker."""
    with request.app.state.sessionmaker() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def model_response(
    model: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``model`` as the JSON body, serialised by pydantic-core in one call: what FastAPI's
    ``response_model`` would send (the same serialiser: non-finite floats become null), minus
    its validation of a model built here and the thread-pool round trip that validation
    takes for a sync route. For the busiest routes; the route keeps ``response_model`` for
    its documentation."""
    return Response(
        model.__pydantic_serializer__.to_json(model),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def get_store(request: Request) -> ArtifactStore:
    """The artifact store, opened on first use (a bad S3 setting must not stop the API
    from starting; /readyz reports it)."""
    state = request.app.state
    if state.store is None:
        from shortened.storage import store_from_settings

        try:
            state.store = store_from_settings(state.settings)
        except Exception as exc:
            raise HTTPException(503, detail=f"artifact store unavailable: {exc}") from exc
    return state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
