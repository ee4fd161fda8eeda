"""The real-model benchmark's text (``scripts/make_botchan_data.py``): the book is cut from its
Gutenberg file without header, licence, footnotes or markers, and the committed splits
(calibration, training, held-out) share no text."""

from __future__ import annotations

import json
import re
from pathlib import Path

from scripts.make_botchan_data import chapters, documents

DATA = Path(__file__).resolve().parents[2] / "data"
CALIBRATION = DATA / "botchan_calibration.jsonl"
TRAIN = DATA / "botchan_train.jsonl"
HELDOUT = DATA / "botchan_heldout.txt"

GUTENBERG_LIKE = "\r\n".join(
    [
        "\ufeffProject Gutenberg's Botchan (Master Darling), by Kin-nosuke Natsume",
        "*** START OF THIS PROJECT GUTENBERG EBOOK BOTCHAN (MASTER DARLING) ***",
        "A NOTE BY THE TRANSLATOR",
        "CHAPTER I",
        "I was reckless.[A] The school[1] was tall.",
        "[Footnote 1: A grammar school,",
        "in Tokyo.]",
        "I jumped.",
        "CHAPTER II.",
        "The steamer stopped.",
        "--(THE END)--",
        "[A: recklass]",
        "End of Project Gutenberg's Botchan",
    ]
).encode()


def test_chapters_keep_the_novel_alone() -> None:
    book = chapters(GUTENBERG_LIKE)
    assert book == {
        1: ["I was reckless. The school was tall.", "I jumped."],
        2: ["The steamer stopped."],
    }


def test_documents_end_at_a_sentence_after_enough_lines() -> None:
    lines = [f"line {i} goes on" for i in range(25)]
    lines[21] = "line 21 ends."
    docs = documents(lines)
    assert docs == [" ".join(lines[:22]), " ".join(lines[22:])]


def sentences(text: str) -> set[str]:
    """Sentences long enough not to repeat by chance in a novel."""
    return {s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 12}


def test_committed_splits_share_no_text() -> None:
    calibration = [json.loads(line)["text"] for line in CALIBRATION.read_text().splitlines()]
    train = [json.loads(line)["text"] for line in TRAIN.read_text().splitlines()]
    heldout = HELDOUT.read_text()
    assert len(heldout.strip().split("\n\n")) == 4  # chapters VIII-XI
    assert len(calibration) >= 30 and len(train) >= 50
    parts = [sentences(" ".join(calibration)), sentences(" ".join(train)), sentences(heldout)]
    assert all(len(p) > 100 for p in parts)
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    for text in (*calibration, *train, heldout):
        assert "Gutenberg" not in text and "[" not in text and "Footnote" not in text
