"""Zero-shot accuracy through lm-evaluation-harness on the already-loaded model: the requested
tasks found (or ``EvalTaskNotFound`` with close names), progress per forward, and each task's
reported metric (the paper's: acc for BoolQ, PIQA, WinoGrande, ARC-e; acc_norm for
HellaSwag, ARC-c, OBQA).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from shortened.specs import PAPER_TASK_METRICS, ZeroShotSpec

from ..errors import EvalTaskNotFound
from ..progress import Progress, ProgressCallback


def task_manager_for(spec: ZeroShotSpec) -> Any:
    """An lm-eval TaskManager that knows every requested task, or ``EvalTaskNotFound``.
    Built-in tasks are indexed only when the include path does not cover the request."""
    from lm_eval.tasks import TaskManager

    include = None
    if spec.task_include_path is not None:
        include = Path(spec.task_include_path)
        if not include.is_dir():
            raise EvalTaskNotFound(f"task include path {str(include)!r} is not a directory")
        manager = TaskManager(include_path=str(include), include_defaults=False)
        if all(task in manager.all_tasks for task in spec.tasks):
            return manager
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [task for task in spec.tasks if task not in manager.all_tasks]
    if unknown:
        hints = {task: difflib.get_close_matches(task, manager.all_tasks, n=3) for task in unknown}
        hint_text = "; ".join(
            f"{task}: did you mean {', '.join(close)}?" for task, close in hints.items() if close
        )
        raise EvalTaskNotFound(
            f"unknown lm-eval task(s) {unknown}"
            + (f" ({hint_text})" if hint_text else "")
            + (
                f"; searched built-in tasks and {str(include)!r}"
                if include
                else "; give task_include_path for custom tasks"
            )
        )
    return manager


def _reporting_lm(model: Any, tokenizer: Any, batch_size: int, progress: ProgressCallback) -> Any:
    """HFLM on the already-loaded model, reporting (and so allowing cancellation) per forward."""
    from lm_eval.models.huggingface import HFLM

    class ReportingHFLM(HFLM):  # type: ignore[misc]
        forwards = 0

        def _model_call(self, inps, attn_mask=None, labels=None):  # type: ignore[no-untyped-def]
            self.forwards += 1
            progress(Progress("zero_shot", self.forwards, 0, "batches"))
            return super()._model_call(inps, attn_mask, labels)

    return ReportingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _metric_values(task_result: dict[str, Any]) -> dict[str, float]:
    """``{"acc": .., "acc_stderr": ..}`` from lm-eval's ``"acc,none"`` style keys."""
    values = {}
    for key, value in task_result.items():
        name, _, filter_name = key.partition(",")
        if (
            filter_name == "none"  # metrics carry a filter name; "sample_len" and the like do not
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            values[name] = float(value)
    return values


def evaluate_zero_shot(
    model: Any, tokenizer: Any, spec: ZeroShotSpec, manager: Any, progress: ProgressCallback
) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    progress(Progress("zero_shot", message=", ".join(spec.tasks)))
    lm = _reporting_lm(model, tokenizer, spec.batch_size, progress)
    limit: int | float | None = spec.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    output = simple_evaluate(
        model=lm,
        tasks=list(spec.tasks),
        num_fewshot=spec.num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,
    )
    assert output is not None  # None only on non-zero ranks of a distributed run
    tasks: dict[str, Any] = {}
    for task in spec.tasks:
        result = output["results"].get(task)
        if result is None:
            raise EvalTaskNotFound(f"lm-eval returned no result for task {task!r}")
        values = _metric_values(result)
        metric = PAPER_TASK_METRICS.get(task) or (
            "acc"
            if "acc" in values
            else next((k for k in values if not k.endswith("_stderr")), None)
        )
        samples = output.get("n-samples", {}).get(task, {})
        tasks[task] = {
            "metric": metric,
            "value": values.get(metric) if metric else None,
            "stderr": values.get(f"{metric}_stderr") if metric else None,
            "metrics": {k: v for k, v in values.items() if not k.endswith("_stderr")},
            "samples": samples.get("effective"),
        }
    scored = [t["value"] for t in tasks.values() if t["value"] is not None]
    mean_accuracy = sum(scored) / len(scored) if scored else None
    metrics = {task: t["value"] for task, t in tasks.items()} | {"mean_accuracy": mean_accuracy}
    progress(Progress("zero_shot", message="results", metrics=metrics))
    return {
        "tasks": tasks,
        "mean_accuracy": mean_accuracy,
        "num_fewshot": spec.num_fewshot,
        "limit": spec.limit,
        "lm_eval_version": _lm_eval_version(),
    }


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
