"""The committed tiny real model (``models/tiny-llama``) and its data files.

The model is trained by ``scripts/train_tiny_model.py`` and committed; these tests check
that it loads offline, has the shape the pruning tests rely on (12 blocks, <= 10 MB of
weights), has really learned something (held-out perplexity far below a random
initialisation's) and generates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "tiny-llama"
DATA_DIR = ROOT / "data"
HELDOUT_FILE = DATA_DIR / "stdlib_docs_heldout.txt"
WINDOW = 128

# The trained model's held-out perplexity is about 48 (see models/tiny-llama/TRAINING.md);
# a random initialisation of the same configuration is near the vocabulary size (2048).
TRAINED_PPL_MAX = 60.0
RANDOM_PPL_MIN = 1000.0


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()


@pytest.fixture(scope="module")
def heldout_ids(tokenizer) -> torch.Tensor:
    text = HELDOUT_FILE.read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def windowed_perplexity(
    model,
    ids: torch.Tensor,
    window: int = WINDOW,
    max_windows: int | None = None,
    batch_size: int = 32,
) -> float:
    """Perplexity over the non-overlapping ``window``-token windows of ``ids`` (tail dropped)."""
    windows = ids[: ids.numel() // window * window].view(-1, window)[:max_windows]
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total_nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        ).item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def test_model_has_twelve_llama_blocks_and_small_weights(model):
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 12
    assert len(model.model.layers) == 12
    assert model.config.tie_word_embeddings
    weight_files = list(MODEL_DIR.glob("*.safetensors"))
    assert weight_files, "no safetensors weights in models/tiny-llama"
    assert sum(f.stat().st_size for f in weight_files) <= 10 * 1000 * 1000
    assert (MODEL_DIR / "TRAINING.md").is_file()


def test_tokenizer_is_byte_level_bpe_that_prepends_bos(tokenizer, model):
    assert len(tokenizer) == model.config.vocab_size
    for token in ("<s>", "</s>", "<unk>", "<pad>"):
        assert token in tokenizer.get_vocab()
    text = "Return a new list with the items sorted, then print it (e.g. ö, ✓)."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == model.config.bos_token_id
    assert tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]


def test_heldout_perplexity_is_far_below_random_initialisation(model, heldout_ids):
    assert heldout_ids.numel() >= 50 * WINDOW, "held-out text unexpectedly short"
    trained = windowed_perplexity(model, heldout_ids)

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(MODEL_DIR, local_files_only=True)
    random_init = AutoModelForCausalLM.from_config(config).eval()
    # A few windows are plenty to see that an untrained model is near uniform.
    untrained = windowed_perplexity(random_init, heldout_ids, max_windows=32)

    assert trained < TRAINED_PPL_MAX, f"trained model's held-out perplexity {trained:.1f}"
    assert untrained > RANDOM_PPL_MIN, (
        f"random initialisation's held-out perplexity {untrained:.1f}"
    )
    assert untrained / trained > 20


def test_greedy_generation_produces_new_tokens(model, tokenizer):
    inputs = tokenizer("Return the number of", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert new_tokens.numel() > 0
    assert tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    # Greedy decoding is deterministic.
    with torch.no_grad():
        again = model.generate(
            **inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert torch.equal(output, again)


def test_data_files_for_the_tests(tokenizer):
    files = [
        "stdlib_docs_train.jsonl",
        "stdlib_docs_heldout.txt",
        "calibration.jsonl",
        "alpaca_tiny.jsonl",
    ]
    assert sum((DATA_DIR / name).stat().st_size for name in files) < 5 * 1000 * 1000

    train_texts = {
        json.loads(line)["text"]
        for line in (DATA_DIR / "stdlib_docs_train.jsonl").read_text(encoding="utf-8").splitlines()
    }
    heldout_texts = set(HELDOUT_FILE.read_text(encoding="utf-8").strip().split("\n\n"))
    assert train_texts and heldout_texts
    assert not train_texts & heldout_texts, "held-out documents leaked into the training split"

    calibration = [
        json.loads(line)["text"]
        for line in (DATA_DIR / "calibration.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(calibration) >= 100
    assert all(len(tokenizer(text)["input_ids"]) > WINDOW for text in calibration)

    alpaca = [
        json.loads(line)
        for line in (DATA_DIR / "alpaca_tiny.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(alpaca) >= 100
    assert all(set(record) == {"instruction", "input", "output"} for record in alpaca)
    assert all(record["instruction"] and record["output"] for record in alpaca)
