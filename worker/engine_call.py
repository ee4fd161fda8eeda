"""The one adapter between a job and its engine function.

The job-kind table (``shortened.kinds``) names each kind's engine function and the
resources it takes; :data:`RESOURCES` says what each resource is on a worker (the model
cache, the shared block-score cache, the resume and checkpoint directories, the baseline
cache). :func:`call_engine` validates the spec, imports the function (torch: in the task's
child process only) and calls it with the progress callback, the artifact store and its
resources; a spec for more than one machine goes to the cluster's training operator instead
(``worker.cluster``).
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortened.config import Settings
from shortened.kinds import JobKind
from shortened.storage.keys import cache_scope
from worker.cluster import run_on_cluster, runs_on_cluster
from worker.reporter import JobReporter
from worker.scratch import checkpoint_dir
from worker.sessions import score_lock_factory

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore


@dataclass(frozen=True)
class EngineContext:
    """What one attempt hands its engine call."""

    job_id: str
    tenant: str
    output_dir: Path
    reporter: JobReporter
    store: ArtifactStore
    settings: Settings


def _score_cache(ctx: EngineContext) -> Any:
    """Block scores shared by every worker through the artifact store (None: turned off)."""
    from shortened.engine.score_cache import StoreScoreCache

    if not ctx.settings.score_cache:
        return None
    return StoreScoreCache(ctx.store, lock=score_lock_factory(ctx.settings), scope=_scope(ctx))


def _baseline_cache(ctx: EngineContext) -> Any:
    from shortened.engine.baseline_cache import StoreBaselineCache

    if not ctx.settings.baseline_cache:
        return None
    return StoreBaselineCache(ctx.store, scope=_scope(ctx))


def _scope(ctx: EngineContext) -> str | None:
    """Whose cache entries this job may reuse (``SHORTENED_CACHE_SCOPE``)."""
    return cache_scope(ctx.tenant) if ctx.settings.cache_scope == "tenant" else None


RESOURCES: dict[str, Callable[[EngineContext], Any]] = {
    "cache_dir": lambda ctx: ctx.settings.resolved_model_cache_dir,
    "score_cache": _score_cache,
    # Where the engine keeps state for a retry (block scores); synced to the store.
    "resume_dir": lambda ctx: ctx.reporter.resume_dir,
    "checkpoint_dir": lambda ctx: checkpoint_dir(ctx.settings, ctx.job_id),
    "resume": lambda ctx: True,
    "baseline_cache": _baseline_cache,
    "settings": lambda ctx: ctx.settings,
}


def engine_function(kind: JobKind) -> Callable[..., dict[str, Any]]:
    """The kind's engine function (``"module:function"`` imported now)."""
    if callable(kind.engine):
        return kind.engine
    module, _, name = kind.engine.partition(":")
    function: Callable[..., dict[str, Any]] = getattr(importlib.import_module(module), name)
    return function


def call_engine(kind: JobKind, spec: dict[str, Any], ctx: EngineContext) -> dict[str, Any]:
    """Run the job's engine function and return its report."""
    parsed = kind.spec.model_validate(spec)
    if runs_on_cluster(spec):  # more than one machine: the cluster's training operator
        return run_on_cluster(parsed, ctx)
    run = engine_function(kind)
    resources = {name: RESOURCES[name](ctx) for name in kind.resources}
    report = run(parsed, ctx.output_dir, progress=ctx.reporter, store=ctx.store, **resources)
    if "checkpoint_dir" in resources:  # the model is saved: nothing to resume from now
        shutil.rmtree(resources["checkpoint_dir"], ignore_errors=True)
    return report
