"""Evaluation on the small trained model: perplexity against a direct computation, a custom
offline lm-eval task against direct log-likelihoods, efficiency numbers, compare mode, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortened.cli import main
from shortened.engine.errors import Cancelled, DataError, EvalTaskNotFound, OutputExists
from shortened.engine.evaluate import evaluate_model, perplexity_windows
from shortened.engine.progress import Progress
from shortened.specs import EvalSpec
from tests.helpers import HELDOUT, TINY_MODEL, save_tiny, tiny_model

TASKS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "lm_eval_tasks"
TASK_RECORDS = [
    json.loads(line)
    for line in (TASKS_DIR / "tiny_stdlib_mc.jsonl").read_text().splitlines()
    if line.strip()
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def parent_and_pruned(tmp_path_factory):
    """A small random model and the same model with two blocks fewer (fast compare mode)."""
    from shortened.engine.architectures import adapter_for, keep_blocks

    root = tmp_path_factory.mktemp("compare")
    parent = tiny_model("llama", num_layers=6)
    save_tiny(parent, root / "parent")
    keep_blocks(parent, [0, 1, 3, 5])
    assert adapter_for(parent).num_layers(parent) == 4
    save_tiny(parent, root / "pruned")
    text = " ".join(
        "the quick brown fox jumps over a lazy dog while models prune blocks of layers".split() * 30
    )
    (root / "text.txt").write_text(text)
    return root


def direct_perplexity(model, tokenizer, text: str, seq_len: int) -> float:
    """The paper's protocol written out: tokenize everything once (the tokenizer puts <s>
    first), cut non-overlapping windows, average the per-window mean NLL (equal lengths)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    assert ids[0].item() == tokenizer.bos_token_id
    n = ids.numel() // seq_len
    losses = []
    with torch.no_grad():
        for i in range(n):
            window = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0)
            losses.append(model(input_ids=window, labels=window).loss.item())
    return math.exp(sum(losses) / len(losses))


def test_perplexity_equals_direct_computation(tiny, tmp_path):
    model, tokenizer = tiny
    text = "\n\n".join(HELDOUT.read_text().split("\n\n")[:30])  # ~20 windows: enough, and quick
    (tmp_path / "heldout.txt").write_text(text)
    spec = EvalSpec(
        model=str(TINY_MODEL),
        perplexity={"datasets": [str(tmp_path / "heldout.txt")], "seq_len": 128},
    )
    seen: list[Progress] = []
    report = evaluate_model(spec, tmp_path / "out", progress=seen.append)
    result = report["model"]["perplexity"][str(tmp_path / "heldout.txt")]
    assert result["ppl"] == pytest.approx(direct_perplexity(model, tokenizer, text, 128), rel=1e-5)
    assert result["windows"] == (result["text_tokens"] + 1) // 128
    assert report["baseline"] is None and report["deltas"] is None
    assert (
        json.loads((tmp_path / "out" / "report.json").read_text())["model"]["perplexity"][
            str(tmp_path / "heldout.txt")
        ]["ppl"]
        == result["ppl"]
    )
    windows = [p for p in seen if p.stage == "perplexity"]
    assert windows[-1].done == windows[-1].total == result["windows"]


def test_bos_on_every_window(tiny):
    model, tokenizer = tiny
    text = HELDOUT.read_text()[:6000]
    spec = EvalSpec(
        model=str(TINY_MODEL),
        perplexity={
            "datasets": [str(HELDOUT)],
            "seq_len": 64,
            "bos_every_window": True,
            "max_windows": 5,
        },
    )
    result = evaluate_model(spec)["model"]["perplexity"][str(HELDOUT)]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    windows = torch.tensor([[bos, *ids[i * 63 : (i + 1) * 63]] for i in range(5)])
    with torch.no_grad():
        loss = torch.stack([model(input_ids=w[None], labels=w[None]).loss for w in windows]).mean()
    assert result["windows"] == 5
    assert result["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_perplexity_windows_layout():
    stream = list(range(10, 20))
    once = perplexity_windows(stream, 4, bos_token_id=1, bos_every_window=False)
    assert once.tolist() == [[1, 10, 11, 12], [13, 14, 15, 16]]
    every = perplexity_windows(stream, 4, bos_token_id=1, bos_every_window=True)
    assert every.tolist() == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18]]
    with pytest.raises(DataError, match="not enough for one window"):
        perplexity_windows([5, 6], 4, bos_token_id=1, bos_every_window=False)
    with pytest.raises(DataError, match="no BOS"):
        perplexity_windows(stream, 4, bos_token_id=None, bos_every_window=True)


