"""Batch grids: one request expands into a job per combination of axis values, all under one
batch id, and ``GET /batches/{id}`` puts their results side by side.

A grid is a base spec plus axes, each a dotted field path with a list of values::

    {"kind": "prune", "base": {...PruneSpec...},
     "grid": {"criterion": ["ppl", "taylor"], "num_blocks": [2, 4],
              "retrain.method": ["lora", "cpt"]}}

is 2 x 2 x 2 = 8 prune pipelines. Every combination is validated as a full spec before any
job is created; the batch is accepted or refused as a whole. Jobs that share model,
criterion and calibration (e.g. a grid over block counts) score once, through the worker's
score cache.
"""

from __future__ import annotations

import copy
import itertools
import statistics
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import Batch, Job
from service.pipeline import pipeline_of
from shortened.kinds import JOB_KINDS, job_kind
from shortened.render import markdown_cell, markdown_table


def _batchable_kind(value: str) -> str:
    batchable = [name for name, kind in JOB_KINDS.items() if kind.batchable]
    if value not in batchable:
        raise ValueError(f"a batch's kind is one of: {', '.join(batchable)}")
    return value


# The kinds a batch's grid may be of (``shortened.kinds``: ``batchable``), checked against
# the table when a request is read.
BatchKind = Annotated[
    str,
    AfterValidator(_batchable_kind),
    WithJsonSchema({"type": "string", "enum": [n for n, k in JOB_KINDS.items() if k.batchable]}),
]
MAX_VALUES_PER_AXIS = 64


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=255, description="A label for the batch")
    kind: BatchKind = Field(default="prune", description="Kind of every job of the grid")
    base: dict[str, Any] = Field(description="The spec every job starts from (a full job spec)")
    grid: dict[str, list[Any]] = Field(
        description="Axes: dotted spec field -> values (e.g. 'num_blocks': [2, 4], "
        "'retrain.method': ['lora', 'cpt']); one job per combination",
        min_length=1,
        max_length=8,
    )

    @field_validator("grid")
    @classmethod
    def _axes_ok(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in grid.items():
            parts = path.split(".")
            if not path or any(not p.isidentifier() for p in parts):
                raise ValueError(f"axis {path!r} is not a dotted field path like 'retrain.method'")
            if not 1 <= len(values) <= MAX_VALUES_PER_AXIS:
                raise ValueError(f"axis {path!r} needs 1 to {MAX_VALUES_PER_AXIS} values")
            seen = [repr(v) for v in values]
            if len(set(seen)) != len(seen):
                raise ValueError(f"axis {path!r} repeats a value")
        return grid


class GridError(Exception):
    """An invalid grid: FastAPI-style error dicts with their ``loc``."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


def _set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    node = spec
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise GridError(
                [
                    {
                        "loc": ["body", "grid", path],
                        "msg": f"{part!r} is not an object in base",
                        "type": "value_error",
                    }
                ]
            )
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def expand(request: BatchRequest, max_jobs: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every combination as ``(axis values, validated spec as JSON)``, in grid order.
    Raises ``GridError`` naming the combination and field of the first invalid spec."""
    axes = list(request.grid)
    count = 1
    for values in request.grid.values():
        count *= len(values)
    if count > max_jobs:
        raise GridError(
            [
                {
                    "loc": ["body", "grid"],
                    "msg": f"the grid has {count} combinations; at most {max_jobs} per batch",
                    "type": "value_error",
                }
            ]
        )
    spec_type = job_kind(request.kind).spec
    out = []
    for combo in itertools.product(*request.grid.values()):
        point = dict(zip(axes, combo, strict=True))
        raw = copy.deepcopy(request.base)
        for path, value in point.items():
            _set_path(raw, path, value)
        try:
            spec = spec_type.model_validate(raw)
        except ValidationError as exc:
            where = ", ".join(f"{k}={v!r}" for k, v in point.items())
            errors = []
            for item in exc.errors():
                field = ".".join(str(p) for p in item["loc"])
                on_axis = next((a for a in axes if field == a or field.startswith(a + ".")), None)
                loc = ["body", "grid", on_axis] if on_axis else ["body", "base", *item["loc"]]
                errors.append(
                    {
                        "loc": loc,
                        "msg": f"combination {where}: {field}: {item['msg']}",
                        "type": "value_error",
                    }
                )
            raise GridError(errors) from exc
        out.append((point, spec.model_dump(mode="json")))
    return out


# ------------------------------------------------------------------ the comparison table


def _first(mapping: dict[str, Any] | None) -> dict[str, Any] | None:
    if not mapping:
        return None
    return next(iter(mapping.values()))


def _eval_figures(result: dict[str, Any] | None, role: str = "model") -> dict[str, Any]:
    figures: dict[str, Any] = {}
    part = (result or {}).get(role) or {}
    if ppl := _first(part.get("perplexity")):
        figures["ppl"] = ppl.get("ppl")
    if zero_shot := part.get("zero_shot"):
        figures["accuracy"] = zero_shot.get("mean_accuracy")
    if efficiency := part.get("efficiency"):
        runs = efficiency.get("runs") or []
        first = min(runs, key=lambda r: r.get("batch_size", 0)) if runs else None
        if first:
            figures["latency_s"] = first.get("latency_s_mean")
            figures["throughput_tok_s"] = first.get("throughput_tokens_per_s_mean")
            figures["latency_batch_size"] = first.get("batch_size")
    if "params" in part:
        figures["params"] = part["params"]
    # Next-token agreement is the model's against its parent: no baseline figure of its own.
    if role == "model" and (agreement := (result or {}).get("agreement")):
        figures["agreement_top1"] = agreement.get("top1")
        figures["agreement_kl"] = agreement.get("mean_kl")
    return figures


# ---------------------------------------------------------------------------- comparison


COLUMNS = [
    "job_id", "status", "params", "params_removed_ratio", "removed_blocks", "scores_reused",
    "ppl_ratio", "ppl", "accuracy", "latency_s", "throughput_tok_s", "agreement_top1",
    "agreement_kl", "baseline_reused",
]  # fmt: skip


def _row(session: Session, job: Job, point: dict[str, Any]) -> dict[str, Any]:
    pipeline = pipeline_of(session, job)
    steps = [job]
    if pipeline is not None:
        ids = [s.id for s in pipeline.jobs]
        rows = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}
        steps = [rows[i] for i in ids if i in rows]
    row: dict[str, Any] = {"job_id": job.id, "status": pipeline.status if pipeline else job.status}
    row.update(point)
    row["jobs"] = [{"id": s.id, "kind": s.kind, "status": s.status} for s in steps]
    failed = next((s for s in steps if s.status == "failed"), None)
    if failed is not None:
        row["error"] = {
            "job_id": failed.id,
            "code": failed.error_code,
            "message": failed.error_message,
        }
    prune = next((s for s in steps if s.kind == "prune" and s.result), None)
    if prune is not None:
        report = prune.result or {}
        row.update(
            params=report.get("params_after"),
            params_removed_ratio=report.get("params_removed_ratio"),
            removed_blocks=report.get("removed_blocks"),
            scores_reused=report.get("scores_reused", 0),
        )
    # The quality gate's held-out perplexity ratio of the pipeline's first gated step (the
    # pruned model against its unpruned parent; a retrain batch's model against its input).
    gated = next((s for s in steps if (s.result or {}).get("ppl_ratio") is not None), None)
    if gated is not None:
        row["ppl_ratio"] = (gated.result or {})["ppl_ratio"]
    evaluation = next((s for s in reversed(steps) if s.kind == "eval" and s.result), None)
    if evaluation is not None:
        figures = _eval_figures(evaluation.result)
        figures.pop("params", None) if "params" in row else None
        row.update(figures)
        if (evaluation.result or {}).get("baseline"):
            row["_baseline"] = _eval_figures(evaluation.result, "baseline")
            cache = (evaluation.result or {}).get("baseline_cache") or {}
            row["baseline_reused"] = bool(cache.get("reused"))
    return row


