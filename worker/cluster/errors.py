"""How a job that runs on the cluster's training operator fails, each with its own code."""

from __future__ import annotations

from shortened.engine.errors import EngineError


class ClusterEngineNotConfigured(EngineError):
    """The job asks for a cluster engine this server has not been set up for (admission
    refuses it too; this catches a job admitted before the settings changed)."""

    code = "cluster_engine_not_configured"


class ClusterTrainingFailed(EngineError):
    """The operator reported the training failed, refused the TrainJob, lost it, or the
    training pods published no complete output."""

    code = "cluster_training_failed"