def direct_multiple_choice(model, tokenizer) -> tuple[float, float]:
    """acc and acc_norm of tiny_stdlib_mc by hand: sum of log-probabilities of ' ' + choice
    after the question (the continuation split off the jointly tokenized string, as lm-eval)."""
    correct = correct_norm = 0
    for record in TASK_RECORDS:
        scores = []
        for choice in record["choices"]:
            context_ids = tokenizer(record["question"]).input_ids
            whole_ids = tokenizer(record["question"] + " " + choice).input_ids
            n_cont = len(whole_ids) - len(context_ids)
            ids = torch.tensor([whole_ids])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            targets = ids[0, 1:]
            token_logprobs = logprobs[torch.arange(len(targets)), targets]
            scores.append(token_logprobs[-n_cont:].sum().item())
        normed = [s / len(c) for s, c in zip(scores, record["choices"], strict=True)]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == record["label"])
        correct_norm += int(max(range(len(normed)), key=normed.__getitem__) == record["label"])
    return correct / len(TASK_RECORDS), correct_norm / len(TASK_RECORDS)


def test_custom_lm_eval_task_matches_direct_loglikelihoods(tiny):
    model, tokenizer = tiny
    spec = EvalSpec(
        model=str(TINY_MODEL),
        zero_shot={
            "tasks": ["tiny_stdlib_mc"],
            "task_include_path": str(TASKS_DIR),
            "batch_size": 4,
        },
    )
    seen: list[Progress] = []
    report = evaluate_model(spec, progress=seen.append)
    result = report["model"]["zero_shot"]["tasks"]["tiny_stdlib_mc"]
    acc, acc_norm = direct_multiple_choice(model, tokenizer)
    assert 0.0 <= result["value"] <= 1.0
    assert result["metric"] == "acc"
    assert result["value"] == pytest.approx(acc)
    assert result["metrics"]["acc_norm"] == pytest.approx(acc_norm)
    assert result["samples"] == len(TASK_RECORDS)
    assert report["model"]["zero_shot"]["mean_accuracy"] == pytest.approx(acc)
    zero_shot = [p for p in seen if p.stage == "zero_shot"]
    assert any(p.unit == "batches" for p in zero_shot)  # per forward: where a cancel can land
    assert zero_shot[-1].metrics["tiny_stdlib_mc"] == result["value"]


def test_efficiency_reports_positive_latency_and_throughput(parent_and_pruned):
    spec = EvalSpec(
        model=str(parent_and_pruned / "pruned"),
        efficiency={
            "batch_sizes": [1, 2],
            "output_lengths": [6],
            "input_length": 10,
            "repeats": 2,
            "warmup": 1,
        },
    )
    seen: list[Progress] = []
    report = evaluate_model(spec, progress=seen.append)
    result = report["model"]
    assert result["params"] > 0 and result["weight_bytes"] == 4 * result["params"]
    runs = result["efficiency"]["runs"]
    assert [(r["batch_size"], r["output_length"]) for r in runs] == [(1, 6), (2, 6)]
    for run in runs:
        assert run["generated_tokens"] == 6 and run["input_length"] == 10 and run["repeats"] == 2
        assert (
            run["latency_s_mean"] > 0
            and run["throughput_tokens_per_s_mean"] > 0
            and run["peak_memory_bytes"] > 0
        )
    assert result["efficiency"]["peak_memory_kind"] == "process_peak_rss"
    updates = [p for p in seen if p.stage == "efficiency"]
    assert [p.done for p in updates if not p.metrics] == list(range(1, 7))  # one per generate()
    summaries = [p.metrics for p in updates if p.metrics]  # one per configuration
    assert [m["latency_s_mean"] for m in summaries] == [r["latency_s_mean"] for r in runs]


