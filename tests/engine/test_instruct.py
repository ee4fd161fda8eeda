"""Instruct models: calibration and training data rendered through the model's chat template,
and the pruned model's next-token agreement with its parent on held-out chat prompts.

The chat template here is a small Jinja template added to a copy of the repository's tiny
model (which has none); expected renderings are written out with jinja2 directly, not with
``apply_chat_template``, and the agreement figures are recomputed per prompt and per position
in float64 without padding.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jinja2
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortened.engine.calibration import calibration_draw
from shortened.engine.errors import NoChatTemplate
from shortened.engine.evaluate import evaluate_model, next_token_agreement, token_agreement
from shortened.engine.retrain_data import IGNORE_INDEX, build_stage_data
from shortened.specs import CalibrationSpec, EvalSpec, TrainDataSpec
from tests.helpers import TINY_MODEL, save_tiny, tiny_model

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
RECORDS = [
    {"instruction": "Explain what a list is.", "input": "", "output": "An ordered sequence."},
    {"instruction": "Sum these.", "input": "1 and 2", "output": "The sum is 3."},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "Seven."},
        ]
    },
    {"text": "What does the module path do in the standard library of the language?"},
]


def render(messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    """The template's output, written by jinja2 itself."""
    return jinja2.Template(TEMPLATE).render(
        messages=messages,
        bos_token="<s>",
        eos_token="</s>",
        add_generation_prompt=generation_prompt,
    )


def with_template(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return dest


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return with_template(Path(TINY_MODEL), tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="module")
def tokenizer(chat_model):
    return AutoTokenizer.from_pretrained(chat_model)


@pytest.fixture
def records_file(tmp_path) -> Path:
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS * 6) + "\n")
    return path


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- calibration


def test_calibration_windows_are_cut_from_the_rendered_chats(tokenizer, records_file):
    spec = CalibrationSpec(source=str(records_file), chat_template=True, n_samples=4, seq_len=16)
    draw = calibration_draw(spec, tokenizer)
    records = RECORDS * 6
    expected_chats = [
        [{"role": "user", "content": "Explain what a list is."},
         {"role": "assistant", "content": "An ordered sequence."}],
        [{"role": "user", "content": "Sum these.\n\n1 and 2"},
         {"role": "assistant", "content": "The sum is 3."}],
        RECORDS[2]["messages"],
        [{"role": "user", "content": RECORDS[3]["text"]}],
    ]  # fmt: skip
    for window, index, start in zip(draw.tokens, draw.documents, draw.starts, strict=True):
        assert records[index] == RECORDS[index % 4]
        rendered = ids(tokenizer, render(expected_chats[index % 4]))
        assert window.tolist() == rendered[start : start + 16]
    # The template wrote BOS once: the tokenizer did not add another.
    whole = [ids(tokenizer, render(chat)) for chat in expected_chats]
    assert all(chat.count(tokenizer.bos_token_id) == 1 for chat in whole)


def test_calibration_without_a_template_is_refused(records_file):
    plain = AutoTokenizer.from_pretrained(TINY_MODEL)
    spec = CalibrationSpec(source=str(records_file), chat_template=True, n_samples=2, seq_len=8)
    with pytest.raises(NoChatTemplate, match="no chat template") as caught:
        calibration_draw(spec, plain)
    assert caught.value.code == "no_chat_template"


# ---------------------------------------------------------------------------- retraining


