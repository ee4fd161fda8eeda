"""Evaluating a (pruned) model the way the paper does: perplexity, zero-shot accuracy, efficiency.

- Perplexity (shortened-llm's eval_ppl.py): the evaluation text is concatenated, tokenized
  once and cut into non-overlapping windows of ``seq_len`` tokens; BOS once at the start of
  the stream (default) or at the start of every window (Gemma). PPL = exp(mean token NLL)
  over every predicted token of every window.
- Zero-shot accuracy through lm-evaluation-harness on the loaded model object; the paper's
  seven tasks report acc (BoolQ, PIQA, WinoGrande, ARC-e) or acc_norm (HellaSwag, ARC-c, OBQA).
- Efficiency (gen_batch_eval_time.py): batched sampling with the output length forced
  (min_new_tokens = max_new_tokens), warm-up runs, then timed repeats; peak memory.

Compare mode evaluates a second model (the unpruned parent) the same way and adds deltas.
"""

from __future__ import annotations

import difflib
import gc
import json
import logging
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.specs import (
    NAMED_TEXTS,
    PAPER_TASK_METRICS,
    EfficiencySpec,
    EvalSpec,
    PerplexitySpec,
    ZeroShotSpec,
)

from .baseline_cache import (
    BASELINE_VERSION,
    baseline_fingerprint,
    baseline_key,
    text_fingerprint,
)
from .calibration import fetch_data_file, read_documents, read_text
from .errors import CalibrationError, DataError, EvalTaskNotFound
from .models import count_parameters, input_device, load_model, pick_device, resolve_source
from .outputs import PhaseTimer, atomic_output_dir, check_output_dir, library_versions
from .progress import Progress, ProgressCallback, no_progress
from .score_cache import ScoreCache

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

log = logging.getLogger(__name__)


# --- perplexity --------------------------------------------------------------------------------


@dataclass
class EvalText:
    name: str
    text: str
    origin: str


def load_eval_text(
    name: str, spec: PerplexitySpec, *, store: ArtifactStore | None, cache_dir: Path | None
) -> EvalText:
    """The text of a named set (documents joined with blank lines, as the paper) or of a file:
    a .txt file as is, .jsonl/.json/.parquet records' ``field`` joined with blank lines."""
    if name in NAMED_TEXTS:
        dataset, config, split, field = NAMED_TEXTS[name]
        records = _load_named_split(name, dataset, config, split)
        return EvalText(name, "\n\n".join(records[field]), f"hf:{dataset}/{config}:{split}")
    path = fetch_data_file(name, store=store, cache_dir=cache_dir)
    if not path.is_file():
        raise DataError(
            f"perplexity text {name!r} is neither a named set ({', '.join(NAMED_TEXTS)}) nor an existing file"
        )
    if path.suffix.lower() == ".txt":
        text = read_text(path, DataError)
    else:
        try:
            text = "\n\n".join(read_documents(path, spec.field))
        except CalibrationError as exc:
            raise DataError(str(exc)) from exc
    if not text.strip():
        raise DataError(f"perplexity text {path.name} is empty")
    return EvalText(name, text, str(path))


def _load_named_split(name: str, dataset: str, config: str, split: str) -> Any:
    """The split from the hub; datasets >= 4 cannot run loading scripts (ptb_text_only has
    one), so a script-based set is read from the hub's parquet conversion branch instead."""
    from datasets import load_dataset

    errors = []
    for revision in (None, "refs/convert/parquet"):
        try:
            return load_dataset(dataset, config, split=split, revision=revision)
        except Exception as exc:  # datasets raises many types (offline, moved, script-based)
            errors.append(f"{type(exc).__name__}: {exc}")
            if "script" not in str(exc).lower():
                break
    raise DataError(
        f"cannot load perplexity set {name!r} (HF {dataset}/{config}, split {split}): "
        f"{'; '.join(errors)}; give a local text file instead"
    )


def perplexity_windows(
    token_ids: list[int], seq_len: int, bos_token_id: int | None, bos_every_window: bool
) -> torch.Tensor:
    """``[n, seq_len]`` non-overlapping windows of the token stream (tail dropped). BOS is put
    once before the stream, or before every window of ``seq_len - 1`` text tokens."""
    if bos_every_window:
        if bos_token_id is None:
            raise DataError("bos_every_window is set but the tokenizer has no BOS token")
        body = seq_len - 1
        n = len(token_ids) // body
        windows = [[bos_token_id, *token_ids[i * body : (i + 1) * body]] for i in range(n)]
    else:
        stream = ([bos_token_id] if bos_token_id is not None else []) + list(token_ids)
        n = len(stream) // seq_len
        windows = [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    if not windows:
        raise DataError(
            f"the text has {len(token_ids)} tokens: not enough for one window of {seq_len}"
        )
    return torch.tensor(windows, dtype=torch.long)


@torch.no_grad()
def window_nll(
    model: Any,
    windows: torch.Tensor,
    batch_size: int,
    progress: ProgressCallback = no_progress,
    label: str = "",
) -> torch.Tensor:
    """Per-token negative log-likelihoods (float64, flattened) of every predicted token."""
    device = input_device(model)
    nlls = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        # No KV cache: nothing is generated, and under ``block_view`` the attention layers
        # keep their original layer_idx, which a cache sized for fewer layers would reject.
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1, :].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="none"
        )
        nlls.append(nll.double().cpu())
        progress(
            Progress(
                "perplexity",
                min(start + batch_size, len(windows)),
                len(windows),
                "windows",
                message=label,
            )
        )
    return torch.cat(nlls)


def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    texts: list[EvalText],
    spec: PerplexitySpec,
    progress: ProgressCallback,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for item in texts:
        ids = tokenizer(item.text, add_special_tokens=False, verbose=False)["input_ids"]
        windows = perplexity_windows(
            ids, spec.seq_len, tokenizer.bos_token_id, spec.bos_every_window
        )
        if spec.max_windows is not None:
            windows = windows[: spec.max_windows]
        nll = window_nll(model, windows, spec.batch_size, progress, item.name)
        mean = float(nll.mean())
        results[item.name] = {
            "ppl": math.exp(mean),
            "mean_nll": mean,
            "windows": len(windows),
            "predicted_tokens": int(nll.numel()),
            "text_tokens": len(ids),
            "seq_len": spec.seq_len,
            "bos_every_window": spec.bos_every_window,
            "origin": item.origin,
        }
        n = len(windows)
        progress(
            Progress(
                "perplexity",
                n,
                n,
                "windows",
                message=item.name,
                metrics={"ppl": results[item.name]["ppl"]},
            )
        )
    return results


# --- zero-shot ----------------------------------------------------------------------------------


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


# --- efficiency ---------------------------------------------------------------------------------


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters (tied tensors counted once)."""
    return sum(
        p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
    )


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def prompt_ids(tokenizer: Any, spec: EfficiencySpec) -> list[int]:
    """The prompt's tokens; with ``input_length``, the prompt repeated and cut to that length."""
    ids = list(tokenizer(spec.prompt)["input_ids"])
    if spec.input_length is None:
        return ids
    filler = list(tokenizer(" " + spec.prompt, add_special_tokens=False)["input_ids"]) or ids
    while len(ids) < spec.input_length:
        ids.extend(filler)
    return ids[: spec.input_length]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate_efficiency(
    model: Any, tokenizer: Any, spec: EfficiencySpec, progress: ProgressCallback
) -> dict[str, Any]:
    device = input_device(model)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    ids = prompt_ids(tokenizer, spec)
    sampling = (
        {"do_sample": True, "top_k": 50, "top_p": 0.95, "temperature": 1.0}
        if spec.do_sample
        else {"do_sample": False}
    )
    configs = [(b, n) for b in spec.batch_sizes for n in spec.output_lengths]
    runs_total = len(configs) * (spec.warmup + spec.repeats)
    runs_done = 0
    rows = []
    for batch_size, output_length in configs:
        inputs = torch.tensor([ids] * batch_size, dtype=torch.long, device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(spec.seed)
        latencies = []
        generated = 0
        for run in range(spec.warmup + spec.repeats):
            _synchronize(device)
            start = time.perf_counter()
            output = model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=output_length,
                min_new_tokens=output_length,  # forced output length (no early EOS), as the paper
                pad_token_id=pad_id,
                **sampling,
            )
            _synchronize(device)
            elapsed = time.perf_counter() - start
            if run >= spec.warmup:
                latencies.append(elapsed)
            generated = output.shape[1] - inputs.shape[1]
            runs_done += 1
            progress(
                Progress(
                    "efficiency",
                    runs_done,
                    runs_total,
                    "runs",
                    message=f"batch {batch_size}, {output_length} new tokens",
                )
            )
        throughputs = [batch_size * output_length / t for t in latencies]
        rows.append(
            {
                "batch_size": batch_size,
                "input_length": len(ids),
                "output_length": output_length,
                "generated_tokens": generated,
                "repeats": len(latencies),
                "warmup": spec.warmup,
                "latency_s_mean": statistics.mean(latencies),
                "latency_s_std": statistics.pstdev(latencies),
                "throughput_tokens_per_s_mean": statistics.mean(throughputs),
                "throughput_tokens_per_s_std": statistics.pstdev(throughputs),
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
                if device.type == "cuda"
                else _peak_rss_bytes(),
            }
        )
        summary = {k: rows[-1][k] for k in ("latency_s_mean", "throughput_tokens_per_s_mean")}
        progress(
            Progress(
                "efficiency",
                runs_done,
                runs_total,
                "runs",
                message=f"batch {batch_size}, {output_length} new tokens",
                metrics=summary,
            )
        )
    return {
        "runs": rows,
        "sampling": sampling,
        "peak_memory_kind": "cuda_max_memory_allocated"
        if device.type == "cuda"
        else "process_peak_rss",
    }


# --- one model, two models, deltas --------------------------------------------------------------


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


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare_results(model: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Deltas of ``model`` against ``baseline`` (model - baseline; ratios model / baseline,
    speed-up baseline latency / model latency)."""
    deltas: dict[str, Any] = {
        "params": {
            "model": model["params"],
            "baseline": baseline["params"],
            "ratio": _ratio(model["params"], baseline["params"]),
            "removed_ratio": 1 - model["params"] / baseline["params"],
        },
        "weight_bytes": {"model": model["weight_bytes"], "baseline": baseline["weight_bytes"]},
    }
    if "perplexity" in model:
        deltas["perplexity"] = {
            name: {
                "model": r["ppl"],
                "baseline": baseline["perplexity"][name]["ppl"],
                "delta": r["ppl"] - baseline["perplexity"][name]["ppl"],
                "ratio": _ratio(r["ppl"], baseline["perplexity"][name]["ppl"]),
            }
            for name, r in model["perplexity"].items()
        }
    if "zero_shot" in model:
        tasks = {}
        for task, r in model["zero_shot"]["tasks"].items():
            base = baseline["zero_shot"]["tasks"][task]["value"]
            tasks[task] = {
                "metric": r["metric"],
                "model": r["value"],
                "baseline": base,
                "delta": r["value"] - base if r["value"] is not None and base is not None else None,
            }
        a, b = model["zero_shot"]["mean_accuracy"], baseline["zero_shot"]["mean_accuracy"]
        deltas["zero_shot"] = {
            "tasks": tasks,
            "mean_accuracy": {
                "model": a,
                "baseline": b,
                "delta": a - b if a is not None and b is not None else None,
            },
        }
    if "efficiency" in model:
        rows = []
        cpu = model["efficiency"]["peak_memory_kind"] == "process_peak_rss"
        for r, base in zip(
            model["efficiency"]["runs"], baseline["efficiency"]["runs"], strict=True
        ):
            rows.append(
                {
                    "batch_size": r["batch_size"],
                    "output_length": r["output_length"],
                    "latency_speedup": _ratio(base["latency_s_mean"], r["latency_s_mean"]),
                    "throughput_ratio": _ratio(
                        r["throughput_tokens_per_s_mean"], base["throughput_tokens_per_s_mean"]
                    ),
                    # A process's peak RSS only grows: comparable between models only on CUDA.
                    "peak_memory_ratio": None
                    if cpu
                    else _ratio(r["peak_memory_bytes"], base["peak_memory_bytes"]),
                }
            )
        deltas["efficiency"] = rows
    return deltas


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
