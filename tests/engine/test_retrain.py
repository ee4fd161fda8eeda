"""Retraining on the small trained model: LoRA and CPT each lower the held-out perplexity of a
pruned tiny-llama; outputs load with plain transformers/peft calls; cancel + resume; bad specs."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortened.cli import main
from shortened.engine.errors import Cancelled, DataError, OutputExists, RetrainError
from shortened.engine.evaluate import evaluate_model
from shortened.engine.progress import Progress
from shortened.engine.prune import prune_model
from shortened.engine.retrain import retrain_model
from shortened.engine.retrain_data import IGNORE_INDEX, alpaca_prompt, pack_blocks, tokenize_example
from shortened.specs import LORA_TARGET_MODULES, EvalSpec, PruneSpec, RetrainSpec
from tests.helpers import (
    CALIBRATION,
    HELDOUT,
    TINY_MODEL,
    cancel_then_resume,
    save_tiny,
    tiny_model,
    tiny_tokenizer,
)

DATA = HELDOUT.parent
ALPACA = DATA / "alpaca_tiny.jsonl"
TRAIN_TEXT = DATA / "stdlib_docs_train.jsonl"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """tiny-llama with 3 blocks removed by the PPL criterion, and a held-out text sample."""
    root = tmp_path_factory.mktemp("retrain")
    spec = PruneSpec(
        model=str(TINY_MODEL),
        criterion="ppl",
        num_blocks=3,
        calibration={"source": str(CALIBRATION), "n_samples": 8},
    )
    prune_model(spec, root / "pruned")
    (root / "heldout.txt").write_text("\n\n".join(HELDOUT.read_text().split("\n\n")[:60]))
    return root


def heldout_ppl(model_dir, root) -> float:
    spec = EvalSpec(
        model=str(model_dir), perplexity={"datasets": [str(root / "heldout.txt")], "seq_len": 128}
    )
    return evaluate_model(spec)["model"]["perplexity"][str(root / "heldout.txt")]["ppl"]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A tiny random model and small Alpaca/text files, for the quick mechanics tests."""
    root = tmp_path_factory.mktemp("mechanics")
    save_tiny(tiny_model("llama", num_layers=3), root / "model")
    words = "the quick brown fox jumps over a lazy dog while models prune blocks of layers".split()
    with (root / "alpaca.jsonl").open("w") as handle:
        for i in range(24):
            record = {
                "instruction": " ".join(words[i % 5 : i % 5 + 4]),
                "input": "" if i % 2 else "a dog",
                "output": " ".join(words[i % 7 :]),
            }
            handle.write(json.dumps(record) + "\n")
    return root


