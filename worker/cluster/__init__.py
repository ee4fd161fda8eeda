"""Multi-node training on the cluster's own training operator (docs/cluster-training.md).

A retrain job whose ``distributed.nnodes`` is more than one does not start processes on other
machines from the worker: the worker submits the training to the operator the spec names and
follows it to its end, mirroring status, progress and rank 0's output into the job, then
publishes what the training pods staged in the artifact store as the job's artifacts.

* ``kubeflow``: a Kubeflow Trainer ``TrainJob`` (``follow.run_on_kubeflow``), rendered by
  ``manifest``, read by ``status``, its log by ``logs``, through ``kube``; output collected
  by ``staging``.
* ``ray``: not implemented on this server; refused at admission and here
  (``ClusterEngineNotConfigured``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.cluster.errors import ClusterEngineNotConfigured, ClusterTrainingFailed

if TYPE_CHECKING:
    from worker.cluster.context import RunContext

__all__ = [
    "ClusterEngineNotConfigured",
    "ClusterTrainingFailed",
    "run_on_cluster",
    "runs_on_cluster",
]


def runs_on_cluster(spec: dict[str, Any]) -> bool:
    """Whether a job's spec (as stored) asks for more than one machine."""
    distributed = spec.get("distributed")
    return isinstance(distributed, dict) and int(distributed.get("nnodes", 1)) > 1


def run_on_cluster(spec: Any, ctx: RunContext) -> dict[str, Any]:
    """Run a validated multi-node spec on its engine; the report, the output in
    ``ctx.output_dir``."""
    engine = spec.distributed.engine
    if (refusal := ctx.settings.cluster_engine_refusal(engine)) is not None:
        raise ClusterEngineNotConfigured(refusal)
    try:
        import kubernetes  # noqa: F401  (the optional extra)
    except ImportError as exc:
        raise ClusterEngineNotConfigured(
            "kubeflow engine is configured but this worker lacks the Kubernetes client "
            "(install shortened[cluster])"
        ) from exc
    from worker.cluster.follow import run_on_kubeflow

    return run_on_kubeflow(spec, ctx)