def summarize(session: Session, batch: Batch) -> dict[str, Any]:
    jobs = session.scalars(
        select(Job).where(Job.batch_id == batch.id).order_by(Job.created_at, Job.id)
    ).all()
    points = batch.request.get("points", [])
    by_id = {p["job_id"]: p["values"] for p in points}
    rows = [_row(session, job, by_id.get(job.id, {})) for job in jobs]
    baseline = next((r.pop("_baseline") for r in rows if "_baseline" in r), None)
    for r in rows:
        r.pop("_baseline", None)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    finished = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
    if finished < len(rows):
        status = "running" if any(r["status"] != "queued" for r in rows) else "queued"
    else:
        status = "succeeded" if counts.get("succeeded", 0) == len(rows) else "finished_with_errors"
    axes = list(batch.request.get("grid", {}))
    columns = ["job_id", "status", *axes, *[c for c in COLUMNS[2:] if any(c in r for r in rows)]]
    best = None
    ranked = [r for r in rows if isinstance(r.get("ppl"), (int, float))]
    if ranked:
        best = min(ranked, key=lambda r: r["ppl"])["job_id"]
    ppl_values = [r["ppl"] for r in ranked]
    return {
        "id": batch.id,
        "name": batch.name,
        "kind": batch.kind,
        "tenant": batch.tenant,
        "created_at": batch.created_at,
        "status": status,
        "counts": counts,
        "job_count": batch.job_count,
        "axes": axes,
        "columns": columns,
        "rows": rows,
        "baseline": baseline,
        "best_by_ppl": best,
        "ppl_median": statistics.median(ppl_values) if ppl_values else None,
    }


def render_table(summary: dict[str, Any]) -> str:
    """The comparison table as GitHub-flavoured Markdown (``?format=markdown``)."""
    columns = summary["columns"]
    lines = markdown_table(columns, summary["rows"])
    if summary.get("baseline"):
        base = summary["baseline"]
        lines.append(
            "| baseline | | " + " | ".join(markdown_cell(base.get(c)) for c in columns[2:]) + " |"
        )
    return "\n".join(lines) + "\n"
