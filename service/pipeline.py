"""Pipelines: a prune job whose spec has ``retrain`` / ``eval`` sections, and the follow-up
jobs the worker creates when each step succeeds (linked through ``parent_id``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import Job, JobRow
from service.schemas import PipelineOut, PipelineStepOut
from shortened import kinds

FINISHED = ("succeeded", "failed", "cancelled")


def planned_kinds(root: Job | JobRow) -> list[str]:
    """The steps a root job's spec asks for, in order (just the root's kind if none)."""
    return kinds.planned_kinds(root.kind, root.spec)


def is_linked(job: Job | JobRow) -> bool:
    """Whether ``job`` has a parent or its spec plans follow-ups (else it is no pipeline's)."""
    return job.parent_id is not None or len(planned_kinds(job)) > 1


def root_of(session: Session, job: Job | JobRow) -> Job | JobRow:
    return ancestors(session, job)[0]


def pipeline_of(session: Session, job: Job | JobRow) -> PipelineOut | None:
    """The pipeline ``job`` belongs to, or None when it is a plain job (no links)."""
    if not is_linked(job):
        return None
    root = root_of(session, job)
    chain: list[Job | JobRow] = [root]
    frontier = [root.id]
    while frontier:
        children = session.scalars(
            select(Job).where(Job.parent_id.in_(frontier)).order_by(Job.created_at)
        ).all()
        chain.extend(children)
        frontier = [c.id for c in children]
    planned = planned_kinds(root)
    if len(chain) == 1 and len(planned) == 1:
        return None
    created = [j.kind for j in chain]
    pending = list(planned[len(created) :]) if created == planned[: len(created)] else []
    statuses = [j.status for j in chain]
    if "failed" in statuses:
        status = "failed"
    elif "cancelled" in statuses:
        status = "cancelled"
    elif all(s == "succeeded" for s in statuses) and not pending:
        status = "succeeded"
    elif statuses == ["queued"]:
        status = "queued"
    else:
        status = "running"
    current = next((j.id for j in chain if j.status not in FINISHED), None)
    return PipelineOut(
        jobs=[
            PipelineStepOut(id=j.id, kind=j.kind, status=j.status, parent_id=j.parent_id)  # type: ignore[arg-type]
            for j in chain
        ],
        pending=pending,
        status=status,  # type: ignore[arg-type]
        current=current,
    )


def followup_specs(session: Session, job: Job) -> list[tuple[str, dict[str, Any]]]:
    """The jobs to create now that ``job`` has succeeded: ``[(kind, spec)]``. A follow-up
    without a ``webhook`` or ``tracking`` of its own inherits its parent's."""
    steps = _followup_specs(session, job)
    for inherited in ("webhook", "tracking"):
        value = job.spec.get(inherited) if isinstance(job.spec, dict) else None
        if value:
            for _kind, spec in steps:
                if not spec.get(inherited):
                    spec[inherited] = value
    return steps


def _followup_specs(session: Session, job: Job) -> list[tuple[str, dict[str, Any]]]:
    chain = ancestors(session, job)
    root = chain[0]
    if not isinstance(root.spec, dict) or root.kind not in kinds.JOB_KINDS:
        return []
    step = kinds.next_step(root.kind, root.spec, [(j.kind, j.id) for j in chain])
    return [step] if step is not None else []


def ancestors(session: Session, job: Job | JobRow) -> list[Job | JobRow]:
    """``job``'s chain of parents, root first, ``job`` last."""
    chain = [job]
    seen = {job.id}
    while chain[0].parent_id is not None:
        parent = session.get(Job, chain[0].parent_id)
        if parent is None or parent.id in seen:
            break
        seen.add(parent.id)
        chain.insert(0, parent)
    return chain
