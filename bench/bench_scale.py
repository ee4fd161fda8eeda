"""The engine at real size on the CPU: a model with the exact shape of Llama-3.2-1B (random
weights, nothing downloaded), bf16, three safetensors shards of at most 1 GB, through the CLI.

Each step is its own ``python -m shortened.cli ...`` process, so its peak resident memory
(``ru_maxrss`` of that child, from ``os.wait4``) is its own:

* load (``bench.bench_scale reload``: ``load_model`` and nothing else), bf16;
* prune ``ppl`` in bf16 and in float32 (bf16 should about halve the peak), ``taylor`` and
  ``block_influence`` in bf16: 4 of the 10 removable blocks, calibration 4 windows of 64
  tokens (small so that the whole run fits in 15 minutes on 2 cores);
* LoRA on the bf16 ppl output: 3 steps of 1 window of 64 tokens;
* perplexity of that output on 4 windows of 64 tokens;
* every output reloaded: its dtype and shard layout;
* the service pipeline prune -> LoRA -> eval through ``shortened serve``'s embedded mode
  (SQLite, filesystem broker, local artifacts), its peak sampled over the process tree.

Per step: wall time, peak RSS over the weights in the compute dtype, the planner's estimate
(``shortened.planning``) and its ratio to the measured peak (calibrated to lie within
+-25 %). The model is built once into ``var/bench-cache`` and reused.

    make bench-scale                        # or: python -m bench.bench_scale
    python -m bench.bench_scale --figures var/bench-scale/figures.json   # re-estimate only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "var" / "bench-cache" / "llama-3.2-1b-random-bf16"
RUNS = REPO / "var" / "bench-scale"
CALIBRATION = REPO / "data" / "calibration.jsonl"
TEXT = REPO / "data" / "stdlib_docs_heldout.txt"
GB = 10**9

# meta-llama/Llama-3.2-1B's config.json, as published (its shape and rope, not its weights).
LLAMA_3_2_1B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
SHAPE = dict(LLAMA_3_2_1B)
# --smoke: the same steps on a 10-block, 256-wide model, to check the bench itself in a minute.
SMOKE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 10, "head_dim": 32,
         "num_attention_heads": 8, "num_key_value_heads": 2}  # fmt: skip
CALIBRATION_ARGS = ["--calibration", str(CALIBRATION), "--n-samples", "4", "--seq-len", "64"]
PRUNE_ARGS = ["--num-blocks", "4", "--batch-size", "4", "--device", "cpu", *CALIBRATION_ARGS]


def tokenizer_with_vocab(vocab_size: int) -> Any:
    """A word-level tokenizer with exactly ``vocab_size`` entries: the words of the bench's
    texts first (so they tokenize to real ids), then fillers. Nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words: dict[str, None] = {}
    for path in (CALIBRATION, TEXT):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            text = " ".join(json.loads(line).get("text", "") for line in text.splitlines() if line)
        for word in pre_tokenizers.Whitespace().pre_tokenize_str(text):
            words.setdefault(word[0])
    vocab = {token: i for i, token in enumerate(specials)}
    for word in words:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    filler = 0
    while len(vocab) < vocab_size:
        vocab[f"<filler{filler}>"] = len(vocab)
        filler += 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def build_model(path: Path) -> None:
    """The random Llama-3.2-1B-shaped checkpoint, bf16, shards of at most 1 GB (once)."""
    if (path / "model.safetensors.index.json").is_file():
        return
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, max_shard_size="1GB")
    tokenizer = tokenizer_with_vocab(config.vocab_size)
    tokenizer.save_pretrained(staging)
    staging.rename(path)


def measured(command: list[str], log: Path) -> dict[str, Any]:
    """Run ``command`` (a Python module and its arguments) in a child of its own: its wall
    time and peak resident memory, the child's own VmHWM read by itself at exit (``child``
    below). Not ru_maxrss: Linux carries the parent's resident size at fork into a child's
    ru_maxrss, so every child would report at least this process's size."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    peak_file = log.with_suffix(".peak")
    started = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.run(
            [sys.executable, "-m", "bench.bench_scale", "child", str(peak_file), *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            check=False,
        )
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_bytes": int(peak_file.read_text())}


def child_main(peak_file: str, module: str, *args: str) -> None:
    """``python -m bench.bench_scale child PEAK_FILE MODULE ARGS...``: run MODULE as
    ``python -m`` would, then write this process's VmHWM (peak RSS, bytes) to PEAK_FILE."""
    import atexit
    import runpy

    def write_peak() -> None:
        with open("/proc/self/status") as handle:
            kb = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
        Path(peak_file).write_text(str(kb * 1024))

    atexit.register(write_peak)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def runtime_rss(root: Path) -> int:
    """Peak RSS of a child that imports the engine (torch, transformers, peft) and loads the
    model's tokenizer, and nothing else: the fixed cost every step pays whatever the number
    of blocks (the 128K-entry tokenizer alone is about 0.15 GB)."""
    command = ["bench.bench_scale", "runtime", str(CACHE)]
    return int(measured(command, root / "runtime.log")["peak_rss_bytes"])


