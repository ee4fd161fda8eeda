"""The default calibration draw is the paper's, token for token.

``paper_windows`` below is an independent transcription of the loop in the paper's code
(shortened-llm ``src/dataset.py``, ``get_examples``): the global ``random`` module seeded with
``seed``, a document index drawn with ``random.randint(0, len(docs) - 1)`` until the document,
tokenized with special tokens (without them under ``add_bos_to_every``), has at least
``seq_len`` tokens and was not used before, then a start ``random.randint(0, len - seq_len)``;
under ``add_bos_to_every`` the window is BOS + its first ``seq_len - 1`` tokens.
"""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from transformers import AutoTokenizer

from shortened.engine.calibration import calibration_draw, draw_windows
from shortened.engine.errors import CalibrationError
from shortened.specs import CalibrationSpec
from tests.helpers import TINY_MODEL

WORDS = "def return class import value module list dict string object file path".split()


def corpus(n: int = 60, seed: int = 3) -> list[str]:
    """Documents of mixed lengths: many too short for the windows, a few very long."""
    rng = random.Random(seed)
    lengths = [rng.choice([2, 5, 9, 20, 40, 90, 400]) for _ in range(n)]
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for length in lengths]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


def paper_windows(docs, tokenizer, n_samples, seq_len, seed, add_bos_to_every=False):
    random.seed(seed)
    samples, history = [], []
    for _ in range(n_samples):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tokenizer(
                docs[i], return_tensors="pt", add_special_tokens=not add_bos_to_every
            ).input_ids
            if ids.shape[1] >= seq_len and i not in history:
                history.append(i)
                break
        j = random.randint(0, ids.shape[1] - seq_len)
        window = ids[:, j : j + seq_len]
        if add_bos_to_every:
            window = torch.cat(
                (torch.LongTensor([[tokenizer.bos_token_id]]), window[:, :-1]), dim=1
            )
        samples.append(window)
    return torch.cat(samples, dim=0), history


@pytest.mark.parametrize(
    ("n_samples", "seq_len", "seed", "add_bos_to_every"),
    [
        (10, 32, 1234, False),
        (10, 32, 1234, True),
        (6, 100, 7, False),
        (12, 8, 0, True),
        (1, 2, 5, False),
    ],
)
def test_default_sampling_is_the_papers(tokenizer, n_samples, seq_len, seed, add_bos_to_every):
    docs = corpus()
    spec = CalibrationSpec(
        source="unused.jsonl",
        n_samples=n_samples,
        seq_len=seq_len,
        seed=seed,
        add_bos_to_every=add_bos_to_every,
    )
    assert spec.sampling == "paper"
    expected, history = paper_windows(docs, tokenizer, n_samples, seq_len, seed, add_bos_to_every)
    draw = draw_windows(docs, tokenizer, spec)
    assert torch.equal(draw.tokens, expected)
    assert draw.documents == history and len(set(history)) == n_samples
    if add_bos_to_every:
        assert (draw.tokens[:, 0] == tokenizer.bos_token_id).all()
    else:  # BOS is part of the document's ids: a window starting at 0 begins with it
        for row, start in zip(draw.tokens, draw.starts, strict=True):
            assert (row[0] == tokenizer.bos_token_id) == (start == 0)


def test_long_enough_counts_the_bos(tokenizer):
    """A document of exactly seq_len - 1 text tokens is long enough (BOS makes seq_len), and
    only then can the window start at 0 with BOS."""
    doc = " ".join(WORDS[:6])
    text_len = len(tokenizer(doc, add_special_tokens=False).input_ids)
    spec = CalibrationSpec(source="x.jsonl", n_samples=1, seq_len=text_len + 1, seed=1)
    draw = draw_windows(["a", doc], tokenizer, spec)
    assert draw.documents == [1] and draw.starts == [0]
    assert draw.tokens[0].tolist() == tokenizer(doc).input_ids


def test_not_enough_documents_raises_instead_of_looping(tokenizer):
    docs = corpus()
    long_enough = sum(len(tokenizer(d).input_ids) >= 100 for d in docs)
    spec = CalibrationSpec(source="x.jsonl", n_samples=long_enough + 1, seq_len=100)
    with pytest.raises(CalibrationError, match=f"found {long_enough} among 60 documents"):
        draw_windows(docs, tokenizer, spec)
    with pytest.raises(CalibrationError, match="longest has"):
        draw_windows(docs, tokenizer, spec.model_copy(update={"seq_len": 10_000, "n_samples": 1}))
    with pytest.raises(CalibrationError, match="need 61 documents"):
        draw_windows(docs, tokenizer, spec.model_copy(update={"n_samples": 61}))
    # Exactly as many long-enough documents as windows: found, whatever the draws.
    exact = draw_windows(docs, tokenizer, spec.model_copy(update={"n_samples": long_enough}))
    assert torch.equal(exact.tokens, paper_windows(docs, tokenizer, long_enough, 100, 1234)[0])


def test_shuffle_sampling_is_an_explicit_option(tokenizer):
    docs = corpus()
    spec = CalibrationSpec(source="x.jsonl", n_samples=5, seq_len=32, sampling="shuffle")
    draw = draw_windows(docs, tokenizer, spec)
    order = list(range(len(docs)))
    random.Random(1234).shuffle(order)
    assert (
        draw.sampling == "shuffle"
        and draw.documents
        == [i for i in order if len(tokenizer(docs[i], add_special_tokens=False).input_ids) >= 32][
            :5
        ]
    )
    assert not torch.equal(
        draw.tokens,
        draw_windows(docs, tokenizer, spec.model_copy(update={"sampling": "paper"})).tokens,
    )


def test_file_draw_indexes_records_and_is_quiet(tokenizer, tmp_path, caplog):
    """Indices are record numbers of the file (empty records included, as the paper's
    dataset), and tokenizing documents longer than the model's maximum logs no warning."""
    docs = corpus()
    docs[0] = ""
    docs[5] = " ".join(["value"] * 2000)  # far beyond model_max_length (512)
    path = tmp_path / "cal.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = CalibrationSpec(source=str(path), n_samples=10, seq_len=32)
    with caplog.at_level(logging.WARNING):
        draw = calibration_draw(spec, tokenizer)
    assert "longer than the specified maximum" not in caplog.text
    assert torch.equal(draw.tokens, paper_windows(docs, tokenizer, 10, 32, 1234)[0])
    record = draw.record()
    assert (
        record["sampling"] == "paper"
        and record["document_indices"] == draw.documents
        and record["window_starts"] == draw.starts
    )
