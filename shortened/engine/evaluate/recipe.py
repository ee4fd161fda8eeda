"""``evaluate_model``: evaluate a (pruned) model the way the paper does (perplexity, zero-shot
accuracy, efficiency; each section in its own module), its next-token agreement with the
parent when asked (``agreement.py``), and, in compare mode, its baseline (the
unpruned parent) the same way, with deltas; the baseline's results are reused from the
baseline cache when the same parent was evaluated the same way before. Texts and task names
are checked before any model is loaded; a NaN or infinite figure fails the evaluation
(``NonFinite``) before the baseline cache or the report keeps it; the report is written
atomically.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.specs import EvalSpec

from ..baseline_cache import (
    BASELINE_VERSION,
    baseline_fingerprint,
    baseline_key,
    text_fingerprint,
)
from ..finite import check_finite
from ..models import count_parameters, input_device, load_model, pick_device, resolve_source
from ..outputs import PhaseTimer, atomic_output_dir, check_output_dir, library_versions
from ..progress import Progress, ProgressCallback, no_progress
from ..score_cache import ScoreCache
from .agreement import load_prompt_records, measure_agreement
from .compare import compare_results
from .efficiency import evaluate_efficiency, weight_bytes
from .perplexity import EvalText, evaluate_perplexity, load_eval_text
from .zero_shot import evaluate_zero_shot, task_manager_for

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore


def evaluate_loaded(
    model: Any,
    tokenizer: Any,
    spec: EvalSpec,
    *,
    texts: list[EvalText],
    task_manager: Any,
    progress: ProgressCallback = no_progress,
) -> dict[str, Any]:
    """Every requested section on a model already in memory."""
    result: dict[str, Any] = {
        "params": count_parameters(model),
        "weight_bytes": weight_bytes(model),
        "num_layers": getattr(model.config, "num_hidden_layers", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(input_device(model)),
    }
    timer = PhaseTimer()
    if spec.perplexity is not None:
        result["perplexity"] = evaluate_perplexity(
            model, tokenizer, texts, spec.perplexity, progress
        )
        timer("perplexity_s")
    if spec.zero_shot is not None:
        result["zero_shot"] = evaluate_zero_shot(
            model, tokenizer, spec.zero_shot, task_manager, progress
        )
        timer("zero_shot_s")
    if spec.efficiency is not None:
        result["efficiency"] = evaluate_efficiency(model, tokenizer, spec.efficiency, progress)
        timer("efficiency_s")
    result["timings"] = timer.timings
    return result


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    """The measured figures of one model's evaluation: perplexities, zero-shot accuracies and
    timings (lm-eval's standard errors are left out: undefined for a single sample)."""
    zero_shot = result.get("zero_shot") or {}
    tasks = zero_shot.get("tasks") or {}
    return {
        "perplexity": result.get("perplexity"),
        "zero_shot": {name: task.get("metrics") for name, task in tasks.items()},
        "mean_accuracy": zero_shot.get("mean_accuracy"),
        "efficiency": result.get("efficiency"),
    }


def _release(model: Any) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cached_baseline(
    source: str,
    spec: EvalSpec,
    texts: list[EvalText],
    cache: ScoreCache,
    *,
    store: ArtifactStore | None,
    cache_dir: Path | None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The baseline's earlier results for this evaluation, if any, and what the report says
    about the lookup (None when the parent has no fixed identity to key on)."""
    resolved = resolve_source(source, store=store, cache_dir=cache_dir)
    memo = Path(cache_dir) / "fingerprints.json" if cache_dir else None
    fingerprint = baseline_fingerprint(resolved.path_or_id, resolved.revision, memo)
    if fingerprint is None:
        return None, None
    device = pick_device(spec.device)
    device_name = str(device)
    if device.type == "cuda":
        device_name += f" ({torch.cuda.get_device_name(device)})"
    key = baseline_key(
        model=fingerprint,
        spec=spec,
        texts=text_fingerprint(texts),
        versions=library_versions(),
        device_name=device_name,
    )
    info = {"key": key, "location": cache.location(key), "reused": False}
    entry = cache.load(key)
    if entry is None or not isinstance(entry.get("result"), dict):
        return None, info
    return {**entry["result"], "source": source}, {**info, "reused": True}


def evaluate_model(
    spec: EvalSpec,
    output_dir: Path | None = None,
    *,
    progress: ProgressCallback = no_progress,
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
    baseline_cache: ScoreCache | None = None,
) -> dict[str, Any]:
    """Evaluate ``spec.model`` (and ``spec.compare_with``, with deltas); return the report and,
    with ``output_dir``, write it there as ``report.json`` (atomically).

    With ``baseline_cache`` the baseline's results are reused when the same parent was
    evaluated the same way before (``baseline_cache.py``); ``report["baseline_cache"]`` says
    whether they were.

    Evaluation texts are read and task names checked before any model is loaded, so a bad
    file or an unknown task (``EvalTaskNotFound``) fails fast.
    """
    if output_dir is not None:
        output_dir = Path(output_dir)
        check_output_dir(output_dir)
    run_timer = PhaseTimer()
    texts: list[EvalText] = []
    if spec.perplexity is not None:
        progress(Progress("loading", message="perplexity texts"))
        texts = [
            load_eval_text(name, spec.perplexity, store=store, cache_dir=cache_dir)
            for name in spec.perplexity.datasets
        ]
    task_manager = None
    if spec.zero_shot is not None:
        progress(Progress("loading", message="lm-eval tasks"))
        task_manager = task_manager_for(spec.zero_shot)
    prompt_records: list[dict[str, Any]] = []
    if spec.agreement is not None:
        progress(Progress("loading", message="agreement prompts"))
        prompt_records = load_prompt_records(spec.agreement, store=store, cache_dir=cache_dir)

    agreement: dict[str, Any] | None = None
    results: dict[str, dict[str, Any]] = {}
    cache_info: dict[str, Any] | None = None
    for role, source in (("model", spec.model), ("baseline", spec.compare_with)):
        if source is None:
            continue
        if role == "baseline" and baseline_cache is not None:
            cached, cache_info = _cached_baseline(
                source, spec, texts, baseline_cache, store=store, cache_dir=cache_dir
            )
            if cached is not None:
                progress(Progress("evaluating", message=f"{source}: reusing its results"))
                results[role] = cached
                continue
        progress(Progress("loading", message=source))
        load_timer = PhaseTimer()
        loaded = load_model(
            source, dtype=spec.dtype, device=spec.device, store=store, cache_dir=cache_dir
        )
        load_timer("load_s")
        result = evaluate_loaded(
            loaded.model,
            loaded.tokenizer,
            spec,
            texts=texts,
            task_manager=task_manager,
            progress=progress,
        )
        check_finite(_figures(result), f"the evaluation of {source}")
        if role == "model" and spec.agreement is not None and spec.compare_with is not None:
            agreement = measure_agreement(
                loaded.model,
                loaded.tokenizer,
                spec.compare_with,
                spec.agreement,
                prompt_records,
                dtype=spec.dtype,
                device=spec.device,
                store=store,
                cache_dir=cache_dir,
                progress=progress,
            )
            check_finite(agreement, f"the agreement of {source} with {spec.compare_with}")
        result = {"source": source, "architecture": loaded.adapter.name, **result}
        result["timings"] = {**load_timer.timings, **result["timings"]}
        results[role] = result
        _release(loaded.model)
        del loaded
        if role == "baseline" and baseline_cache is not None and cache_info is not None:
            baseline_cache.save(cache_info["key"], {"version": BASELINE_VERSION, "result": result})

    report: dict[str, Any] = {
        "model": results["model"],
        "baseline": results.get("baseline"),
        "deltas": compare_results(results["model"], results["baseline"])
        if "baseline" in results
        else None,
        "agreement": agreement,
        "baseline_cache": cache_info,
        "spec": spec.model_dump(mode="json"),
        "versions": library_versions(),
        "timings": {"total_s": run_timer.total()},
    }
    if output_dir is not None:
        progress(Progress("saving", message=str(output_dir)))
        with atomic_output_dir(output_dir) as staging:
            (staging / "report.json").write_text(json.dumps(report, indent=2))
    return report