def runtime_main(path: str) -> None:
    """``python -m bench.bench_scale runtime DIR``: the engine's imports and DIR's tokenizer."""
    from transformers import AutoTokenizer

    import shortened.engine.retrain  # noqa: F401  (the heaviest engine module: peft too)

    AutoTokenizer.from_pretrained(path)


def layout(path: Path) -> dict[str, Any]:
    """The weights as saved: dtype(s), shard files and sizes, whether the index is valid."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    dtypes: set[str] = set()
    for file in files:
        with safe_open(str(file), "pt") as handle:
            dtypes |= {str(handle.get_slice(k).get_dtype()) for k in handle.keys()}
    index_file = path / "model.safetensors.index.json"
    index_ok = None
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        index_ok = sorted(set(weight_map.values())) == [f.name for f in files]
    return {
        "dtypes": sorted(dtypes),
        "shards": len(files),
        "shard_gb": [round(f.stat().st_size / GB, 2) for f in files],
        "index_valid": index_ok,
    }


def reload_main(path: str, dtype: str) -> None:
    """``python -m bench.bench_scale reload DIR DTYPE``: load_model, then read every weight;
    prints the dtype and the weights' bytes."""
    import torch

    from shortened.engine.models import load_model

    loaded = load_model(path, dtype=dtype, device="cpu")
    # Read every weight once, as any use of the model does: weights loaded in the
    # checkpoint's dtype are its memory-mapped pages, resident only once touched.
    with torch.no_grad():
        for param in loaded.model.parameters():
            param.view(-1)[::1024].sum()  # one value in 1024: every 4 KiB page
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    print(json.dumps({"dtype": str(loaded.dtype), "weight_bytes": weights}))


