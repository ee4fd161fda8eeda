"""Pipelines: a prune job whose spec has ``retrain`` / ``eval`` sections, and the follow-up
jobs the worker creates when each step succeeds (linked through ``parent_id``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import Job, JobRow
from service.schemas import PipelineOut, PipelineStepOut

FINISHED = ("succeeded", "failed", "cancelled")
# Kinds whose spec may continue into retrain / eval with the model they produce.
PRUNING_KINDS = ("prune", "search")


def planned_kinds(root: Job | JobRow) -> list[str]:
    """The steps a root job's spec asks for, in order (just the root's kind if none)."""
    kinds = [root.kind]
    if root.kind in PRUNING_KINDS and isinstance(root.spec, dict):
        kinds += [k for k in ("retrain", "eval") if root.spec.get(k) is not None]
    return kinds


def is_linked(job: Job | JobRow) -> bool:
    """Whether ``job`` has a parent or its spec plans follow-ups (else it is no pipeline's)."""
    return job.parent_id is not None or len(planned_kinds(job)) > 1


def root_of(session: Session, job: Job | JobRow) -> Job | JobRow:
    seen = {job.id}
    while job.parent_id is not None:
        parent = session.get(Job, job.parent_id)
        if parent is None or parent.id in seen:
            break
        seen.add(parent.id)
        job = parent
    return job


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
    from shortened.specs import JOB_SPECS, PruneSpec, SearchSpec

    if job.kind in PRUNING_KINDS:
        spec = JOB_SPECS[job.kind].model_validate(job.spec)
        assert isinstance(spec, PruneSpec | SearchSpec)
        source = f"job://{job.id}"
        if spec.retrain is not None:
            retrain = spec.retrain.for_model(source, teacher=spec.model)
            return [("retrain", retrain.model_dump(mode="json"))]
        if spec.eval is not None:
            return [("eval", spec.eval.for_model(source, spec.model).model_dump(mode="json"))]
        return []
    if job.kind == "retrain" and job.parent_id is not None:
        parent = session.get(Job, job.parent_id)
        if parent is None or parent.kind not in PRUNING_KINDS or not parent.spec.get("eval"):
            return []
        parent_spec = JOB_SPECS[parent.kind].model_validate(parent.spec)
        assert isinstance(parent_spec, PruneSpec | SearchSpec) and parent_spec.eval is not None
        evaluated = parent_spec.eval.for_model(f"job://{job.id}", f"job://{parent.id}")
        return [("eval", evaluated.model_dump(mode="json"))]
    return []