def lora_spec(model, data, **overrides) -> RetrainSpec:
    settings = {
        "model": str(model),
        "method": "lora",
        "data": {"source": str(data), "validation_size": 16, "max_records": 400},
        "micro_batch_size": 4,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "max_steps": 24,
        "logging_steps": 4,
        "eval_steps": 12,
        "cutoff_len": 128,
    }
    return RetrainSpec.model_validate({**settings, **overrides})


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft's probe
def test_lora_lowers_heldout_perplexity_and_outputs_load(pruned):
    # Raw-text LoRA on the training documents: the held-out text is the same kind of text.
    seen: list[Progress] = []
    spec = lora_spec(pruned / "pruned", TRAIN_TEXT)
    report = retrain_model(spec, pruned / "lora", progress=seen.append)
    before, after = heldout_ppl(pruned / "pruned", pruned), heldout_ppl(pruned / "lora", pruned)
    print(f"LoRA: held-out ppl {before:.2f} -> {after:.2f}")
    assert after < before

    stage = report["stages"][0]
    assert report["method"] == "lora" and report["steps"] == stage["steps"] == 24
    assert stage["gradient_accumulation_steps"] == 2 and stage["effective_batch_size"] == 8
    assert stage["lora"]["target_modules"] == list(LORA_TARGET_MODULES)
    assert stage["data_format"] == "text" and stage["eval_records"] == 16
    assert stage["train_records"] == 400 and stage["lr_scheduler"] == "linear"
    assert report["final_eval_loss"] < stage["eval_loss_start"]
    assert 0 < report["trainable_params"]["lora"] < report["params"]
    assert json.loads((pruned / "lora" / "report.json").read_text())["steps"] == 24
    training = [p for p in seen if p.stage == "training"]
    assert training[-1].done == training[-1].total == 24 and training[-1].unit == "steps"
    assert any("loss" in p.metrics for p in training)
    assert any("eval_loss" in p.metrics for p in training)

    # The adapter on the pruned model and the merged checkpoint compute the same function.
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(pruned / "pruned")
    adapted = PeftModel.from_pretrained(base, pruned / "lora" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(pruned / "lora").eval()
    tokenizer = AutoTokenizer.from_pretrained(pruned / "lora")
    ids = tokenizer("Return the number of items in a container.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    assert merged.config.num_hidden_layers == 9


def test_lora_on_alpaca_records_lowers_their_validation_loss(pruned, tmp_path):
    # The paper's setting: Alpaca prompt template, loss on the responses only.
    spec = lora_spec(pruned / "pruned", ALPACA, max_steps=12, eval_steps=100, learning_rate=5e-4)
    stage = retrain_model(spec, tmp_path / "out")["stages"][0]
    print(
        f"LoRA on Alpaca: validation loss {stage['eval_loss_start']:.3f} -> {stage['eval_loss']:.3f}"
    )
    assert stage["data_format"] == "alpaca" and stage["steps"] == 12
    assert stage["eval_loss"] < stage["eval_loss_start"]
    # Records whose prompt alone fills cutoff_len have no response token left: dropped.
    assert stage["train_items"] + stage["dropped_examples"] == stage["train_records"]


def test_cpt_lowers_heldout_perplexity(pruned):
    spec = RetrainSpec(
        model=str(pruned / "pruned"),
        method="cpt",
        data={"source": str(TRAIN_TEXT), "validation_size": 16, "max_records": 400},
        cpt={"max_steps": 24, "learning_rate": 1e-4, "warmup_steps": 2, "seq_len": 128},
        micro_batch_size=4,
        batch_size=8,
        logging_steps=5,
    )
    report = retrain_model(spec, pruned / "cpt")
    before, after = heldout_ppl(pruned / "pruned", pruned), heldout_ppl(pruned / "cpt", pruned)
    print(f"CPT: held-out ppl {before:.2f} -> {after:.2f}")
    assert after < before
    stage = report["stages"][0]
    assert stage["stage"] == "cpt" and stage["steps"] == 24 and stage["lr_scheduler"] == "cosine"
    assert stage["seq_len"] == 128 and stage["data_format"] == "text" and stage["train_items"] > 0
    assert report["trainable_params"]["cpt"] == report["params"]
    assert not (pruned / "cpt" / "adapter").exists()
    assert AutoModelForCausalLM.from_pretrained(pruned / "cpt").config.num_hidden_layers == 9


def test_cancel_publishes_nothing_and_resume_continues_at_the_saved_step(random_model, tmp_path):
    spec = RetrainSpec(
        model=str(random_model / "model"),
        method="lora",
        data={"source": str(random_model / "alpaca.jsonl")},
        micro_batch_size=2,
        batch_size=2,
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        warmup_steps=0,
    )
    cancel_then_resume(spec, tmp_path, "lora")
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()

    other = spec.model_copy(update={"learning_rate": 5e-4})
    with pytest.raises(RetrainError, match="different retrain spec"):
        retrain_model(other, tmp_path / "out2", checkpoint_dir=tmp_path / "checkpoints")


@pytest.mark.filterwarnings(
    "ignore:.*is_gradient_checkpointing.*:FutureWarning"
)  # peft probes a deprecated attribute
def test_cpt_lora_saves_cpt_model_adapter_and_merged_model(random_model, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(
        "\n\n".join(" ".join(["the quick brown fox jumps over a lazy dog"] * 6) for _ in range(12))
    )
    spec = RetrainSpec(
        model=str(random_model / "model"),
        method="cpt_lora",
        data={"source": str(random_model / "alpaca.jsonl")},
        cpt={
            "max_steps": 2,
            "seq_len": 16,
            "warmup_steps": 0,
            "data": {"source": str(text), "validation_fraction": 0.2},
        },
        micro_batch_size=2,
        batch_size=2,
        max_steps=2,
        warmup_steps=0,
    )
    report = retrain_model(spec, tmp_path / "out")
    assert [s["stage"] for s in report["stages"]] == ["cpt", "lora"]
    assert report["stages"][0]["eval_loss"] is not None and report["stages"][1]["eval_loss"] is None
    assert report["outputs"] == {"model": ".", "adapter": "adapter", "cpt_model": "cpt"}
    adapter_config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "out" / "cpt").resolve())

    from peft import PeftModel

    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "cpt"), tmp_path / "out" / "adapter"
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_alpaca_examples_put_the_loss_on_the_response_only():
    tokenizer = tiny_tokenizer()
    data = RetrainSpec(model="m", data={"source": "x.jsonl"}).data
    record = {"instruction": "jumps over", "input": "a dog", "output": "the quick brown fox"}
    example = tokenize_example(record, "alpaca", tokenizer, data, cutoff_len=512)
    prompt_ids = tokenizer(alpaca_prompt("jumps over", "a dog")).input_ids
    n_prompt = len(prompt_ids)
    assert example["input_ids"][:n_prompt] == prompt_ids
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert "### Input:\na dog" in alpaca_prompt("x", "a dog") and "### Input" not in alpaca_prompt(
        "x"
    )
    everything = tokenize_example(
        record,
        "alpaca",
        tokenizer,
        data.model_copy(update={"train_on_inputs": True}),
        cutoff_len=512,
    )
    assert everything["labels"] == everything["input_ids"]
    short = tokenize_example(record, "alpaca", tokenizer, data, cutoff_len=8)
    assert len(short["input_ids"]) == 8 and set(short["labels"]) == {IGNORE_INDEX}


