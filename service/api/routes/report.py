"""``GET /jobs/{id}/report``: a job's report as an HTML page (Jinja2, ``service/templates``).

A prune job's page has the block-score bar chart (removed blocks red and marked R, protected
ones grey and marked P) and a table comparing the parent (original) model with the pruned one:
layers and parameters from the prune report, and perplexity, zero-shot accuracy and generation
latency/throughput from the pipeline's eval job when there is one. An eval job's page has the
same comparison of its model against ``compare_with``. A job that has not finished yet gets a
page with its progress (refreshing itself); a failed one, its error.

Same authentication and tenant scoping as the other job routes: another tenant's job is a 404.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from sqlalchemy.orm import Session

from service.api.deps import SessionDep
from service.api.routes.jobs import JobId
from service.auth import PrincipalDep, get_principal
from service.errors import coded
from service.models import FINISHED_STATUSES, Job
from service.pipeline import pipeline_of
from service.stores.job_reads import get_job
from shortened.kinds import pruning_kinds
from shortened.render import EXPORT_COLUMNS, block_score_svg, export_rows

router = APIRouter(
    prefix="/jobs",
    tags=["jobs"],
    dependencies=[Depends(get_principal)],
    responses={401: coded("Missing, invalid or revoked API key")},
)

templates = Jinja2Templates(directory=str(Path(__file__).resolve().parents[2] / "templates"))

Row = dict[str, Any]


# ---------------------------------------------------------------------------- formatting


STAGE_ORDER = ("load", "calibration", "fingerprint", "scoring", "validation", "pruning", "saving")


def _in_stage_order(timings: dict[str, Any]) -> dict[str, Any]:
    """The engine's timings in the order the stages ran (PostgreSQL's JSONB reorders keys)."""
    rank = {f"{name}_s": i for i, name in enumerate(STAGE_ORDER)}
    return dict(sorted(timings.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def fmt_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        # "#": keep trailing zeros, so a column of figures has the same precision.
        return f"{value:#.{digits}g}".rstrip(".")
    return str(value)


def fmt_params(value: int | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return str(value)


def fmt_change(new: float | None, old: float | None, *, percent: bool = True) -> str:
    """``new`` relative to ``old``: "-16.7%" (or "x1.46" with ``percent=False``)."""
    if new is None or old is None or not old:
        return ""
    if percent:
        return f"{(new - old) / old * 100:+.1f}%"
    return f"\u00d7{new / old:.3g}"


def row(label: str, parent: Any, pruned: Any, change: str = "", *, key: str = "") -> Row:
    return {"label": label, "parent": parent, "pruned": pruned, "change": change, "key": key}


# ---------------------------------------------------------------------------- eval comparisons


def eval_rows(result: dict[str, Any]) -> list[Row]:
    """Rows of an eval report comparing ``model`` with ``baseline`` (baseline = left column)."""
    model = result.get("model") or {}
    baseline = result.get("baseline") or {}
    rows: list[Row] = []
    for name, entry in (model.get("perplexity") or {}).items():
        base = (baseline.get("perplexity") or {}).get(name, {}).get("ppl")
        ppl = entry.get("ppl")
        rows.append(
            row(
                f"Perplexity ({PurePosixPath(name).name or name}, lower is better)",
                fmt_number(base),
                fmt_number(ppl),
                fmt_change(ppl, base),
                key=f"ppl:{name}",
            )
        )
    zero_shot = model.get("zero_shot") or {}
    base_zero_shot = baseline.get("zero_shot") or {}
    for task, entry in (zero_shot.get("tasks") or {}).items():
        base_entry = (base_zero_shot.get("tasks") or {}).get(task, {})
        rows.append(
            row(
                f"{task} ({entry.get('metric', 'acc')})",
                fmt_pct(base_entry.get("value")),
                fmt_pct(entry.get("value")),
                fmt_points(entry.get("value"), base_entry.get("value")),
                key=f"acc:{task}",
            )
        )
    if zero_shot:
        rows.append(
            row(
                "Mean zero-shot accuracy",
                fmt_pct(base_zero_shot.get("mean_accuracy")),
                fmt_pct(zero_shot.get("mean_accuracy")),
                fmt_points(zero_shot.get("mean_accuracy"), base_zero_shot.get("mean_accuracy")),
                key="acc:mean",
            )
        )
    base_runs = (baseline.get("efficiency") or {}).get("runs") or []
    for i, run in enumerate((model.get("efficiency") or {}).get("runs") or []):
        base = base_runs[i] if i < len(base_runs) else {}
        where = f"batch {run.get('batch_size')}, {run.get('output_length')} tokens"
        latency, base_latency = run.get("latency_s_mean"), base.get("latency_s_mean")
        rows.append(
            row(
                f"Latency, s ({where})",
                fmt_number(base_latency),
                fmt_number(latency),
                f"speed-up {fmt_change(base_latency, latency, percent=False)}"
                if latency and base_latency
                else "",
                key=f"latency:{i}",
            )
        )
        tput, base_tput = (
            run.get("throughput_tokens_per_s_mean"),
            base.get("throughput_tokens_per_s_mean"),
        )
        rows.append(
            row(
                f"Throughput, tokens/s ({where})",
                fmt_number(base_tput),
                fmt_number(tput),
                fmt_change(tput, base_tput, percent=False),
                key=f"throughput:{i}",
            )
        )
    if agreement := result.get("agreement"):
        # The parent agrees with itself fully, at zero divergence: its column says so.
        where = f"{agreement.get('prompts')} prompts, {agreement.get('positions')} positions"
        rows.append(
            row(
                f"Top-1 next-token agreement with the parent ({where})",
                fmt_pct(1.0),
                fmt_pct(agreement.get("top1")),
                key="agreement:top1",
            )
        )
        rows.append(
            row(
                "Mean KL(parent || model), nats (lower is closer)",
                fmt_number(0.0),
                fmt_number(agreement.get("mean_kl")),
                key="agreement:kl",
            )
        )
    return rows


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def fmt_points(new: float | None, old: float | None) -> str:
    if new is None or old is None:
        return ""
    return f"{(new - old) * 100:+.1f} pts"


def pipeline_eval(session: Session, job: Job, scope: str | None) -> tuple[Job | None, Job | None]:
    """(the pipeline's eval job, its retrain job) among the jobs linked to ``job``."""
    pipeline = pipeline_of(session, job)
    if pipeline is None:
        return None, None
    found: dict[str, Job] = {}
    for step in pipeline.jobs:
        if step.kind in ("eval", "retrain") and step.kind not in found:
            linked = get_job(session, step.id, scope)
            if linked is not None:
                found[step.kind] = linked
    return found.get("eval"), found.get("retrain")


# ---------------------------------------------------------------------------- page context


def spec_summary(job: Job) -> list[tuple[str, str]]:
    spec = job.spec or {}
    keys = {
        "prune": (
            "model",
            "criterion",
            "num_blocks",
            "target_ratio",
            "protect_first",
            "protect_last",
        ),
        "search": (
            "model",
            "criteria",
            "target_ratio",
            "num_blocks",
            "min_speedup",
            "protect_first",
            "protect_last",
        ),
        "retrain": ("model", "method"),
        "eval": ("model", "compare_with"),
        "export": ("model", "compare_with"),
    }.get(job.kind, ("model",))
    items = [(k, fmt_spec_value(spec[k])) for k in keys if spec.get(k) is not None]
    calibration = spec.get("calibration")
    if isinstance(calibration, dict):
        source = calibration.get("source") or calibration.get("dataset")
        detail = ", ".join(
            f"{k} {calibration[k]}" for k in ("n_samples", "seq_len") if calibration.get(k)
        )
        items.append(("calibration", f"{source} ({detail})" if detail else str(source)))
    for k in ("dtype", "device"):
        if spec.get(k) is not None:
            items.append((k, str(spec[k])))
    if job.kind == "export" and isinstance(spec.get("targets"), list):
        names = [
            f"{t.get('format')}:{t.get('type')}" for t in spec["targets"] if isinstance(t, dict)
        ]
        items.append(("targets", ", ".join(names)))
    for section in ("retrain", "eval", "export", "perplexity", "zero_shot", "efficiency"):
        if spec.get(section) is not None:
            items.append((section, "yes"))
    return items


def fmt_spec_value(value: Any) -> str:
    """A spec value on one line: lists joined, a block range as ``min..max``."""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict) and set(value) == {"min", "max"}:
        return f"{value['min']}..{value['max']} blocks"
    return fmt_number(value)


