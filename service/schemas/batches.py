"""Response models of the batch routes: a batch as submitted (its jobs and their axis
values) and its comparison table. The request body is ``service.batches.BatchRequest``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from service.models import Batch


class BatchOut(BaseModel):
    id: str
    name: str | None
    kind: str
    job_count: int
    job_ids: list[str]
    points: list[dict[str, Any]]

    @classmethod
    def from_row(cls, batch: Batch) -> BatchOut:
        points = batch.request.get("points", [])
        return cls(
            id=batch.id,
            name=batch.name,
            kind=batch.kind,
            job_count=batch.job_count,
            job_ids=[p["job_id"] for p in points],
            points=points,
        )


class BatchSummary(BaseModel):
    id: str
    name: str | None
    kind: str
    tenant: str
    status: str
    counts: dict[str, int]
    job_count: int
    axes: list[str]
    columns: list[str]
    rows: list[dict[str, Any]]
    baseline: dict[str, Any] | None
    best_by_ppl: str | None
    ppl_median: float | None
    created_at: Any