def test_packing_concatenates_documents_into_full_blocks():
    tokenizer = tiny_tokenizer()
    docs = ["the quick brown fox", "jumps over a lazy dog", "while models prune blocks"]
    stream = []
    for doc in docs:
        stream += [
            tokenizer.bos_token_id,
            *tokenizer(doc, add_special_tokens=False).input_ids,
            tokenizer.eos_token_id,
        ]
    blocks = list(pack_blocks(docs, tokenizer, seq_len=5, chunk=2))
    assert blocks == [stream[i : i + 5] for i in range(0, len(stream) - 4, 5)]


def test_bad_specs_name_the_field():
    data = {"source": "train.jsonl"}
    cases = [
        ({"method": "dpo"}, ("method",)),
        ({"lora": {"r": 0}}, ("lora", "r")),
        ({"lora": {"dropout": 1.5}}, ("lora", "dropout")),
        ({"method": "cpt"}, ("cpt",)),
        ({"batch_size": 10}, ("batch_size",)),
        ({"data": {"source": "a.jsonl", "dataset": "b"}}, ("data",)),
        (
            {"data": {"source": "a.jsonl", "validation_fraction": 0.1, "validation_size": 3}},
            ("data",),
        ),
        ({"bogus": 1}, ("bogus",)),
    ]
    for overrides, loc in cases:
        with pytest.raises(ValidationError) as excinfo:
            RetrainSpec.model_validate({"model": "m", "data": data, **overrides})
        assert excinfo.value.errors()[0]["loc"] == loc, overrides
    with pytest.raises(ValidationError) as excinfo:
        RetrainSpec.model_validate(
            {"model": "m", "method": "cpt", "data": data, "cpt": {"max_steps": 5, "max_tokens": 9}}
        )
    assert excinfo.value.errors()[0]["loc"] == ("cpt",)


def test_bad_data_and_setups_raise_engine_errors(random_model, tmp_path):
    model = str(random_model / "model")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="contains no records") as excinfo:
        retrain_model(
            RetrainSpec(model=model, data={"source": str(tmp_path / "empty.jsonl")}),
            tmp_path / "o1",
        )
    assert excinfo.value.code == "bad_data"
    (tmp_path / "other.jsonl").write_text('{"question": "no text or alpaca fields"}\n')
    with pytest.raises(DataError, match="without field"):
        retrain_model(
            RetrainSpec(model=model, data={"source": str(tmp_path / "other.jsonl")}),
            tmp_path / "o2",
        )
    with pytest.raises(DataError, match="does not exist"):
        retrain_model(
            RetrainSpec(model=model, data={"source": str(tmp_path / "missing.jsonl")}),
            tmp_path / "o3",
        )
    with pytest.raises(RetrainError, match="target modules"):
        retrain_model(
            RetrainSpec(
                model=model,
                data={"source": str(random_model / "alpaca.jsonl")},
                lora={"target_modules": ["c_attn"]},
            ),
            tmp_path / "o4",
        )
    with pytest.raises(RetrainError, match="float16"):
        retrain_model(
            RetrainSpec(
                model=model,
                method="cpt",
                cpt={"max_steps": 1},
                dtype="float16",
                data={"source": str(random_model / "alpaca.jsonl")},
            ),
            tmp_path / "o5",
        )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    with pytest.raises(OutputExists):
        retrain_model(
            RetrainSpec(model=model, data={"source": str(random_model / "alpaca.jsonl")}),
            tmp_path / "taken",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "other.jsonl", "taken"]


