"""Generation efficiency as the paper's timing script (gen_batch_eval_time.py): batched
sampling with the output length forced (min_new_tokens = max_new_tokens), warm-up runs, then
timed repeats; latency, throughput and peak memory per batch size and output length.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import torch

from shortened.specs import EfficiencySpec

from ..models import input_device
from ..progress import Progress, ProgressCallback


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
        label = f"batch {batch_size}, {output_length} new tokens"
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
            progress(Progress("efficiency", runs_done, runs_total, "runs", message=label))
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
            Progress("efficiency", runs_done, runs_total, "runs", message=label, metrics=summary)
        )
    return {
        "runs": rows,
        "sampling": sampling,
        "peak_memory_kind": "cuda_max_memory_allocated"
        if device.type == "cuda"
        else "process_peak_rss",
    }
