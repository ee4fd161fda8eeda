"""What a retrain run leaves in its output directory: the model (LoRA: merged, unless told
otherwise), ``adapter/`` pointing at its base, for cpt_lora the CPT model as ``cpt/``, and
``report.json`` (the spec, every stage's report entry, parameters, precision, timings),
all appearing at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..models import count_parameters
from ..outputs import PhaseTimer, atomic_output_dir, library_versions, save_model
from .run import RetrainRun


def retrain_report(run: RetrainRun, timer: PhaseTimer) -> dict[str, Any]:
    spec, stages = run.spec, run.stages
    return {
        "model": spec.model,
        "model_commit": run.loaded.resolved.commit,
        "method": spec.method,
        "architecture": run.loaded.adapter.name,
        "model_type": run.model.config.model_type,
        "num_layers": run.loaded.adapter.num_layers(run.model),
        "hyperparameters": spec.model_dump(mode="json"),
        "stages": stages,
        "steps": sum(s["steps"] for s in stages),
        "final_train_loss": stages[-1]["train_loss_last"],
        "final_eval_loss": stages[-1]["eval_loss"],
        "params": run.params_before,
        "trainable_params": run.trainable,
        "precision": run.precision.label,
        "device": str(run.device),
        "outputs": {"model": "."},
        "versions": _versions(),
        "timings": timer.timings,
    }


def write_outputs(
    run: RetrainRun, report: dict[str, Any], output_dir: Path, timer: PhaseTimer
) -> None:
    """The model (LoRA: merged, unless ``merge`` is off), ``adapter/``, for cpt_lora ``cpt/``,
    and report.json, all appearing at ``output_dir`` at once."""
    spec, loaded = run.spec, run.loaded
    with atomic_output_dir(output_dir) as staging:
        model = run.model
        if run.peft_model is not None:
            _write_adapter(run, report, staging, output_dir)
            if spec.lora.merge:
                model = run.peft_model.merge_and_unload()
        if run.peft_model is None or spec.lora.merge:
            save_model(
                model,
                loaded.tokenizer,
                staging,
                loaded.source_dtype,
                max_shard_size=spec.max_shard_size or loaded.source_shard_size,
            )
            report["params"] = count_parameters(model)
        else:
            report["outputs"].pop("model")
        timer("saving_s")
        timer.timings["total_s"] = timer.total()
        report["timings"] = timer.timings
        (staging / "report.json").write_text(json.dumps(report, indent=2))


def _write_adapter(
    run: RetrainRun, report: dict[str, Any], staging: Path, output_dir: Path
) -> None:
    """``adapter/`` pointing at its base, and for cpt_lora that base (the CPT model) as ``cpt/``."""
    spec = run.spec
    adapter_base = (
        str(output_dir.resolve() / "cpt")
        if spec.method == "cpt_lora"
        else run.loaded.resolved.hub_id or run.loaded.resolved.path_or_id
    )
    run.peft_model.save_pretrained(str(staging / "adapter"))
    _set_adapter_base(staging / "adapter", adapter_base)
    run.loaded.tokenizer.save_pretrained(staging / "adapter")
    report["outputs"]["adapter"] = "adapter"
    report["adapter_base"] = adapter_base
    if spec.method == "cpt_lora":
        done_dir = run.cpt_done_dir
        cpt_saved = done_dir if done_dir is not None and done_dir.is_dir() else run.scratch_cpt
        assert cpt_saved is not None
        shutil.copytree(
            cpt_saved,
            staging / "cpt",
            ignore=shutil.ignore_patterns("stage_report.json"),
        )
        report["outputs"]["cpt_model"] = "cpt"


def _set_adapter_base(adapter_dir: Path, base: str) -> None:
    """Point adapter_config.json at the model the adapter was trained on (for cpt_lora: the
    ``cpt/`` model next to it, not the pruned model the run started from)."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _versions() -> dict[str, str]:
    import accelerate
    import peft

    return {**library_versions(), "peft": peft.__version__, "accelerate": accelerate.__version__}