def test_cli_retrain(random_model, tmp_path, capsys):
    code = main(
        [
            "retrain",
            "--model",
            str(random_model / "model"),
            "--method",
            "lora",
            "--data",
            str(random_model / "alpaca.jsonl"),
            "--validation-fraction",
            "0.25",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "lora" in out and "eval loss" in out and "adapter" in out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (
        main(
            [
                "retrain",
                "--model",
                "m",
                "--data",
                "x.jsonl",
                "--lora-r",
                "0",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "lora.r" in capsys.readouterr().err


def test_streamed_hf_dataset_needs_and_honours_a_step_budget(random_model, tmp_path):
    # A local folder is an HF dataset to `datasets.load_dataset` (no hub access).
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the quick brown fox jumps over a lazy dog while models prune blocks of layers".split()
    with (corpus / "train.jsonl").open("w") as handle:
        for i in range(30):
            handle.write(json.dumps({"text": " ".join(words[i % 9 :] + words[: i % 9] * 3)}) + "\n")
    spec = RetrainSpec(
        model=str(random_model / "model"),
        method="cpt",
        data={"dataset": str(corpus), "streaming": True, "validation_size": 4},
        cpt={"max_steps": 3, "seq_len": 16, "warmup_steps": 0},
        micro_batch_size=2,
        batch_size=2,
    )
    stage = retrain_model(spec, tmp_path / "out")["stages"][0]
    assert stage["steps"] == 3 and stage["train_records"] is None and stage["eval_records"] == 4
    assert stage["eval_loss"] is not None
    lora = RetrainSpec(
        model=str(random_model / "model"), data={"dataset": str(corpus), "streaming": True}
    )
    with pytest.raises(DataError, match="give max_steps"):
        retrain_model(lora, tmp_path / "out2")


def test_cpt_lora_resumed_in_its_lora_stage_skips_the_finished_cpt_stage(random_model, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(" ".join(["the quick brown fox jumps over a lazy dog"] * 6) for _ in range(12))
    )
    spec = RetrainSpec(
        model=str(random_model / "model"),
        method="cpt_lora",
        data={"source": str(random_model / "alpaca.jsonl")},
        cpt={"max_steps": 3, "seq_len": 16, "warmup_steps": 0, "data": {"source": str(corpus)}},
        micro_batch_size=2,
        batch_size=2,
        max_steps=4,
        save_steps=2,
        warmup_steps=0,
    )
    checkpoints = tmp_path / "checkpoints"

    def cancel_in_lora(update: Progress) -> None:
        if update.stage == "training" and update.message == "lora" and update.done >= 3:
            raise Cancelled("cancelled by the test")

    with pytest.raises(Cancelled):
        retrain_model(spec, tmp_path / "out", progress=cancel_in_lora, checkpoint_dir=checkpoints)
    assert (checkpoints / "cpt" / "final" / "config.json").is_file()
    assert not list((checkpoints / "cpt").glob("checkpoint-*"))  # superseded by final/
    seen: list[Progress] = []
    report = retrain_model(spec, tmp_path / "out", progress=seen.append, checkpoint_dir=checkpoints)
    assert {p.message for p in seen if p.stage == "training"} == {"lora"}  # no CPT step re-run
    assert [(s["stage"], s["steps"], s["resumed_from_step"]) for s in report["stages"]] == [
        ("cpt", 3, None),
        ("lora", 4, 2),
    ]
    assert (tmp_path / "out" / "cpt" / "config.json").is_file()