def ranking_rows(report: dict[str, Any]) -> list[Row]:
    """A search's ranked candidates, formatted for the page (best first)."""
    search = report.get("search") or {}
    return [
        {
            "rank": r.get("rank"),
            "criteria": ", ".join(r.get("criteria") or []),
            "num_blocks": r.get("num_blocks"),
            "removed": ", ".join(map(str, r.get("removed_blocks") or [])),
            "params_after": fmt_params(r.get("params_after")),
            "speedup": fmt_number(r.get("estimated_speedup"), 3),
            "ppl": fmt_number(r.get("validation_ppl")),
        }
        for r in search.get("ranking") or []
    ]


def flat_items(value: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """Scalar leaves of a result as (dotted key, text), for the generic results table."""
    if isinstance(value, dict) and depth < 4:
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            out.extend(flat_items(v, f"{prefix}.{k}" if prefix else str(k), depth + 1))
        return out
    if isinstance(value, list):
        if len(value) <= 12 and all(not isinstance(v, (dict, list)) for v in value):
            return [(prefix, ", ".join(fmt_number(v) for v in value))]
        return [(prefix, f"[{len(value)} items]")]
    return [(prefix, fmt_number(value))]


def prune_context(session: Session, job: Job, scope: str | None) -> dict[str, Any]:
    report = job.result or {}
    eval_job, retrain_job = pipeline_eval(session, job, scope)
    before, after = report.get("params_before"), report.get("params_after")
    size_rows = [
        row(
            "Layers (blocks)",
            fmt_number(report.get("num_layers_before")),
            fmt_number(report.get("num_layers_after")),
            f"-{report.get('num_blocks_removed', 0)} blocks",
            key="layers",
        ),
        row(
            "Parameters",
            fmt_params(before),
            fmt_params(after),
            fmt_change(after, before),
            key="params",
        ),
        row("Parameters (exact)", fmt_number(before), fmt_number(after), "", key="params-exact"),
    ]
    evaluation = None
    if eval_job is not None:
        evaluation = {
            "job": eval_job,
            "finished": eval_job.status == "succeeded",
            "baseline": (eval_job.spec or {}).get("compare_with"),
            "model": (eval_job.spec or {}).get("model"),
            "rows": eval_rows(eval_job.result or {}) if eval_job.status == "succeeded" else [],
            "retrained": retrain_job is not None,
        }
    scores = report.get("block_scores") or []
    # Wide bars for small models, narrow ones for 80-block models: about 700 px in all.
    bar_width = max(8, min(40, 700 // max(len(scores), 1) - 6))
    svg = block_score_svg(report, bar_width=bar_width, annotate=True) if scores else ""
    return {
        "report": report,
        "chart": Markup(svg),  # noqa: S704 - built by render.py from numbers and escaped text
        "size_rows": size_rows,
        "evaluation": evaluation,
        "removed": report.get("removed_blocks", []),
        "protected": report.get("protected_blocks", []),
        "scores_reused": report.get("scores_reused") or 0,
        "resumed_scores": report.get("resumed_scores") or 0,
        "timings": _in_stage_order(report.get("timings") or {}),
        "ranking": ranking_rows(report),
        "search": report.get("search"),
    }


@router.get(
    "/{job_id}/report",
    response_class=HTMLResponse,
    responses={
        200: {"content": {"text/html": {}}},
        # Errors are JSON like every other route's, not HTML.
        401: {**coded("Missing, invalid or revoked API key"), "content": {"application/json": {}}},
        404: {"description": "No job with this id", "content": {"application/json": {}}},
        422: {"description": "Validation error", "content": {"application/json": {}}},
    },
)
def job_report(
    job_id: JobId, request: Request, session: SessionDep, principal: PrincipalDep
) -> HTMLResponse:
    """The job's report as an HTML page: block-score chart and parent-vs-pruned table for a
    prune job (a search job adds its ranked candidates), the comparison table for an eval job, progress while the job runs."""
    job = get_job(session, job_id, principal.scope)
    if job is None:
        raise HTTPException(404, detail=f"job {job_id} not found")
    finished = job.status in FINISHED_STATUSES
    context: dict[str, Any] = {
        "job": job,
        "finished": finished,
        "spec_items": spec_summary(job),
        "progress": {
            "stage": job.stage,
            "done": job.progress_done or 0,
            "total": job.progress_total or 0,
            "unit": job.progress_unit or "",
            "percent": round(100 * job.progress_done / job.progress_total)
            if job.progress_total
            else None,
        },
        "duration_s": (job.finished_at - job.started_at).total_seconds()
        if job.finished_at and job.started_at
        else None,
        "prune": None,
        "eval_rows": [],
        "export_rows": [],
        "export_columns": EXPORT_COLUMNS,
        "result_items": [],
    }
    if job.status == "succeeded":
        if job.kind in pruning_kinds():
            context["prune"] = prune_context(session, job, principal.scope)
        elif job.kind == "eval":
            context["eval_rows"] = eval_rows(job.result or {})
        elif job.kind == "export":
            context["export_rows"] = export_rows(job.result or {})
        if job.kind not in pruning_kinds():
            context["result_items"] = flat_items(job.result or {})
    return templates.TemplateResponse(request, "report.html", context)
