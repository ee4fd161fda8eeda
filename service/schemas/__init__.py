"""The API's request and response models, one module per group of routes: ``jobs``,
``batches``, ``schedules``, ``webhooks``, ``health``. Request bodies of the job routes are the shared
specs in ``shortened.specs``.

The job and health models, which most of the service uses, are importable from the package
itself.
"""

from service.schemas.health import ComponentOut, ReadinessOut
from service.schemas.jobs import (
    ArtifactLink,
    ArtifactOut,
    AttemptOut,
    ErrorOut,
    EventOut,
    EventType,
    JobKind,
    JobOut,
    JobPage,
    JobStatus,
    PipelineOut,
    PipelineStepOut,
    ProgressOut,
)

__all__ = [
    "ArtifactLink",
    "ArtifactOut",
    "AttemptOut",
    "ComponentOut",
    "ErrorOut",
    "EventOut",
    "EventType",
    "JobKind",
    "JobOut",
    "JobPage",
    "JobStatus",
    "PipelineOut",
    "PipelineStepOut",
    "ProgressOut",
    "ReadinessOut",
]