def plan_for(argv: list[str], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The planner's figures for a CLI command line (the spec the command would run), from
    its model's config (``config``: the one recorded when it ran)."""
    from shortened.admission import Lookups, model_config
    from shortened.cli import build_parser
    from shortened.cli.eval_command import eval_spec
    from shortened.cli.prune_command import prune_spec
    from shortened.cli.retrain_command import retrain_spec
    from shortened.kinds import plan_job

    args = build_parser().parse_args(argv)
    spec = {"prune": prune_spec, "retrain": retrain_spec, "eval": eval_spec}[args.command](args)
    config = config or model_config(spec.model, Lookups())
    assert config is not None
    plan = plan_job(args.command, spec, config)
    assert plan is not None  # every kind benchmarked here has a plan
    return plan.to_dict()


def run_steps(root: Path) -> list[dict[str, Any]]:
    source = str(CACHE)
    steps: list[dict[str, Any]] = []

    def step(name: str, argv: list[str], output: Path | None, dtype: str) -> dict[str, Any]:
        print(f"[bench-scale] {name} ...", file=sys.stderr, flush=True)
        figures = measured(["shortened.cli", *argv], root / f"{name}.log")
        record: dict[str, Any] = {"step": name, "argv": argv, "dtype": dtype, **figures}
        record["config"] = json.loads(
            (Path(argv[argv.index("--model") + 1]) / "config.json").read_text()
        )
        record["plan"] = plan_for(argv, record["config"])
        if output is not None and output.is_dir() and argv[0] != "eval":
            from shortened.admission import total_params

            record["output"] = layout(output)
            record["saved_params"] = total_params(json.loads((output / "config.json").read_text()))
            report = json.loads((output / "report.json").read_text())
            record["timings"] = report.get("timings")
            reload = measured(
                ["bench.bench_scale", "reload", str(output), dtype], root / f"{name}-reload.log"
            )
            record["reload"] = reload
        steps.append(record)
        print(f"[bench-scale] {name}: {figures}", file=sys.stderr, flush=True)
        return record

    print("[bench-scale] load ...", file=sys.stderr, flush=True)
    load = measured(["bench.bench_scale", "reload", source, "bfloat16"], root / "load.log")
    config = json.loads((CACHE / "config.json").read_text())
    steps.append(
        {
            "step": "load bf16",
            "dtype": "bfloat16",
            **load,
            "config": config,
            "output": layout(CACHE),
        }
    )

    pruned = root / "ppl-bf16"
    base = ["prune", "--model", source, *PRUNE_ARGS]
    step(
        "prune ppl bf16",
        [*base, "--dtype", "bfloat16", "--output", str(pruned)],
        pruned,
        "bfloat16",
    )
    out = root / "ppl-fp32"
    step("prune ppl fp32", [*base, "--dtype", "float32", "--output", str(out)], out, "float32")
    shutil.rmtree(out)
    for criterion in ("taylor", "block_influence"):
        out = root / criterion
        argv = [*base, "--criterion", criterion, "--dtype", "bfloat16", "--output", str(out)]
        step(f"prune {criterion} bf16", argv, out, "bfloat16")
        shutil.rmtree(out)
    lora = root / "lora"
    step(
        "lora bf16",
        [
            "retrain",
            "--model",
            str(pruned),
            "--method",
            "lora",
            "--data",
            str(CALIBRATION),
            "--max-steps",
            "3",
            "--micro-batch-size",
            "1",
            "--batch-size",
            "1",
            "--cutoff-len",
            "64",
            "--warmup-steps",
            "0",
            "--validation-size",
            "2",
            "--dtype",
            "bfloat16",
            "--device",
            "cpu",
            "--output",
            str(lora),
        ],  # fmt: skip
        lora,
        "bfloat16",
    )
    shutil.rmtree(lora)
    step(
        "eval ppl bf16",
        [
            "eval",
            "--model",
            str(pruned),
            "--ppl",
            str(TEXT),
            "--seq-len",
            "64",
            "--max-windows",
            "4",
            "--ppl-batch-size",
            "2",
            "--dtype",
            "bfloat16",
            "--device",
            "cpu",
            "--output",
            str(root / "eval"),
        ],  # fmt: skip
        root / "eval",
        "bfloat16",
    )
    shutil.rmtree(pruned)
    return steps


def service_pipeline(root: Path) -> dict[str, Any]:
    """prune -> LoRA -> eval as one pipeline through ``service.serve`` (embedded mode)."""
    import httpx
    import psutil

    sys.path.insert(0, str(REPO / "tests"))
    from e2e_service import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHORTENED_")}
    env.update(
        PYTHONPATH=str(REPO),
        SHORTENED_DATA_DIR=str(root / "serve"),
        SHORTENED_API_PORT=str(port),
        SHORTENED_WORKER_METRICS_PORT="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    log = (root / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "service.serve"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        env=env,
    )  # fmt: skip
    peak = {"rss": 0}
    done = threading.Event()

    def sample() -> None:  # the process tree's resident memory, twice a second
        parent = psutil.Process(server.pid)
        while not done.wait(0.5):
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak["rss"] = max(peak["rss"], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                continue

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as api:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if api.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            spec = {
                "model": str(CACHE),
                "criterion": "ppl",
                "num_blocks": 4,
                "batch_size": 4,
                "dtype": "bfloat16",
                "device": "cpu",
                "calibration": {"source": str(CALIBRATION), "n_samples": 4, "seq_len": 64},
                "retrain": {
                    "method": "lora",
                    "data": {"source": str(CALIBRATION), "validation_size": 2},
                    "max_steps": 3,
                    "micro_batch_size": 1,
                    "batch_size": 1,
                    "cutoff_len": 64,
                    "warmup_steps": 0,
                    "dtype": "bfloat16",
                    "device": "cpu",
                },  # fmt: skip
                "eval": {
                    "perplexity": {
                        "datasets": [str(TEXT)],
                        "seq_len": 64,
                        "max_windows": 4,
                        "batch_size": 2,
                    },
                    "dtype": "bfloat16",
                    "device": "cpu",
                },  # fmt: skip
            }
            plan = api.post("/jobs/prune?dry_run=true", json=spec).json()["plan"]
            started = time.perf_counter()
            root_id = api.post("/jobs/prune", json=spec).json()["id"]
            pipeline: dict[str, Any] = {}
            while time.perf_counter() - started < 900:
                pipeline = api.get(f"/jobs/{root_id}").json().get("pipeline") or {}
                if pipeline.get("status") in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(1)
            jobs = [api.get(f"/jobs/{step['id']}").json() for step in pipeline.get("jobs", [])]
        wall = time.perf_counter() - started
    finally:
        done.set()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    return {
        "step": "service pipeline prune->lora->eval bf16",
        "wall_s": round(wall, 1),
        "peak_rss_bytes": peak["rss"],
        "peak_note": "API + worker + its job child, sampled every 0.5 s",
        "status": pipeline.get("status"),
        "jobs": [
            {
                "kind": j["kind"],
                "status": j["status"],
                "error": j.get("error"),
                "timings": (j.get("result") or {}).get("timings"),
            }
            for j in jobs
        ],
        "plan": plan,
    }


def summarise(figures: dict[str, Any]) -> dict[str, Any]:
    """Peak over weights and the planner's estimate (recomputed now) against every peak.
    "Weights" are those of the model the step loads (the pruned one for LoRA and eval), in
    the step's compute dtype."""
    from shortened.admission import total_params

    runtime = figures["conditions"].get("runtime_rss_bytes")
    if runtime is None:
        RUNS.mkdir(parents=True, exist_ok=True)
        runtime = figures["conditions"]["runtime_rss_bytes"] = runtime_rss(RUNS)
    rows = []
    for step in figures["steps"]:
        dtype = step.get("dtype", "bfloat16")
        per_value = 4 if dtype == "float32" else 2
        params = total_params(step.get("config") or SHAPE)
        weights = params * per_value
        row = {
            "step": step["step"],
            "wall_s": step["wall_s"],
            "weights_gb": round(weights / GB, 2),
            "peak_gb": round(step["peak_rss_bytes"] / GB, 2),
            "peak_over_weights": round(step["peak_rss_bytes"] / weights, 2),
            # The same without the imports' fixed cost: what grows with the model.
            "peak_less_runtime_over_weights": round(
                (step["peak_rss_bytes"] - runtime) / weights, 2
            ),
        }
        plan = plan_for(step["argv"], step["config"]) if step.get("argv") else step.get("plan")
        if plan:
            row["estimate_gb"] = round(plan["peak_bytes"] / GB, 2)
            row["estimate_over_measured"] = round(plan["peak_bytes"] / step["peak_rss_bytes"], 2)
        for key in ("status", "jobs", "peak_note"):
            if key in step:
                row[key] = step[key]
        if "output" in step:
            row["output"] = step["output"]
        if "reload" in step:
            saved = step.get("saved_params") or params
            row["reload_peak_over_weights"] = round(
                step["reload"]["peak_rss_bytes"] / (saved * per_value), 2
            )
        if "timings" in step:
            row["timings"] = step["timings"]
        rows.append(row)
    return {"conditions": figures["conditions"], "rows": rows}


def markdown(summary: dict[str, Any]) -> str:
    """The summary as the table in docs/scale.md."""
    lines = [
        "| step | wall | weights | peak RSS | × weights | × weights less imports "
        "| planner estimate | output |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        output = row.get("output") or {}
        layout_text = (
            f"{'/'.join(output['dtypes']).lower()}, {output['shards']} shards "
            f"({' + '.join(str(gb) for gb in output['shard_gb'])} GB)"
            + (", index valid" if output.get("index_valid") else "")
            if output
            else "–"
        )
        estimate = (
            f"{row['estimate_gb']} GB ({row['estimate_over_measured']:.2f}×)"
            if "estimate_gb" in row
            else "–"
        )
        lines.append(
            f"| {row['step']} | {row['wall_s']:.1f} s | {row['weights_gb']} GB "
            f"| {row['peak_gb']} GB | {row['peak_over_weights']:.2f} "
            f"| {row['peak_less_runtime_over_weights']:.2f} | {estimate} | {layout_text} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "reload":
        reload_main(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "runtime":
        runtime_main(sys.argv[2])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_main(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figures", type=Path, help="re-estimate saved figures, run nothing")
    parser.add_argument("--no-service", action="store_true", help="skip the service pipeline")
    parser.add_argument(
        "--service-from", type=Path, help="take the service pipeline's figures from this file"
    )
    parser.add_argument("--smoke", action="store_true", help="a small model (checks the bench)")
    args = parser.parse_args()
    global CACHE, RUNS
    if args.smoke:
        SHAPE.update(SMOKE)
        CACHE = CACHE.with_name("smoke-random-bf16")
        RUNS = RUNS.with_name("bench-scale-smoke")
    if args.figures:
        summary = summarise(json.loads(args.figures.read_text()))
        print(json.dumps(summary, indent=1))
        print(markdown(summary))
        return
    started = time.perf_counter()
    build_model(CACHE)
    RUNS.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="run-", dir=RUNS))
    steps = run_steps(root)
    if args.service_from:
        saved = json.loads(args.service_from.read_text())["steps"]
        steps += [step for step in saved if step["step"].startswith("service pipeline")]
    elif not args.no_service:
        steps.append(service_pipeline(root))
    load1, load5, load15 = os.getloadavg()
    figures = {
        "conditions": {
            "cpus": os.cpu_count(),
            "load_average_at_end": [round(load1, 1), round(load5, 1), round(load15, 1)],
            "runtime_rss_bytes": runtime_rss(root),
            "total_wall_s": round(time.perf_counter() - started, 1),
        },
        "steps": steps,
    }
    (RUNS / "figures.json").write_text(json.dumps(figures, indent=1))
    shutil.rmtree(root / "serve", ignore_errors=True)
    summary = summarise(figures)
    (RUNS / "table.md").write_text(markdown(summary) + "\n")
    print(json.dumps(summary, indent=1))
    print(markdown(summary))


if __name__ == "__main__":
    main()
