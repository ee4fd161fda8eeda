"""The job-kind table: every kind of job this service runs, one row each.

A row (:class:`JobKind`) names the kind's spec class, its admission checks, its memory plan,
the engine function that runs it (a ``"module:function"`` string, so this module stays
torch-free), the resources the worker hands that function, and the pipeline sections its
spec may continue into. Everything that used to list the kinds reads this table: the submit
routes (one per row), batches, schedules, admission, dry-run planning, pipelines, the worker
and the CLI. Adding a kind is one row here plus its engine function.

It also owns the kind-generic parts of admission and planning: :func:`problems` (the model
check, then the kind's own checks, then each pipeline section's) and :func:`plan_job` (the
kind's plan, then each section's stages on the model the job produces), and the pipeline
rule :func:`next_step` (which follow-up job a finished step creates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from shortened import admission, planning, retrain_memory
from shortened.admission import AdmissionError, Lookups, Problem
from shortened.planning import Plan, StagePlan
from shortened.specs import EvalSpec, ExportSpec, PruneSpec, RetrainSpec, SearchSpec

Check = Callable[[str, BaseModel, Lookups, "dict[str, Any] | None"], Iterator[Problem]]
PlanFn = Callable[[BaseModel, "dict[str, Any]", str], Plan]
StagesFn = Callable[[BaseModel, "dict[str, Any]", str], "list[StagePlan]"]


@dataclass(frozen=True)
class FollowUpContext:
    """Where a pipeline stands when its next section becomes a job."""

    model: str  # the newest model of the pipeline (``job://<id>``)
    root_source: str | None  # the root job's own model (the unpruned parent)
    root_output: str  # the root job's output (``job://<root id>``): the pruned model


@dataclass(frozen=True)
class JobKind:
    """One kind of job. ``check``, ``plan`` and ``stages`` receive the validated spec."""

    name: str
    spec: type[BaseModel]
    summary: str  # the submit route's description
    engine: str | Callable[..., dict[str, Any]]  # "module:function", imported by the worker
    check: Check | None = None  # the kind's own admission checks, after the model check
    plan: PlanFn | None = None  # memory plan of a job of this kind (None: not planned)
    stages: StagesFn | None = None  # its stages as a pipeline section (after a load)
    # Resources the worker passes to the engine function as keyword arguments (the
    # worker's ``engine_call`` names what each one is).
    resources: tuple[str, ...] = ()
    produces_model: bool = False  # its output is a checkpoint a follow-up can use
    prunes: bool = False  # its output has fewer blocks than its input
    batchable: bool = True  # may be the kind of a batch's grid
    # Sections of its spec that continue as follow-up jobs, in the order they run.
    sections: tuple[str, ...] = ()
    # A section's spec -> the follow-up job's full spec (for kinds that can be a section).
    follow: Callable[[Any, FollowUpContext], BaseModel] | None = None
    examples: dict[str, Any] = field(default_factory=dict)


def _follow_retrain(section: Any, ctx: FollowUpContext) -> BaseModel:
    # KD's teacher, unless given, is the unpruned parent.
    return section.for_model(ctx.model, teacher=ctx.root_source)  # type: ignore[no-any-return]


def _follow_eval(section: Any, ctx: FollowUpContext) -> BaseModel:
    # Compared with the pruned model after a retrain, else with the unpruned parent.
    baseline = ctx.root_output if ctx.model != ctx.root_output else ctx.root_source
    return section.for_model(ctx.model, baseline)  # type: ignore[no-any-return]


def _follow_export(section: Any, ctx: FollowUpContext) -> BaseModel:
    # Measured beside the unpruned parent, unless the section names another baseline.
    return section.for_model(ctx.model, ctx.root_source)  # type: ignore[no-any-return]


JOB_KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind(
            name="prune",
            spec=PruneSpec,
            summary="Queue a one-shot depth-pruning job.",
            engine="shortened.engine.prune:prune_model",
            check=admission.pruning_problems,
            plan=planning.plan_prune,
            resources=("cache_dir", "score_cache", "resume_dir"),
            produces_model=True,
            prunes=True,
            sections=("retrain", "eval", "export"),
        ),
        JobKind(
            name="retrain",
            spec=RetrainSpec,
            summary="Queue a retraining job (LoRA, continued pretraining, or both).",
            engine="shortened.engine.retrain:retrain_model",
            check=admission.retrain_problems,
            plan=retrain_memory.plan_retrain,
            stages=retrain_memory.training_stages,
            resources=("cache_dir", "checkpoint_dir", "resume"),
            produces_model=True,
            sections=("export",),
            follow=_follow_retrain,
        ),
        JobKind(
            name="eval",
            spec=EvalSpec,
            summary="Queue an evaluation job (perplexity, zero-shot accuracy, efficiency).",
            engine="shortened.engine.evaluate:evaluate_model",
            check=admission.eval_problems,
            plan=planning.plan_eval,
            stages=planning.eval_stages,
            resources=("cache_dir", "baseline_cache"),
            follow=_follow_eval,
        ),
        JobKind(
            name="export",
            spec=ExportSpec,
            summary="Queue an export: the model as GGUF files (llama.cpp, Ollama) and quantized "
            "checkpoints (vLLM, TGI), each loaded and measured in its own runtime before it is "
            "published.",
            engine="shortened.engine.export.job:export_job",
            check=admission.export_problems,
            plan=planning.plan_export,
            stages=planning.export_stages,
            resources=("cache_dir",),
            follow=_follow_export,
        ),
        JobKind(
            name="search",
            spec=SearchSpec,
            summary="Queue a search: every criterion at every block count the budget admits, "
            "ranked by perplexity on held-out calibration documents; the best is pruned and "
            "published.",
            engine="shortened.engine.search:search_model",
            check=admission.pruning_problems,
            plan=planning.plan_search,
            resources=("cache_dir", "score_cache"),
            produces_model=True,
            prunes=True,
            batchable=False,
            sections=("retrain", "eval", "export"),
        ),
    )
}


def job_kind(name: str) -> JobKind:
    """The row of kind ``name``; ``KeyError`` naming the known kinds when there is none."""
    try:
        return JOB_KINDS[name]
    except KeyError:
        raise KeyError(f"unknown job kind {name!r}; known: {', '.join(JOB_KINDS)}") from None


def kind_names() -> tuple[str, ...]:
    return tuple(JOB_KINDS)


def pruning_kinds() -> tuple[str, ...]:
    """Kinds whose output has fewer blocks than their input (reports show the removal)."""
    return tuple(name for name, kind in JOB_KINDS.items() if kind.prunes)


def parse_spec(kind: str, spec: dict[str, Any]) -> BaseModel:
    """``spec`` validated as a spec of ``kind`` (pydantic's ``ValidationError`` if not)."""
    return job_kind(kind).spec.model_validate(spec)


# --------------------------------------------------------------------------- admission


def _sections(kind: JobKind, spec: BaseModel) -> Iterator[tuple[str, BaseModel]]:
    for name in kind.sections:
        section = getattr(spec, name, None)
        if section is not None:
            yield name, section


def problems(kind: str, spec: BaseModel, lookups: Lookups | None = None) -> list[Problem]:
    """Everything that stops ``spec`` (an already validated spec of ``kind``) from running:
    its model, the kind's own checks, and each pipeline section's. (Whether it fits the
    workers' memory is :func:`plan_job`'s question.)"""
    lookups = lookups or Lookups()
    row = job_kind(kind)
    found, config = admission.model_problems(spec, lookups)
    if row.check is not None:
        found += row.check("", spec, lookups, config)
    for name, section in _sections(row, spec):
        section_check = job_kind(name).check
        if section_check is not None:
            # The section's model is this job's output: the same family as its config.
            found += section_check(f"{name}.", section, lookups, config)
    return found


def check_spec(kind: str, spec: BaseModel, lookups: Lookups | None = None) -> None:
    """Raise ``AdmissionError`` listing every problem that stops ``spec`` from running."""
    if found := problems(kind, spec, lookups):
        raise AdmissionError(found)


# --------------------------------------------------------------------------- planning


def plan_job(
    kind: str, spec: BaseModel, config: dict[str, Any], auto_device: str = "cpu"
) -> Plan | None:
    """The plan of a validated ``spec`` of ``kind`` for the model whose config is given (None
    for a kind without a plan); ``auto_device``: what ``device: auto`` means on the workers
    (``cpu`` or ``cuda``). A pipeline's sections add their stages, on the model the job
    produces."""
    row = job_kind(kind)
    if row.plan is None:
        return None
    plan = row.plan(spec, config, auto_device)
    after = planning.config_after(plan, config)
    for name, section in _sections(row, spec):
        stages_of = job_kind(name).stages
        if stages_of is not None:
            plan.stages += stages_of(section, after, auto_device)
    return plan


# --------------------------------------------------------------------------- pipelines


def planned_kinds(kind: str, spec: Any) -> list[str]:
    """The steps a root job's spec asks for, in order (just its kind if none)."""
    row = JOB_KINDS.get(kind)
    if row is None or not isinstance(spec, dict):
        return [kind]
    return [kind, *(name for name in row.sections if spec.get(name) is not None)]


def next_step(
    root_kind: str, root_spec: dict[str, Any], chain: Sequence[tuple[str, str]]
) -> tuple[str, dict[str, Any]] | None:
    """The follow-up job to create now that the last job of ``chain`` has succeeded:
    ``(kind, spec)``, or None when the pipeline is complete. ``chain`` is the pipeline's
    jobs so far, root first, as ``(kind, id)``."""
    root = job_kind(root_kind)
    steps = planned_kinds(root_kind, root_spec)[1:]
    done = len(chain) - 1
    if done >= len(steps) or [kind for kind, _ in chain[1:]] != steps[:done]:
        return None
    name = steps[done]
    parsed = root.spec.model_validate(root_spec)
    section = getattr(parsed, name)
    follow = job_kind(name).follow
    if follow is None:
        return None
    models = [job_id for kind, job_id in chain if job_kind(kind).produces_model]
    root_output = f"job://{chain[0][1]}"
    context = FollowUpContext(
        model=f"job://{models[-1]}" if models else root_output,
        root_source=getattr(parsed, "model", None),
        root_output=root_output,
    )
    return name, follow(section, context).model_dump(mode="json")