def test_compare_mode_reports_deltas(parent_and_pruned):
    spec = EvalSpec(
        model=str(parent_and_pruned / "pruned"),
        compare_with=str(parent_and_pruned / "parent"),
        perplexity={"datasets": [str(parent_and_pruned / "text.txt")], "seq_len": 32},
        efficiency={"output_lengths": [4], "repeats": 1, "warmup": 0},
    )
    report = evaluate_model(spec)
    name = str(parent_and_pruned / "text.txt")
    model_ppl, base_ppl = (
        report["model"]["perplexity"][name]["ppl"],
        report["baseline"]["perplexity"][name]["ppl"],
    )
    assert model_ppl != base_ppl
    assert report["deltas"]["perplexity"][name]["delta"] == pytest.approx(model_ppl - base_ppl)
    params = report["deltas"]["params"]
    assert params["model"] < params["baseline"] and 0 < params["removed_ratio"] < 1
    assert report["model"]["num_layers"] == 4 and report["baseline"]["num_layers"] == 6
    assert report["deltas"]["efficiency"][0]["latency_speedup"] > 0


def test_unknown_task_fails_before_any_model_is_loaded(tmp_path):
    spec = EvalSpec(
        model=str(tmp_path / "no-such-model"),
        zero_shot={"tasks": ["piqa", "hellaswagg"], "task_include_path": str(TASKS_DIR)},
    )
    with pytest.raises(EvalTaskNotFound, match="hellaswagg") as excinfo:
        evaluate_model(spec)
    assert excinfo.value.code == "eval_task_not_found"
    assert "hellaswag" in str(excinfo.value)  # the close match is suggested


def test_bad_eval_inputs(parent_and_pruned, tmp_path):
    with pytest.raises(ValidationError, match="at least one of"):
        EvalSpec(model="m")
    with pytest.raises(ValidationError) as excinfo:
        EvalSpec(model="m", efficiency={"batch_sizes": [0]})
    assert excinfo.value.errors()[0]["loc"] == ("efficiency", "batch_sizes")
    with pytest.raises(ValidationError) as excinfo:
        EvalSpec(model="m", perplexity={"seq_len": 1})
    assert excinfo.value.errors()[0]["loc"] == ("perplexity", "seq_len")
    model = str(parent_and_pruned / "pruned")
    with pytest.raises(DataError, match="neither a named set"):
        evaluate_model(
            EvalSpec(model=model, perplexity={"datasets": [str(tmp_path / "missing.txt")]})
        )
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        evaluate_model(
            EvalSpec(model=model, perplexity={"datasets": [str(tmp_path / "empty.txt")]})
        )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(OutputExists):
        evaluate_model(EvalSpec(model=model, efficiency={}), tmp_path / "taken")


def test_cancel_during_perplexity_publishes_nothing(parent_and_pruned, tmp_path):
    def cancel(update: Progress) -> None:
        if update.stage == "perplexity" and update.done >= 1:
            raise Cancelled("stop")

    spec = EvalSpec(
        model=str(parent_and_pruned / "pruned"),
        perplexity={
            "datasets": [str(parent_and_pruned / "text.txt")],
            "seq_len": 16,
            "batch_size": 1,
        },
    )
    with pytest.raises(Cancelled):
        evaluate_model(spec, tmp_path / "out", progress=cancel)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_eval_prints_tables(parent_and_pruned, tmp_path, capsys):
    code = main(
        [
            "eval",
            "--model",
            str(parent_and_pruned / "pruned"),
            "--compare-with",
            str(parent_and_pruned / "parent"),
            "--ppl",
            str(parent_and_pruned / "text.txt"),
            "--seq-len",
            "32",
            "--efficiency",
            "--batch-sizes",
            "1",
            "--output-lengths",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "perplexity" in out and "baseline" in out and "speed-up" in out
    assert (tmp_path / "out" / "report.json").is_file()
    assert (
        main(
            [
                "eval",
                "--model",
                str(parent_and_pruned / "pruned"),
                "--ppl",
                str(parent_and_pruned / "text.txt"),
                "--seq-len",
                "1",
            ]
        )
        == 2
    )
    assert "perplexity.seq_len" in capsys.readouterr().err
