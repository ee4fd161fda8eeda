"""Expert pruning measured: does keeping the experts the calibration text routes to most
(``shortened.engine.expert_pruning``) preserve quality better than keeping a random choice
of as many, and how does it compare with, and combine with, depth pruning?

A tiny Mixtral-style mixture of experts (6 blocks, hidden 128, 8 experts of 128, top-2,
tied embeddings, the tokenizer of models/tiny-llama) is trained here from scratch on
data/stdlib_docs_train.jsonl (300 steps of 16 x 128 tokens), twice: with transformers'
Mixtral load-balancing loss (coefficient 0.02; it balances the experts pooled over all
blocks, so a block's own routing may stay skewed) and with a Switch-Transformer loss per
block (each block's experts balanced). Each trained model is cached under var/bench-cache/,
so a rerun skips training. Then, on each:

* the parent;
* depth pruning alone: ``k`` of the 6 blocks (the ``ppl`` criterion, one block protected at
  each end, through ``prune_model``);
* expert pruning alone: each MoE block keeps 75 % or 50 % of its experts by routing
  frequency on the calibration windows, and the same counts drawn at random (median of 5
  draws: the baseline telling whether the criterion helps);
* both: ``k`` blocks then 75 % / 50 % of the experts in one prune job, and ``k`` blocks then
  a random 50 % (median of 5).

Measured: held-out perplexity (data/stdlib_docs_heldout.txt, the whole file tokenized with
one ``<s>`` first, non-overlapping 128-token windows, the last partial one dropped: the
protocol of models/tiny-llama/TRAINING.md), parameters in total and active per token, and
how skewed the routing is (the share of the top-k selections that go to the kept experts,
on the calibration windows and on the held-out windows).

    python -m bench.bench_experts            # the tables, var/bench-experts.json, a JSON line last
    python -m bench.bench_experts --steps 300 --threads 1

``make bench-experts``; docs/experts.md holds the figures of one run and what they mean.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import REPO
from shortened.engine.architectures import adapter_for
from shortened.engine.calibration import calibration_windows
from shortened.engine.expert_pruning import prune_experts, prune_experts_by_frequency
from shortened.engine.models import count_parameters
from shortened.engine.moe import count_active_parameters, routing_counts
from shortened.engine.prune import prune_model
from shortened.engine.retrain_data import pack_blocks
from shortened.specs import CalibrationSpec, PruneSpec

TOKENIZER = REPO / "models" / "tiny-llama"
TRAIN = REPO / "data" / "stdlib_docs_train.jsonl"
HELDOUT = REPO / "data" / "stdlib_docs_heldout.txt"
CALIBRATION = REPO / "data" / "calibration.jsonl"
CACHE = REPO / "var" / "bench-cache"
RESULTS = REPO / "var" / "bench-experts.json"

SEQ_LEN, BATCH, LEARNING_RATE, WARMUP = 128, 16, 3e-3, 30
EXPERTS, TOP_K = 8, 2
ARCHITECTURE = {
    "hidden_size": 128,
    "intermediate_size": 128,  # one expert's
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": EXPERTS,
    "num_experts_per_tok": TOP_K,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
# Routing regimes: the load-balancing loss while training and its coefficient. "pooled":
# transformers' Mixtral loss, which pools the top-k assignments and router probabilities of
# all blocks before balancing, so expert e of one block can stand in for expert e of another;
# "per_block": the Switch-Transformer loss of every block, averaged, which balances each
# block's own experts. "none" (run on request): routers free to favour some experts.
REGIMES = {"mixtral": ("pooled", 0.02), "per-block": ("per_block", 0.2), "none": ("pooled", 0.0)}
DEFAULT_REGIMES = ("mixtral", "per-block")
KEEP = {"75%": 6, "50%": 4}
DEPTH_BLOCKS = 2
RANDOM_DRAWS = 5
CALIBRATION_SPEC = CalibrationSpec(source=str(CALIBRATION), n_samples=32, seq_len=SEQ_LEN)


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def per_block_balance_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The Switch-Transformer load-balancing loss of each block, ``E * sum_e f_e * P_e``
    (``f_e``: the share of the block's top-k assignments expert ``e`` got, ``P_e``: its mean
    router probability; 1 when balanced), averaged over the blocks."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        chosen = probs.topk(TOP_K, dim=-1).indices.flatten()
        share = torch.bincount(chosen, minlength=EXPERTS).float() / chosen.numel()
        losses.append(EXPERTS * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def _config(tokenizer: Any, aux_coef: float) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        router_aux_loss_coef=aux_coef,
        **ARCHITECTURE,
    )


def _cache_dir(regime: str, steps: int) -> Path:
    """The trained model's directory: keyed by everything that decides its weights."""
    key = json.dumps(
        [ARCHITECTURE, REGIMES[regime], steps, SEQ_LEN, BATCH, LEARNING_RATE, WARMUP],
        sort_keys=True,
    )
    key += hashlib.sha256(TRAIN.read_bytes()).hexdigest()
    return CACHE / f"experts-moe-{regime}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def train(regime: str, steps: int) -> tuple[Path, dict[str, Any]]:
    """The trained model of ``regime`` (trained now unless cached) and its training record."""
    from transformers import MixtralForCausalLM, get_cosine_schedule_with_warmup

    path = _cache_dir(regime, steps)
    if (path / "training.json").is_file():
        record = json.loads((path / "training.json").read_text())
        return path, {**record, "regime": regime, "cached": True}
    tokenizer = _tokenizer()
    texts = [json.loads(line)["text"] for line in TRAIN.read_text().splitlines() if line.strip()]
    blocks = torch.tensor(list(pack_blocks(texts, tokenizer, SEQ_LEN)))
    torch.manual_seed(0)
    kind, coef = REGIMES[regime]
    config = _config(tokenizer, coef if kind == "pooled" else 0.0)
    config.output_router_logits = True  # the balancing loss needs the router logits
    model = MixtralForCausalLM(config).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.1
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, WARMUP, steps)
    order = torch.Generator().manual_seed(0)
    started, losses = time.monotonic(), []
    for step in range(steps):
        batch = blocks[torch.randint(len(blocks), (BATCH,), generator=order)]
        out = model(input_ids=batch, labels=batch)
        lm_loss = out.loss - config.router_aux_loss_coef * out.aux_loss
        balance = out.aux_loss if kind == "pooled" else per_block_balance_loss(out.router_logits)
        (lm_loss + coef * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(lm_loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            print(
                f"[{regime}] step {step}: lm loss {losses[-1]:.3f}, balance {float(balance):.3f}",
                file=sys.stderr,
            )
    record = {
        "regime": regime,
        "balance_loss": kind,
        "balance_coef": coef,
        "steps": steps,
        "tokens": steps * BATCH * SEQ_LEN,
        "training_blocks": len(blocks),
        "final_lm_loss": round(statistics.mean(losses[-20:]), 4),
        "train_s": round(time.monotonic() - started, 1),
    }
    model.config.output_router_logits = False
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "training.json").write_text(json.dumps(record, indent=1))
    return path, {**record, "cached": False}


def heldout_windows(tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(HELDOUT.read_text(), verbose=False)["input_ids"]
    count = len(ids) // SEQ_LEN
    return torch.tensor(ids[: count * SEQ_LEN]).view(count, SEQ_LEN)


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor, batch_size: int = 16) -> float:
    total, tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total, tokens = total + float(loss), tokens + targets.numel()
    return math.exp(total / tokens)


def load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def kept_share(counts: dict[int, torch.Tensor], kept: dict[int, list[int]]) -> float:
    """The share of the top-k selections (over every MoE block) that went to kept experts."""
    chosen = sum(int(counts[i][kept[i]].sum()) for i in kept)
    return chosen / sum(int(counts[i].sum()) for i in kept)


def measure(model: Any, windows: torch.Tensor, **extra: Any) -> dict[str, Any]:
    adapter = adapter_for(model)
    return {
        "blocks": adapter.num_layers(model),
        "experts": int(model.config.num_local_experts),
        "params": count_parameters(model),
        "active_params": count_active_parameters(model, adapter),
        "ppl": round(perplexity(model, windows), 2),
        **extra,
    }


def by_frequency(
    model: Any, calibration: torch.Tensor, heldout: torch.Tensor, keep: int
) -> dict[str, Any]:
    """``model`` (changed in place) with ``keep`` experts per block by routing frequency."""
    adapter = adapter_for(model)
    heldout_counts = routing_counts(model, adapter, heldout, 16)
    report = prune_experts_by_frequency(model, adapter, calibration, 8, keep_experts=keep)
    kept = {int(i): block["kept"] for i, block in report["blocks"].items()}
    selections = {int(i): torch.tensor(b["selections"]) for i, b in report["blocks"].items()}
    return measure(
        model,
        heldout,
        kept_share_calibration=round(kept_share(selections, kept), 4),
        kept_share_heldout=round(kept_share(heldout_counts, kept), 4),
    )


def at_random(parent: Any, heldout: torch.Tensor, keep: int) -> dict[str, Any]:
    """The median perplexity of ``RANDOM_DRAWS`` random choices of ``keep`` experts per block
    (each draw on a fresh copy of ``parent``); the draws' perplexities and routing shares."""
    adapter = adapter_for(parent)
    counts = routing_counts(parent, adapter, heldout, 16)
    draws, shares, result = [], [], {}
    for seed in range(RANDOM_DRAWS):
        rng = random.Random(seed)
        model = copy.deepcopy(parent)
        kept = {i: sorted(rng.sample(range(EXPERTS), keep)) for i in counts}
        prune_experts(model, adapter, kept)
        result = measure(model, heldout)
        draws.append(result["ppl"])
        shares.append(kept_share(counts, kept))
    return {
        **result,
        "ppl": round(statistics.median(draws), 2),
        "ppl_draws": draws,
        "kept_share_heldout": round(statistics.median(shares), 4),
    }


def depth_job(model: Path, out: Path, keep: int | None) -> dict[str, Any]:
    """A prune job (``DEPTH_BLOCKS`` blocks by ppl, then ``keep`` experts when given) writing
    to ``out``; its report."""
    spec = PruneSpec(
        model=str(model),
        criterion="ppl",
        num_blocks=DEPTH_BLOCKS,
        protect_first=1,
        protect_last=1,
        calibration=CALIBRATION_SPEC,
        batch_size=8,
        expert_pruning={"keep_experts": keep} if keep else None,
        quality_gate={"max_ppl_ratio": None},
    )
    report = prune_model(spec, out)
    print(f"  removed blocks {report['removed_blocks']}", file=sys.stderr)
    return report


def run_regime(regime: str, steps: int, work: Path) -> dict[str, Any]:
    path, training = train(regime, steps)
    tokenizer = _tokenizer()
    heldout = heldout_windows(tokenizer)
    calibration = calibration_windows(CALIBRATION_SPEC, tokenizer)
    parent = load(path)
    rows: dict[str, dict[str, Any]] = {"parent": measure(parent, heldout)}
    for name, keep in KEEP.items():
        rows[f"experts {name} frequency"] = by_frequency(
            copy.deepcopy(parent), calibration, heldout, keep
        )
        rows[f"experts {name} random"] = at_random(parent, heldout, keep)
    removed = depth_job(path, work / f"{regime}-depth", None)["removed_blocks"]
    depth = load(work / f"{regime}-depth")
    rows[f"depth {DEPTH_BLOCKS}"] = measure(depth, heldout, removed_blocks=removed)
    depth_counts = routing_counts(depth, adapter_for(depth), heldout, 16)
    for name, keep in KEEP.items():
        report = depth_job(path, work / f"{regime}-both-{keep}", keep)
        kept = {int(i): b["kept"] for i, b in report["expert_pruning"]["blocks"].items()}
        rows[f"depth {DEPTH_BLOCKS} + experts {name} frequency"] = measure(
            load(work / f"{regime}-both-{keep}"),
            heldout,
            removed_blocks=report["removed_blocks"],
            kept_share_heldout=round(kept_share(depth_counts, kept), 4),
        )
    rows[f"depth {DEPTH_BLOCKS} + experts 50% random"] = at_random(depth, heldout, KEEP["50%"])
    return {"training": training, "rows": rows, "load": load_balance(parent, heldout)}


def load_balance(model: Any, heldout: torch.Tensor) -> dict[str, Any]:
    """How unevenly the parent routes held-out tokens: per block, the share of the top-k
    selections its most and least selected expert got (uniform: 1/8 each)."""
    counts = routing_counts(model, adapter_for(model), heldout, 16)
    shares = {i: (c / c.sum()).tolist() for i, c in counts.items()}
    return {
        "max_share": round(max(max(s) for s in shares.values()), 4),
        "min_share": round(min(min(s) for s in shares.values()), 4),
        "unused_experts": sum(int((c == 0).sum()) for c in counts.values()),
    }


def table(regime: str, result: dict[str, Any]) -> str:
    parent = result["rows"]["parent"]
    lines = [
        f"{regime}: {result['training']['steps']} steps, "
        f"{result['training']['train_s']} s training"
        + (" (cached)" if result["training"]["cached"] else ""),
        "| variant | blocks | experts | params | active params | held-out ppl | x parent "
        "| random draws | kept share (held-out) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in result["rows"].items():
        share = row.get("kept_share_heldout")
        draws = row.get("ppl_draws")
        spread = f"{min(draws):.1f} to {max(draws):.1f}" if draws else ""
        lines.append(
            f"| {name} | {row['blocks']} | {row['experts']} | {row['params']:,} "
            f"({row['params'] / parent['params']:.0%}) | {row['active_params']:,} "
            f"({row['active_params'] / parent['active_params']:.0%}) | {row['ppl']:.2f} "
            f"| {row['ppl'] / parent['ppl']:.3f} | {spread} "
            f"| {'' if share is None else f'{share:.1%}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--regimes", nargs="+", choices=list(REGIMES), default=list(DEFAULT_REGIMES)
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as work:
        for regime in args.regimes:
            results[regime] = run_regime(regime, args.steps, Path(work))
            print(table(regime, results[regime]) + "\n")
            print(f"routing of the parent on held-out text: {results[regime]['load']}\n")
    summary = {
        "setup": {
            "architecture": ARCHITECTURE,
            "depth_blocks": DEPTH_BLOCKS,
            "keep": KEEP,
            "random_draws": RANDOM_DRAWS,
            "calibration": CALIBRATION_SPEC.model_dump(mode="json"),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "results": results,
        "wall_s": round(time.monotonic() - started, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=1))
    print(json.dumps({"bench": "experts", "wall_s": summary["wall_s"], "results": str(RESULTS)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
