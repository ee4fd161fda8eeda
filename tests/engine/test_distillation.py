"""Knowledge distillation from the parent: the chunked loss against a dense transcription of
its definition, KD recovering a pruned tiny-llama, LoRA KD through the CLI, cancel + resume,
tokenizer mismatch refused before training, and the spec's bounds."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from shortened.cli import main
from shortened.engine.distillation import DistillationTrainer, KdLoss
from shortened.engine.errors import RetrainError
from shortened.engine.progress import Progress
from shortened.engine.retrain import retrain_model, training_arguments
from shortened.engine.retrain_data import IGNORE_INDEX
from shortened.specs import PruneSpec, RetrainSpec
from tests.helpers import (
    HELDOUT,
    TINY_MODEL,
    VOCAB,
    cancel_then_resume,
    heldout_windows,
    perplexity,
    save_tiny,
    tiny_model,
)

TRAIN_TEXT = HELDOUT.parent / "stdlib_docs_train.jsonl"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dense_kd_loss(student, teacher, input_ids, attention_mask, labels, alpha, temperature):
    """The definition, on full logits: alpha * T^2 * KL(p_teacher^T || p_student^T) +
    (1 - alpha) * CE, both averaged over the positions whose (shifted) label is counted."""
    z_student = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    with torch.no_grad():
        z_teacher = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    counted = (targets != IGNORE_INDEX).float()
    p_teacher = torch.softmax(z_teacher / temperature, dim=-1)
    kl = (
        p_teacher
        * (
            torch.log_softmax(z_teacher / temperature, dim=-1)
            - torch.log_softmax(z_student / temperature, dim=-1)
        )
    ).sum(-1)
    nll = -torch.log_softmax(z_student, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    per_token = alpha * temperature**2 * kl + (1 - alpha) * nll
    return (per_token * counted).sum() / counted.sum()


def batches(seed: int = 0, count: int = 3, seq: int = 12):
    """Batches with right padding (masked, labels ignored) and ignored prompt tokens."""
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        input_ids = torch.randint(4, VOCAB, (3, seq), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        labels = input_ids.clone()
        attention_mask[1, seq - 3 - index :] = 0
        input_ids[1, seq - 3 - index :] = 0
        labels[1, seq - 3 - index :] = IGNORE_INDEX
        labels[2, : 4 + index] = IGNORE_INDEX  # a prompt the LM loss skips
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="module")
def student_and_teacher():
    return tiny_model("llama", num_layers=2, seed=1), tiny_model("llama", num_layers=4, seed=2)


def kd_trainer(student, teacher, loss: KdLoss, tmp_path) -> DistillationTrainer:
    args = training_arguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        activation_checkpointing=False,
        activation_checkpointing_kwargs=None,
    )
    return DistillationTrainer(model=student, args=args, teacher=teacher, kd_loss=loss)


@pytest.mark.parametrize("chunk_size", [4096, 5])  # one chunk; chunks shorter than a sequence
@pytest.mark.parametrize("alpha,temperature", [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (0.3, 0.7)])
def test_kd_loss_and_gradients_equal_the_dense_definition(
    student_and_teacher, tmp_path, chunk_size, alpha, temperature
):
    student, teacher = student_and_teacher
    trainer = kd_trainer(student, teacher, KdLoss(alpha, temperature, chunk_size), tmp_path)
    for batch in batches():
        student.eval()  # evaluation: no token count from Trainer, the batch's own mean
        with torch.no_grad():
            ours = trainer.compute_loss(student, batch)
        expected = dense_kd_loss(student, teacher, **batch, alpha=alpha, temperature=temperature)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)

        # Training: normalised by Trainer's token count of the accumulated step (here twice
        # this batch's), gradients through the recomputed chunks equal the dense ones.
        student.train()
        counted = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        student.zero_grad()
        trainer.compute_loss(student, batch, num_items_in_batch=2 * counted).backward()
        ours_grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        (
            dense_kd_loss(student, teacher, **batch, alpha=alpha, temperature=temperature) / 2
        ).backward()
        for got, want in zip(ours_grads, [p.grad for p in student.parameters()], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        student.zero_grad()
    student.eval()


def test_kd_of_identical_models_is_zero_and_gemma_logits_are_capped(tmp_path):
    # Gemma 2 caps its logits in forward; the chunked head must do the same or the KL of a
    # model against itself would not vanish and would not match the dense loss.
    model = tiny_model("gemma2", num_layers=6, seed=3, final_logit_softcapping=0.5)
    trainer = kd_trainer(model, model, KdLoss(1.0, 1.0, 7), tmp_path)
    other = tiny_model("gemma2", num_layers=6, seed=4, final_logit_softcapping=0.5)
    for batch in batches(seed=5, count=2):
        with torch.no_grad():
            assert trainer.compute_loss(model, batch).abs().item() < 1e-6
            trainer.teacher = other
            torch.testing.assert_close(
                trainer.compute_loss(model, batch),
                dense_kd_loss(model, other, **batch, alpha=1.0, temperature=1.0),
                rtol=1e-5,
                atol=1e-5,
            )
            trainer.teacher = model


@pytest.fixture(scope="module")
def pruned_tiny(tmp_path_factory):
    """tiny-llama without 4 of its 12 blocks (a block-importance-free cut, so the test does
    not depend on a criterion), saved with its tokenizer."""
    from shortened.engine.architectures import keep_blocks

    root = tmp_path_factory.mktemp("kd")
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    keep_blocks(model, [0, 1, 2, 3, 5, 7, 9, 11])
    model.save_pretrained(root / "pruned")
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(root / "pruned")
    return root


def test_kd_lowers_heldout_loss_of_a_pruned_tiny_llama(pruned_tiny):
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    windows = heldout_windows(tokenizer, seq_len=128, max_windows=24)
    before = perplexity(AutoModelForCausalLM.from_pretrained(pruned_tiny / "pruned"), windows)
    spec = RetrainSpec(
        model=str(pruned_tiny / "pruned"),
        method="kd",
        data={"source": str(TRAIN_TEXT), "validation_size": 8, "max_records": 300},
        kd={
            "teacher": str(TINY_MODEL),
            "max_steps": 12,
            "learning_rate": 1e-3,
            "warmup_steps": 2,
            "seq_len": 128,
            "chunk_size": 100,
        },
        micro_batch_size=4,
        batch_size=8,
        logging_steps=4,
    )
    seen: list[Progress] = []
    report = retrain_model(spec, pruned_tiny / "kd", progress=seen.append)
    after = perplexity(AutoModelForCausalLM.from_pretrained(pruned_tiny / "kd"), windows)
    print(f"KD: held-out ppl {before:.2f} -> {after:.2f}")
    assert after < before

    stage = report["stages"][0]
    assert report["method"] == "kd" and stage["stage"] == "kd" and stage["steps"] == 12
    assert stage["teacher"] == str(TINY_MODEL) and stage["alpha"] == 1.0
    assert stage["lr_scheduler"] == "cosine" and stage["seq_len"] == 128
    assert stage["eval_loss"] < stage["eval_loss_start"]  # the KD objective on held-out blocks
    assert report["trainable_params"]["kd"] == report["params"]
    assert not (pruned_tiny / "kd" / "adapter").exists()
    training = [p for p in seen if p.stage == "training"]
    assert training[-1].done == training[-1].total == 12
    assert any(p.stage == "loading" and "teacher" in (p.message or "") for p in seen)


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory):
    """A tiny random student and a deeper teacher with the same tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("kd_mechanics")
    save_tiny(tiny_model("llama", num_layers=2, seed=1), root / "student")
    save_tiny(tiny_model("llama", num_layers=4, seed=2), root / "teacher")
    words = "the quick brown fox jumps over a lazy dog while models prune blocks of layers"
    (root / "text.txt").write_text("\n\n".join(f"{words} {i}" * 4 for i in range(30)))
    return root


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft's probe
def test_cli_kd_with_lora_writes_adapter_and_merged_model(random_pair, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "retrain",
            "--model",
            str(random_pair / "student"),
            "--method",
            "kd",
            "--teacher",
            str(random_pair / "teacher"),
            "--kd-lora",
            "--kd-alpha",
            "0.5",
            "--kd-temperature",
            "2",
            "--kd-max-steps",
            "2",
            "--kd-seq-len",
            "16",
            "--kd-chunk-size",
            "8",
            "--kd-warmup-steps",
            "0",
            "--data",
            str(random_pair / "text.txt"),
            "--micro-batch-size",
            "2",
            "--batch-size",
            "2",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    assert "kd" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["alpha"] == 0.5 and stage["temperature"] == 2.0 and stage["chunk_size"] == 8
    assert 0 < report["trainable_params"]["kd"] < report["params"]
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(random_pair / "student")

    from peft import PeftModel

    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(random_pair / "student"), out / "adapter"
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_kd_cancel_and_resume_continue_at_the_saved_step(random_pair, tmp_path):
    spec = RetrainSpec(
        model=str(random_pair / "student"),
        method="kd",
        data={"source": str(random_pair / "text.txt")},
        kd={"teacher": str(random_pair / "teacher"), "max_steps": 4, "seq_len": 16},
        micro_batch_size=2,
        batch_size=2,
        save_steps=2,
        logging_steps=1,
    )
    report = cancel_then_resume(spec, tmp_path, "kd")
    assert report["stages"][0]["stage"] == "kd"


def other_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer learnt from other text (the model's logits keep their number)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False
    )
    tokenizer.train_from_iterator(["zebras quietly vex jumpy wizards"] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_teacher_with_another_tokenizer_is_refused_before_training(random_pair, tmp_path):
    relabelled = tmp_path / "relabelled"
    tiny_model("llama", num_layers=4, seed=2).save_pretrained(relabelled)
    other_tokenizer().save_pretrained(relabelled)
    # Both models have 96 logits: only the tokenizers tell them apart.
    assert AutoModelForCausalLM.from_pretrained(relabelled).config.vocab_size == VOCAB
    # The data file does not exist: the teacher check must come first, before any data is read.
    base = {
        "model": str(random_pair / "student"),
        "method": "kd",
        "data": {"source": str(tmp_path / "missing.txt")},
    }
    for teacher, message in [
        (TINY_MODEL, "vocabulary of 2048 tokens, the student 96"),
        (relabelled, "different tokenizer: .* tokens differ"),
    ]:
        spec = RetrainSpec.model_validate({**base, "kd": {"teacher": str(teacher), "max_steps": 1}})
        with pytest.raises(RetrainError, match=message) as caught:
            retrain_model(spec, tmp_path / "out")
        assert caught.value.code == "retrain_error" and "same tokenizer" in str(caught.value)
        assert not (tmp_path / "out").exists()


def kd_spec(**kd) -> dict:
    return {"model": "m", "method": "kd", "data": {"source": "x.jsonl"}, "kd": kd}


@pytest.mark.parametrize(
    "kd,field,message",
    [
        ({"max_steps": 5}, None, "needs kd.teacher"),
        ({"teacher": "t"}, "kd", "exactly one of 'max_steps' and 'max_tokens'"),
        ({"teacher": "t", "max_steps": 5, "alpha": 1.01}, "kd.alpha", "less than or equal to 1"),
        ({"teacher": "t", "max_steps": 5, "alpha": -0.1}, "kd.alpha", "greater than or equal"),
        ({"teacher": "t", "max_steps": 5, "temperature": 0.05}, "kd.temperature", "equal to 0.1"),
        ({"teacher": "t", "max_steps": 5, "temperature": 1e9}, "kd.temperature", "less than"),
        ({"teacher": "t", "max_steps": 10**12}, "kd.max_steps", "less than or equal"),
        ({"teacher": "t", "max_tokens": 10**14}, "kd.max_tokens", "less than or equal"),
        ({"teacher": "t", "max_steps": 5, "chunk_size": 0}, "kd.chunk_size", "greater than"),
        ({"teacher": "t", "max_steps": 5, "learning_rate": 0}, "kd.learning_rate", "greater"),
        ({"teacher": "ftp://x", "max_steps": 5}, "kd.teacher", "unsupported scheme 'ftp'"),
        ({"teacher": "t", "max_steps": 5, "beta": 1}, "kd.beta", "Extra inputs"),
    ],
)
def test_kd_spec_bounds_name_the_field(kd, field, message):
    with pytest.raises(ValidationError, match=message) as caught:
        RetrainSpec.model_validate(kd_spec(**kd))
    if field is not None:
        assert ".".join(map(str, caught.value.errors()[0]["loc"])) == field


def test_kd_spec_needs_its_section_and_documents_minitron_defaults():
    with pytest.raises(ValidationError, match="method kd needs a budget"):
        RetrainSpec.model_validate({"model": "m", "method": "kd", "data": {"source": "x.jsonl"}})
    kd = RetrainSpec.model_validate(kd_spec(teacher="parent", max_tokens=10**6)).kd
    assert kd is not None and (kd.alpha, kd.temperature, kd.lora) == (1.0, 1.0, False)


def test_a_prune_pipeline_fills_the_teacher_with_the_pruned_models_source():
    prune = PruneSpec.model_validate(
        {
            "model": "hf://org/parent",
            "criterion": "magnitude",
            "num_blocks": 2,
            "retrain": {"method": "kd", "data": {"source": "x.jsonl"}, "kd": {"max_steps": 5}},
        }
    )
    assert prune.retrain is not None
    followup = prune.retrain.for_model("job://abc", teacher=prune.model)
    assert followup.model == "job://abc" and followup.kd is not None
    assert followup.kd.teacher == "hf://org/parent"
    # A teacher given in the pipeline is kept.
    given = prune.retrain.model_copy(deep=True)
    assert given.kd is not None
    given.kd.teacher = "/models/bigger"
    assert given.for_model("job://abc", teacher=prune.model).kd.teacher == "/models/bigger"  # type: ignore[union-attr]