def test_supervised_chat_examples_train_on_the_final_answer_only(tokenizer, records_file):
    data = TrainDataSpec(source=str(records_file), chat_template=True)
    stage = build_stage_data(
        data, tokenizer, kind="lora", length=256, seed=0, store=None, cache_dir=None
    )
    assert stage.format == "chat"
    by_text = {tokenizer.decode(item["input_ids"]): item for item in stage.train}
    messages = RECORDS[2]["messages"]
    item = by_text[tokenizer.decode(ids(tokenizer, render(messages)))]
    prompt_len = len(ids(tokenizer, render(messages[:2], generation_prompt=True)))
    assert item["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:]
    assert tokenizer.decode(item["labels"][prompt_len:]) == "Seven.</s>\n"
    # A text record is one user turn with no answer: every token is trained on.
    text_item = by_text[
        tokenizer.decode(ids(tokenizer, render([{"role": "user", "content": RECORDS[3]["text"]}])))
    ]
    assert text_item["labels"] == text_item["input_ids"]


def test_packed_chats_carry_the_templates_special_tokens_alone(tokenizer, records_file):
    data = TrainDataSpec(source=str(records_file), chat_template=True)
    stage = build_stage_data(
        data, tokenizer, kind="cpt", length=32, seed=0, store=None, cache_dir=None
    )
    stream = [token for block in stage.train for token in block["input_ids"]]
    # The template's markers alone: never the packer's BOS beside the template's, nor its
    # EOS after the template's last turn (which ends in a newline).
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pairs = list(zip(stream, stream[1:], strict=False))
    assert (bos, bos) not in pairs and (eos, bos) not in pairs
    assert tokenizer.decode(stream[:3]).startswith("<s><|")
    assert stream.count(bos) in (len(RECORDS) * 6 - 1, len(RECORDS) * 6)


def test_training_data_without_a_template_is_refused(records_file):
    plain = AutoTokenizer.from_pretrained(TINY_MODEL)
    data = TrainDataSpec(source=str(records_file), chat_template=True)
    with pytest.raises(NoChatTemplate):
        build_stage_data(data, plain, kind="lora", length=64, seed=0, store=None, cache_dir=None)


# ---------------------------------------------------------------------------- agreement


def reference_agreement(model, parent, prompts: list[list[int]]) -> tuple[float, float, int]:
    """Top-1 agreement and mean KL(parent || model), one prompt at a time (no padding),
    position by position in float64 with plain arithmetic."""
    agree, kl_sum, positions = 0, 0.0, 0
    with torch.no_grad():
        for prompt in prompts:
            batch = torch.tensor([prompt])
            p_logits = parent(input_ids=batch).logits[0].double()
            q_logits = model(input_ids=batch).logits[0].double()
            for p_row, q_row in zip(p_logits.tolist(), q_logits.tolist(), strict=True):
                p_norm = math.log(sum(math.exp(v) for v in p_row))
                q_norm = math.log(sum(math.exp(v) for v in q_row))
                kl_sum += sum(
                    math.exp(p - p_norm) * ((p - p_norm) - (q - q_norm))
                    for p, q in zip(p_row, q_row, strict=True)
                )
                agree += p_row.index(max(p_row)) == q_row.index(max(q_row))
                positions += 1
    return agree / positions, kl_sum / positions, positions


def test_agreement_matches_a_per_position_transcription():
    parent = tiny_model("llama", num_layers=4, seed=1).eval()
    model = tiny_model("llama", num_layers=3, seed=2).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (n,), generator=generator).tolist() for n in (5, 11, 2, 8, 7)]
    result = next_token_agreement(model, parent, prompts, batch_size=3)
    top1, mean_kl, positions = reference_agreement(model, parent, prompts)
    assert result["positions"] == positions == 33 and result["prompts"] == 5
    assert result["top1"] == pytest.approx(top1, abs=1e-9)
    assert result["mean_kl"] == pytest.approx(mean_kl, rel=1e-4)
    assert 0 < result["top1"] < 1 and result["mean_kl"] > 0
    same = next_token_agreement(parent, parent, prompts, batch_size=2)
    assert same["top1"] == 1.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-6)


def test_token_agreement_of_known_distributions():
    # Position 0: p = (0.6, 0.4, ~0), q = (0.25, 0.75, ~0): the argmaxes differ.
    # Position 1: p = (0.1, 0.2, 0.7), q = (0.2, 0.1, 0.7): both pick the last token.
    parent = torch.log(torch.tensor([[0.6, 0.4, 1e-30], [0.1, 0.2, 0.7]]))
    model = torch.log(torch.tensor([[0.25, 0.75, 1e-30], [0.2, 0.1, 0.7]]))
    same, kl = token_agreement(parent, model)
    assert same.tolist() == [False, True]
    expected = [
        0.6 * math.log(0.6 / 0.25) + 0.4 * math.log(0.4 / 0.75),
        0.1 * math.log(0.1 / 0.2) + 0.2 * math.log(0.2 / 0.1),
    ]
    assert kl.tolist() == pytest.approx(expected, abs=1e-6)


def test_eval_reports_agreement_on_chat_prompts(tmp_path, records_file):
    parent = with_template(
        save_tiny(tiny_model("llama", seed=1), tmp_path / "p0"), tmp_path / "parent"
    )
    pruned = with_template(
        save_tiny(tiny_model("llama", num_layers=4, seed=2), tmp_path / "m0"), tmp_path / "model"
    )
    spec = EvalSpec(
        model=str(pruned),
        compare_with=str(parent),
        agreement={"prompts": str(records_file), "max_prompts": 4, "batch_size": 3},
    )
    report = evaluate_model(spec, tmp_path / "out")
    agreement = report["agreement"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["agreement"] == agreement
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    # The prompts: each record's conversation without its answer, with the generation prompt.
    prompts = [
        ids(tokenizer, render([{"role": "user", "content": "Explain what a list is."}], True)),
        ids(tokenizer, render([{"role": "user", "content": "Sum these.\n\n1 and 2"}], True)),
        ids(tokenizer, render(RECORDS[2]["messages"][:2], True)),
        ids(tokenizer, render([{"role": "user", "content": RECORDS[3]["text"]}], True)),
    ]
    top1, mean_kl, positions = reference_agreement(
        AutoModelForCausalLM.from_pretrained(pruned).eval(),
        AutoModelForCausalLM.from_pretrained(parent).eval(),
        prompts,
    )
    assert (agreement["prompts"], agreement["positions"]) == (4, positions)
    assert agreement["top1"] == pytest.approx(top1, abs=1e-9)
    assert agreement["mean_kl"] == pytest.approx(mean_kl, rel=1e-4)
    assert agreement["chat_template"] is True and agreement["parent"] == str(parent)


def test_agreement_needs_the_parent_and_a_template(tmp_path, records_file):
    with pytest.raises(ValueError, match="give 'compare_with'"):
        EvalSpec(model=str(TINY_MODEL), agreement={"prompts": str(records_file)})
    spec = EvalSpec(
        model=str(TINY_MODEL),
        compare_with=str(TINY_MODEL),
        agreement={"prompts": str(records_file)},
    )
    with pytest.raises(NoChatTemplate):
        evaluate_model(spec)
