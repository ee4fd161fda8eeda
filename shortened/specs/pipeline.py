"""The follow-up sections of a pruning spec (``retrain``, ``eval``): the follow-up jobs' specs
without ``model``, which the worker fills in with ``job://<parent id>`` when the parent job
succeeds.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from .common import check_source
from .evaluation import EvalSpec
from .retraining import KdSpec, RetrainSpec


class PipelineRetrain(RetrainSpec):
    """A RetrainSpec without ``model``: the pruned model (``job://<prune id>``) is retrained."""

    model: None = Field(default=None, exclude=True, description="Not given: the parent job's model")  # type: ignore[assignment]  # torch/transformers stubs

    @field_validator("model")
    @classmethod
    def _model_ok(cls, value: None) -> None:  # type: ignore[override]
        return value

    def _check_teacher(self, kd: KdSpec) -> None:
        """The teacher may be left out: ``for_model`` fills in the pruned model's source."""

    @field_validator("export")
    @classmethod
    def _export_at_the_top(cls, value: object) -> None:
        if value is not None:
            raise ValueError("give the pipeline's export at the top level of the spec")
        return None

    def for_model(self, model: str, teacher: str | None = None) -> RetrainSpec:
        """The follow-up job's spec: ``model`` retrained; KD's teacher, unless given, is
        ``teacher`` (the prune job's source model, the unpruned parent)."""
        data = {**self.model_dump(mode="json"), "model": model}
        if data.get("kd") is not None and data["kd"].get("teacher") is None:
            data["kd"]["teacher"] = teacher
        return RetrainSpec.model_validate(data)


class PipelineEval(EvalSpec):
    """An EvalSpec without ``model``: the pipeline's last model is evaluated. ``compare_with``
    defaults to the pruned model (after a retrain) or the unpruned one (otherwise)."""

    model: None = Field(default=None, exclude=True, description="Not given: the parent job's model")  # type: ignore[assignment]  # torch/transformers stubs

    @field_validator("model")
    @classmethod
    def _source_ok(cls, value: str | None) -> str | None:  # type: ignore[override]
        return None if value is None else check_source(value)

    def _check_parent(self) -> None:
        """``compare_with`` may be left out: ``for_model`` fills in the pipeline's parent."""

    def for_model(self, model: str, compare_with: str | None) -> EvalSpec:
        data = self.model_dump(mode="json")
        data["model"] = model
        if data.get("compare_with") is None:
            data["compare_with"] = compare_with
        return EvalSpec.model_validate(data)
