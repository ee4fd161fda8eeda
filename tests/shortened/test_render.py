"""The block-score chart: bars stand on a labelled value axis, so their heights compare as the
scores do, and every protected block is marked legibly."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from shortened.render import block_score_svg, value_axis

SVG = "{http://www.w3.org/2000/svg}"


def _chart(report: dict) -> ET.Element:
    return ET.fromstring(block_score_svg(report, annotate=True))


def _bars(root: ET.Element) -> dict[int, ET.Element]:
    return {int(r.get("data-block")): r for r in root.iter(f"{SVG}rect") if r.get("data-block")}


@pytest.mark.parametrize(
    "values",
    [[19.10, 19.57, 19.3], [1.0, 40.0, 3.0], [0.001, 0.004], [-2.0, 3.0], [5.0, 5.0]],
)
def test_axis_covers_the_values_with_even_ticks(values) -> None:
    bottom, top, ticks = value_axis(values)
    assert bottom < min(values) or bottom == 0 <= min(values)
    assert top >= max(values)
    steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert len(steps) == 1 and ticks[0] == bottom and ticks[-1] == pytest.approx(top)


def test_bar_heights_are_proportional_to_score_minus_axis_bottom() -> None:
    scores = [None, 19.10, 19.57, 19.30, 19.45, None]
    report = {
        "criterion": "ppl",
        "block_scores": scores,
        "removed_blocks": [1],
        "protected_blocks": [0, 5],
    }
    root = _chart(report)
    axis = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "axis")
    bottom, top = float(axis.get("data-bottom")), float(axis.get("data-top"))
    labels = [t.text for t in axis.iter(f"{SVG}text") if t.get("class") == "tick"]
    assert len(labels) >= 3 and all(re.fullmatch(r"[\d.,]+", label) for label in labels)
    bars = _bars(root)
    full = 220  # the chart's plot height
    for block, score in enumerate(scores):
        if score is not None:
            expected = full * (score - bottom) / (top - bottom)
            assert float(bars[block].get("height")) == pytest.approx(expected, abs=0.11)
    # The labels say where the axis starts: a 2 % difference cannot pass for a 10x one.
    assert float(labels[0].replace(",", "")) == bottom <= 19.10 <= 19.57 <= top


def test_unscored_protected_blocks_show_their_mark_and_no_na() -> None:
    report = {
        "criterion": "taylor",
        "block_scores": [None, 0.5, 0.2, None, 0.9, None],
        "removed_blocks": [2],
        "protected_blocks": [0, 5],
    }
    root = _chart(report)
    texts = [(t.get("class"), t.get("data-block"), t.text) for t in root.iter(f"{SVG}text")]
    marks = {(cls, block, text) for cls, block, text in texts if cls and cls.startswith("mark")}
    assert marks == {
        ("mark protected", "0", "P"),
        ("mark protected", "5", "P"),
        ("mark removed", "2", "R"),
    }
    # Only the unprotected block without a score says n/a.
    assert [t for t in texts if t[0] == "na"] == [("na", None, "n/a")]
    bars = _bars(root)
    assert "unscored" in bars[0].get("class") and float(bars[0].get("height")) > 0
