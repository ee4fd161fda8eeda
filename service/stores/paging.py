"""Cursor paging of listings newest first: the opaque cursor (``encode_cursor``,
``decode_cursor``) and one page of a query (``newest_first``), shared by every store that
lists rows one page at a time (jobs, webhook deliveries)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session


class InvalidCursor(ValueError):
    pass


class Paged(Protocol):
    """A row listed newest first, one page at a time: by (created_at, id)."""

    created_at: Any
    id: Any


def encode_cursor(row: Paged) -> str:
    raw = json.dumps({"t": row.created_at.isoformat(), "id": row.id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        created_at = datetime.fromisoformat(data["t"])
        row_id = str(data["id"])
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidCursor("invalid cursor") from exc
    if created_at.tzinfo is None:
        raise InvalidCursor("invalid cursor")
    return created_at, row_id


def newest_first(
    session: Session, query: Select[Any], model: Any, *, limit: int, after: str | None
) -> tuple[list[Any], str | None]:
    """One page of ``query``'s rows of ``model``, newest first, and the cursor of the next
    page (None on the last). Ordered by (created_at, id), so that pages never overlap or
    skip, whatever is inserted meanwhile. Raises ``InvalidCursor``."""
    if after:
        created_at, row_id = decode_cursor(after)
        query = query.where(
            or_(
                model.created_at < created_at,
                and_(model.created_at == created_at, model.id < row_id),
            )
        )
    query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor
