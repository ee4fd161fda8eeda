"""``export_model``: a (pruned) HF checkpoint -> deployable artifacts, each verified in its own
runtime before anything is published.

Reads top to bottom: resolve the targets against the format table and refuse what cannot be
made here (before any work) -> measure the unquantized model (and the parent) in transformers
-> for each target, write it into ``<output>/<target name>/`` and verify it (loads, tokenizer,
perplexity within the target's tolerance, tokens/s next to the parent's in the same runtime)
-> ``report.json``. Everything is written into a temporary sibling of the output directory and
moved into place only when every target passed: a failure leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import CalibrationError, DeviceUnavailable
from ..families import adapter_for_model_type
from ..gguf_source import fetch_gguf, pruned_from_gguf
from ..outputs import PhaseTimer, atomic_output_dir, check_output_dir, library_versions
from ..progress import Progress, ProgressCallback, no_progress
from . import verify
from .converter import check_converter, converter_version, default_converter_dir
from .errors import ExportVerificationFailed, UnsupportedExportTarget
from .formats import GGUF, SOURCE_TYPE, ExportFormat, export_format, gguf_architecture
from .gguf_export import gguf_file_name, llama_cpp_version, write_gguf
from .gguf_prune import prune_gguf
from .hf_quantize import (
    autoround_version,
    compressed_tensors_version,
    fp8_gpu_reason,
    quantize_checkpoint,
)
from .vllm_runtime import vllm_measure, vllm_unavailable

log = logging.getLogger(__name__)

WORK_DIR = ".work"  # intermediates (f16 GGUF for k-quants, the parent's files), never published


def resolve_targets(
    model_dir: Path,
    targets: Sequence[dict[str, str] | str],
    *,
    calibration_texts: Sequence[str] | None,
    converter_dir: Path,
) -> list[ExportFormat]:
    """The table rows for ``targets`` (duplicates once), or the reason one cannot be made for
    this model on this machine. Reads only ``config.json``."""
    formats = list(dict.fromkeys(export_format(target) for target in targets))
    if not formats:
        raise UnsupportedExportTarget("no export targets given")
    try:
        config = json.loads((model_dir / "config.json").read_text())
        model_type = config.get("model_type")
    except (OSError, ValueError) as exc:
        raise UnsupportedExportTarget(f"cannot read {model_dir}/config.json: {exc}") from exc
    adapter_for_model_type(model_type)
    for fmt in formats:
        if fmt.copies_source:
            pruned_from_gguf(model_dir)
        elif fmt.format == GGUF:
            gguf_architecture(model_type, config)
            check_converter(converter_dir)
        if fmt.needs_fp8_gpu and (reason := fp8_gpu_reason()):
            raise DeviceUnavailable(f"{fmt.name}: {reason}")
        if fmt.calibrated and not any(text.strip() for text in calibration_texts or []):
            raise CalibrationError(f"{fmt.name} is calibrated: give calibration texts")
    return formats


def _tolerance(fmt: ExportFormat, overrides: dict[str, float] | None) -> float:
    overrides = overrides or {}
    return float(overrides.get(fmt.name, overrides.get(fmt.type, fmt.ppl_tolerance)))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


class _Measure:
    """Perplexity and speed of models and artifacts, on the shared windows and prompt."""

    def __init__(
        self,
        eval_windows: verify.EvalWindows,
        new_tokens: int,
        repeats: int,
        threads: int | None,
        parent_dir: Path | None,
    ) -> None:
        self.data = eval_windows
        self.new_tokens = new_tokens
        self.repeats = repeats
        self.threads = threads
        self.parent_dir = parent_dir
        self.vllm_parent: dict[str, Any] | None = None  # the parent in vLLM, measured once

    def hf(self, model_dir: Path) -> dict[str, Any]:
        model = verify.load_hf(model_dir)
        try:
            windows = self.data.windows
            return {
                "ppl": verify.hf_perplexity(model, windows) if windows is not None else None,
                "tokens_per_s": verify.hf_tokens_per_s(
                    model, self.data.prompt_ids, self.new_tokens, repeats=self.repeats
                ),
                "quant_method": verify.quantization_method(model),
            }
        finally:
            del model

    def gguf(self, path: Path) -> dict[str, Any]:
        windows = self.data.windows
        return {
            "ppl": (
                verify.gguf_perplexity(path, windows, threads=self.threads)
                if windows is not None
                else None
            ),
            "tokens_per_s": verify.gguf_tokens_per_s(
                path,
                self.data.prompt_ids,
                self.new_tokens,
                repeats=self.repeats,
                threads=self.threads,
            ),
        }


def _vllm_check(
    fmt: ExportFormat, artifact: Path, measure: _Measure
) -> tuple[dict[str, Any] | None, list[str]]:
    """An HF-quantized artifact served by vLLM where the worker can (a CUDA GPU, vLLM
    installed): tokens/s at batch 1 and batched, beside the parent's (unquantized, in vLLM).
    None for GGUF; ``{"skipped": why}`` where vLLM cannot run here."""
    if fmt.format == GGUF:
        return None, []
    if reason := vllm_unavailable():
        return {"skipped": reason}, []
    prompt, tokens = measure.data.prompt_ids, measure.new_tokens
    try:
        served = vllm_measure(artifact, prompt, tokens)
    except RuntimeError as exc:
        return {"loads": False}, [f"vLLM cannot serve it: {exc}"]
    check: dict[str, Any] = {"loads": True, "tokens_per_s": served["tokens_per_s"]}
    if measure.parent_dir is not None:
        if measure.vllm_parent is None:
            measure.vllm_parent = vllm_measure(measure.parent_dir, prompt, tokens)
        parent_rates = measure.vllm_parent["tokens_per_s"]
        check["tokens_per_s_parent"] = parent_rates
        check["parent_as"] = "unquantized (vLLM)"
        check["speedup"] = {
            batch: rate / parent_rates[batch]
            for batch, rate in served["tokens_per_s"].items()
            if parent_rates.get(batch)
        }
    return check, []


def _run_in_runtime(
    fmt: ExportFormat, artifact: Path, measure: _Measure, tokenizer: Any
) -> tuple[dict[str, Any], str, list[str]]:
    """Perplexity and speed of the artifact in its runtime, the runtime's name, and what is
    wrong with the artifact there: one its runtime cannot even load is a failure, not a bug."""
    import transformers

    problems: list[str] = []
    try:
        if fmt.format == GGUF:
            verified_by = llama_cpp_version()
            problems += verify.gguf_tokenizer_problems(
                artifact, tokenizer, measure.data.sample_text
            )
            measured = measure.gguf(artifact)
        else:
            verified_by = (
                f"transformers {transformers.__version__} + {compressed_tensors_version()}"
            )
            measured = measure.hf(artifact)
            if measured["quant_method"] != "compressed-tensors":
                problems.append(
                    f"transformers loaded it as {measured['quant_method'] or 'unquantized'}"
                )
    except (ValueError, RuntimeError, OSError) as exc:
        log.warning("%s does not load: %s", fmt.name, exc)
        empty = {"ppl": None, "tokens_per_s": None}
        return empty, fmt.runtime, [f"does not load in its runtime: {exc}"]
    return measured, verified_by, problems


def _verify_target(
    fmt: ExportFormat,
    artifact: Path,
    measure: _Measure,
    tokenizer: Any,
    reference: dict[str, Any],
    parent: dict[str, Any] | None,
    tolerance: float,
) -> tuple[dict[str, Any], list[str]]:
    """The target's report entry and what is wrong with it (empty: verified)."""
    measured, verified_by, problems = _run_in_runtime(fmt, artifact, measure, tokenizer)
    vllm, vllm_problems = _vllm_check(fmt, artifact, measure)
    problems += vllm_problems
    ppl, ppl_unquantized = measured["ppl"], reference["ppl"]
    ppl_ratio = _ratio(ppl, ppl_unquantized)
    if ppl_ratio is not None and ppl_ratio > 1 + tolerance:
        problems.append(
            f"perplexity {ppl:.4g} is {100 * (ppl_ratio - 1):.1f}% above the unquantized "
            f"model's {ppl_unquantized:.4g} (tolerance {100 * tolerance:.1f}%)"
        )
    directory = artifact if artifact.is_dir() else artifact.parent
    files = verify.files_of(directory)
    entry = {
        "name": fmt.name,
        "format": fmt.format,
        "type": fmt.type,
        "files": files,
        "bytes": sum(item["bytes"] for item in files),
        "writer": fmt.writer,
        "ppl": ppl,
        "ppl_unquantized": ppl_unquantized,
        "ppl_parent": parent["ppl"] if parent else None,
        "ppl_ratio": ppl_ratio,
        "ppl_tolerance": tolerance,
        "tokens_per_s": measured["tokens_per_s"],
        "tokens_per_s_parent": parent["tokens_per_s"] if parent else None,
        "speedup": _ratio(measured["tokens_per_s"], parent["tokens_per_s"] if parent else None),
        "parent_as": parent["as"] if parent else None,
        "verified_by": verified_by,
        "vllm": vllm,
        "passed": not problems,
        "problems": problems,
    }
    return entry, problems


def export_model(
    model_dir: Path,
    targets: Sequence[dict[str, str] | str],
    output_dir: Path,
    *,
    calibration_texts: Sequence[str] | None = None,
    eval_texts: Sequence[str] | None = None,
    parent_dir: Path | None = None,
    ppl_tolerance: dict[str, float] | None = None,
    progress: ProgressCallback = no_progress,
    seq_len: int = 128,
    max_windows: int | None = 32,
    bos_every_window: bool = False,
    new_tokens: int = 32,
    speed_repeats: int = 3,
    threads: int | None = None,
    quantization: dict[str, Any] | None = None,
    converter_dir: Path | None = None,
    fetch_source: Callable[[str], Path] | None = None,
) -> dict[str, Any]:
    """Export ``model_dir`` to every target (``{"format": "gguf", "type": "q4_k_m"}`` or
    ``"gguf-q4_k_m"``; see ``formats.FORMATS``), each into ``output_dir/<name>/``, verify each
    in its runtime and return the report (also written as ``output_dir/report.json``).

    ``eval_texts``: perplexity texts (``None``: load and speed checks only). ``parent_dir``:
    the unpruned parent, measured in the same runtime and type for ``ppl_parent`` and
    ``speedup``. ``ppl_tolerance``: relative perplexity increase allowed, by target name or
    type, over the table's defaults. ``quantization``: AutoRound settings for HF-quantized
    targets (``iters``, ``n_samples``, ``seq_len``, ``batch_size``, ``device``).
    ``fetch_source``: for a ``gguf-source`` target, how the GGUF source its ``report.json``
    names becomes a local file (default: ``fetch_gguf`` without an artifact store).
    Raises ``ExportVerificationFailed`` when an artifact does not load or is worse than
    allowed; nothing is left in ``output_dir`` then."""
    from transformers import AutoTokenizer

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    converter_dir = converter_dir or default_converter_dir()
    check_output_dir(output_dir)
    formats = resolve_targets(
        model_dir, targets, calibration_texts=calibration_texts, converter_dir=converter_dir
    )
    copy_from = _gguf_source(model_dir, formats, fetch_source)
    timer = PhaseTimer()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eval_windows = verify.build_windows(
        tokenizer,
        eval_texts,
        seq_len=seq_len,
        max_windows=max_windows,
        bos_every_window=bos_every_window,
    )
    parent_path = Path(parent_dir) if parent_dir is not None else None
    measure = _Measure(eval_windows, new_tokens, speed_repeats, threads, parent_path)

    progress(Progress("evaluating", message="unquantized model (transformers)"))
    reference = measure.hf(model_dir)
    parent_reference = None
    if parent_dir is not None:
        progress(Progress("evaluating", message="parent (transformers)"))
        parent_reference = {**measure.hf(Path(parent_dir)), "as": "unquantized (transformers)"}
    timer("reference_s")

    entries: list[dict[str, Any]] = []
    failures: list[str] = []
    with atomic_output_dir(output_dir) as staging:
        work = staging / WORK_DIR
        for done, fmt in enumerate(formats):
            progress(Progress("exporting", done, len(formats), "targets", message=fmt.name))
            artifact = _write(
                fmt,
                model_dir,
                staging / fmt.name,
                work / "model",
                calibration_texts,
                quantization,
                converter_dir,
                threads,
                copy_from,
            )
            parent = parent_reference
            if copy_from is not None and fmt.copies_source:
                # The parent in the same runtime and type is the source file itself.
                parent = {**measure.gguf(copy_from[0]), "as": "the source GGUF (llama.cpp)"}
            elif parent_dir is not None and fmt.format == GGUF:
                parent_file = write_gguf(
                    Path(parent_dir),
                    fmt,
                    work / "parent" / fmt.name,
                    work_dir=work / "parent",
                    converter_dir=converter_dir,
                    threads=threads or 0,
                )
                parent = {**measure.gguf(parent_file), "as": f"{fmt.name} (llama.cpp)"}
            progress(Progress("verifying", done, len(formats), "targets", message=fmt.name))
            entry, problems = _verify_target(
                fmt, artifact, measure, tokenizer, reference, parent, _tolerance(fmt, ppl_tolerance)
            )
            entries.append(entry)
            failures += [f"{fmt.name}: {problem}" for problem in problems]
            timer(f"{fmt.name}_s")
        progress(Progress("verifying", len(formats), len(formats), "targets"))
        if failures:
            raise ExportVerificationFailed("; ".join(failures))
        shutil.rmtree(work, ignore_errors=True)
        report = _report(
            model_dir,
            parent_dir,
            eval_windows,
            reference,
            parent_reference,
            entries,
            seq_len,
            bos_every_window,
            converter_dir,
            timer,
        )
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _write(
    fmt: ExportFormat,
    model_dir: Path,
    dest: Path,
    work: Path,
    calibration_texts: Sequence[str] | None,
    quantization: dict[str, Any] | None,
    converter_dir: Path,
    threads: int | None,
    copy_from: tuple[Path, list[int]] | None,
) -> Path:
    """Write one target; the path to verify (a GGUF file, or a checkpoint directory)."""
    if copy_from is not None and fmt.copies_source:
        source, removed = copy_from
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / gguf_file_name(_file_type(source))
        prune_gguf(source, path, removed)
        return path
    if fmt.format == GGUF:
        return write_gguf(
            model_dir, fmt, dest, work_dir=work, converter_dir=converter_dir, threads=threads or 0
        )
    quantize_checkpoint(model_dir, fmt, dest, calibration_texts, **(quantization or {}))
    return dest


