"""vLLM on a GPU: the pruned model against its parent, both quantized as teams serve them
(W4A16 and FP8, compressed-tensors through the export's AutoRound path), loaded by vLLM
itself; generation tokens/s at batch 1 and batch 32 and the speed-up against the ideal
L / (L - k).

    python -m bench.gpu_vllm [--scratch DIR]      # bench/gpu_check.sh runs it when vLLM is installed

The model is a random Llama in the shape of Llama-3.2-1B (16 blocks, 4 removed), in bf16,
with the tiny model's tokenizer: nothing is downloaded and only speed is measured (random
weights have no quality to keep). Quantization is round-to-nearest (AutoRound ``iters=0``) so
the check stays in minutes; the checkpoint format is the one a calibrated export writes. FP8
is skipped on a GPU without FP8 compute (compute capability below 8.9). Each vLLM engine runs
in its own process (``shortened.engine.export.vllm_runtime``, the export job's own vLLM
check), so GPU memory is returned between them. Prints a table and the JSON object last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import LLAMA_1B_SHAPE, bench_model

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-llama"
CALIBRATION = REPO / "data" / "calibration.jsonl"
NUM_LAYERS, REMOVED = LLAMA_1B_SHAPE["num_layers"], [6, 7, 8, 9]
NEW_TOKENS = 128
BATCHES = (1, 32)
SCHEMES = ("w4a16", "fp8")


def _checkpoints(root: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoTokenizer

    from shortened.engine.architectures import keep_blocks

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    model = bench_model(**LLAMA_1B_SHAPE, vocab=len(tokenizer))
    model = model.to(torch.bfloat16)
    paths = {}
    for variant in ("parent", "pruned"):
        if variant == "pruned":
            keep_blocks(model, [b for b in range(NUM_LAYERS) if b not in REMOVED])
        paths[variant] = root / variant
        model.save_pretrained(paths[variant])
        tokenizer.save_pretrained(paths[variant])
    return paths


def _quantize(model_dir: Path, scheme: str, dest: Path) -> Path:
    from shortened.engine.export.formats import export_format
    from shortened.engine.export.hf_quantize import quantize_checkpoint

    texts = [json.loads(line)["text"] for line in CALIBRATION.read_text().splitlines()[:64]]
    quantize_checkpoint(
        model_dir,
        export_format(f"hf-quantized-{scheme}"),
        dest,
        texts,
        iters=0,
        n_samples=32,
        seq_len=256,
        device="cuda",
    )
    return dest


def _measure(model_dir: Path) -> dict[str, Any]:
    """vLLM serves the checkpoint in its own process (the export's own vLLM check)."""
    from transformers import AutoTokenizer

    from shortened.engine.export.vllm_runtime import vllm_measure

    prompt_ids = AutoTokenizer.from_pretrained(model_dir)("def read_lines(path):").input_ids
    return vllm_measure(model_dir, prompt_ids, NEW_TOKENS, batch_sizes=BATCHES)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args()
    major, minor = torch.cuda.get_device_capability()
    schemes = [s for s in SCHEMES if s != "fp8" or (major, minor) >= (8, 9)]
    ideal = NUM_LAYERS / (NUM_LAYERS - len(REMOVED))
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-vllm-", dir=args.scratch) as scratch:
        root = Path(scratch)
        checkpoints = _checkpoints(root)
        for scheme in schemes:
            measured = {
                variant: _measure(_quantize(path, scheme, root / f"{variant}-{scheme}"))
                for variant, path in checkpoints.items()
            }
            assert measured["pruned"]["layers"] == NUM_LAYERS - len(REMOVED), measured
            for batch in map(str, BATCHES):
                parent = measured["parent"]["tokens_per_s"][batch]
                pruned = measured["pruned"]["tokens_per_s"][batch]
                row = {
                    "scheme": scheme,
                    "batch": int(batch),
                    "tokens_per_s_parent": parent,
                    "tokens_per_s_pruned": pruned,
                    "speedup": pruned / parent,
                    "ideal": ideal,
                    "ratio_to_ideal": pruned / parent / ideal,
                }
                rows.append(row)
                print(
                    f"vllm {scheme:<6} batch {batch:>3}: {parent:9.1f} -> {pruned:9.1f} tok/s,"
                    f" speed-up {row['speedup']:.3f} (ideal {ideal:.3f},"
                    f" {row['ratio_to_ideal']:.2f} of it)",
                    file=sys.stderr,
                    flush=True,
                )
    print(json.dumps({"rows": rows, "skipped": sorted(set(SCHEMES) - set(schemes))}))


if __name__ == "__main__":
    main()
