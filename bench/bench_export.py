"""GGUF export of an original and a pruned model: file size, perplexity and llama.cpp
generation speed (batch 1, greedy) at each GGUF type, and the pruned model's speed-up against
the ideal L / (L - k).

    python -m bench.bench_export              # tiny Llama (12 blocks) and a random 12-block
                                              # Llama of about 90M parameters, 4 blocks removed

Two model sizes because the tiny model (2.3M parameters) spends most of each token in
llama.cpp's per-token overhead, not in its blocks; the 90M one shows what the blocks cost.
Target: speed-up >= 0.9 of the ideal at batch 1 (reported, not asserted). Writes the rows to
``var/bench-export.json`` and prints a table, then the JSON object last (``bench.run_all``'s
convention). It took 19 minutes on the 2-core machine while other suites ran (load average 5
to 14), most of it the 90M model's perplexity and timing at five types.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import REPO, bench_model
from shortened.engine.architectures import keep_blocks
from shortened.engine.export.formats import export_format
from shortened.engine.export.gguf_export import write_gguf
from shortened.engine.export.verify import build_windows, gguf_perplexity, gguf_tokens_per_s

TINY = REPO / "models" / "tiny-llama"
HELDOUT = REPO / "data" / "stdlib_docs_heldout.txt"
OUTPUT = REPO / "var" / "bench-export.json"
NUM_LAYERS, REMOVED = 12, [4, 5, 6, 7]
TYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"]
NEW_TOKENS, ROUNDS = 64, 3
TARGET_RATIO = 0.9


def _save(model: Any, tokenizer: Any, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _checkpoints(root: Path) -> dict[str, dict[str, Path]]:
    """{model name: {"original": dir, "pruned": dir}}, pruned by the engine's block removal."""
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    kept = [b for b in range(NUM_LAYERS) if b not in REMOVED]
    sources = {
        "tiny-llama (2.3M)": AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32),
        # The tokenizer's vocabulary, so the converter's vocab matches the embedding.
        "random llama (90M)": bench_model(num_layers=NUM_LAYERS, vocab=len(tokenizer)),
    }
    models = {}
    for index, (name, model) in enumerate(sources.items()):
        original = _save(model, tokenizer, root / f"m{index}-original")
        keep_blocks(model, kept)
        models[name] = {
            "original": original,
            "pruned": _save(model, tokenizer, root / f"m{index}-pruned"),
        }
    return models


def run() -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    data = build_windows(tokenizer, [HELDOUT.read_text()], max_windows=16)
    assert data.windows is not None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as scratch:
        root = Path(scratch)
        for name, pair in _checkpoints(root).items():
            files = {
                (variant, gguf_type): write_gguf(
                    directory,
                    export_format(f"gguf-{gguf_type}"),
                    root / "gguf" / name / variant / gguf_type,
                    work_dir=root / "gguf" / name / variant,
                )
                for variant, directory in pair.items()
                for gguf_type in TYPES
            }
            # One timed run per file per round, original and pruned interleaved, so load changes
            # on a shared machine hit both alike; the median round counts.
            rates: dict[tuple[str, str], list[float]] = {key: [] for key in files}
            for _ in range(ROUNDS):
                for key, path in files.items():
                    rates[key].append(
                        gguf_tokens_per_s(path, data.prompt_ids, NEW_TOKENS, repeats=1)
                    )
            ideal = NUM_LAYERS / (NUM_LAYERS - len(REMOVED))
            for gguf_type in TYPES:
                speed = {v: statistics.median(rates[(v, gguf_type)]) for v in pair}
                speedup = speed["pruned"] / speed["original"]
                row = {
                    "model": name,
                    "type": gguf_type,
                    "blocks": f"{NUM_LAYERS} -> {NUM_LAYERS - len(REMOVED)}",
                    "mib_original": files[("original", gguf_type)].stat().st_size / 2**20,
                    "mib_pruned": files[("pruned", gguf_type)].stat().st_size / 2**20,
                    "ppl_original": gguf_perplexity(files[("original", gguf_type)], data.windows),
                    "ppl_pruned": gguf_perplexity(files[("pruned", gguf_type)], data.windows),
                    "tokens_per_s_original": speed["original"],
                    "tokens_per_s_pruned": speed["pruned"],
                    "speedup": speedup,
                    "ideal": ideal,
                    "ratio_to_ideal": speedup / ideal,
                }
                row["target_met"] = row["ratio_to_ideal"] >= TARGET_RATIO
                rows.append(row)
                print(_line(row), flush=True)
    result = {
        "rows": rows,
        "context": {
            "new_tokens": NEW_TOKENS,
            "rounds": ROUNDS,
            "windows": len(data.windows),
            "removed": REMOVED,
            "target": f"speed-up >= {TARGET_RATIO} x ideal at batch 1",
        },
    }
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['model']:<20} {row['type']:<7} {row['mib_original']:8.1f} {row['mib_pruned']:8.1f}"
        f" {row['ppl_original']:9.2f} {row['ppl_pruned']:9.2f}"
        f" {row['tokens_per_s_original']:9.1f} {row['tokens_per_s_pruned']:9.1f}"
        f" {row['speedup']:7.3f} {row['ideal']:6.3f} {row['ratio_to_ideal']:6.3f}"
    )


def main() -> None:
    print(
        f"{'model':<20} {'type':<7} {'MiB':>8} {'MiB pr.':>8} {'ppl':>9} {'ppl pr.':>9}"
        f" {'tok/s':>9} {'tok/s pr.':>9} {'speedup':>7} {'ideal':>6} {'ratio':>6}"
    )
    print(json.dumps(run()))


if __name__ == "__main__":
    main()