def _gguf_source(
    model_dir: Path, formats: Sequence[ExportFormat], fetch: Callable[[str], Path] | None
) -> tuple[Path, list[int]] | None:
    """For a ``gguf-source`` target: the GGUF file the model was pruned from (its local copy)
    and the blocks removed from it; None without such a target."""
    if not any(fmt.copies_source for fmt in formats):
        return None
    source, removed = pruned_from_gguf(model_dir)
    if fetch is None:
        return fetch_gguf(source, store=None, cache_dir=None), removed
    return Path(fetch(source)), removed


def _file_type(path: Path) -> str:
    """The GGUF's file type in llama.cpp's lower-case naming (``q4_1``), for its file name."""
    from shortened.gguf_meta import GGUFMetadataError, gguf_config

    try:
        return str(gguf_config(path).get("gguf_file_type") or SOURCE_TYPE).lower()
    except GGUFMetadataError:
        return SOURCE_TYPE


def _report(
    model_dir: Path,
    parent_dir: Path | None,
    eval_windows: verify.EvalWindows,
    reference: dict[str, Any],
    parent_reference: dict[str, Any] | None,
    entries: list[dict[str, Any]],
    seq_len: int,
    bos_every_window: bool,
    converter_dir: Path,
    timer: PhaseTimer,
) -> dict[str, Any]:
    windows = eval_windows.windows
    versions = {**library_versions(), "llama.cpp": llama_cpp_version()}
    versions["convert_hf_to_gguf"] = f"from llama-cpp-python {converter_version(converter_dir)}"
    if any(entry["format"] != GGUF for entry in entries):
        versions["quantizer"] = f"{autoround_version()}, {compressed_tensors_version()}"
    return {
        "model": str(model_dir),
        "parent": str(parent_dir) if parent_dir is not None else None,
        "perplexity": {
            "checked": windows is not None,
            "windows": len(windows) if windows is not None else 0,
            "seq_len": seq_len,
            "bos_every_window": bos_every_window,
        },
        "unquantized": {k: reference[k] for k in ("ppl", "tokens_per_s")},
        "parent_unquantized": (
            {k: parent_reference[k] for k in ("ppl", "tokens_per_s")} if parent_reference else None
        ),
        "targets": entries,
        "versions": versions,
        "timings": {**timer.timings, "total_s": timer.total()},
    }
