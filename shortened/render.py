"""Pictures of block scores: a text bar chart for terminals and an SVG for files and pages."""

from __future__ import annotations

import statistics
from html import escape
from typing import Any

_BAR = "█"


def _scaled(scores: list[float | None]) -> list[float]:
    values = [s for s in scores if s is not None]
    if not values:
        return [0.0 for _ in scores]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    # Keep a sliver for the smallest score so every computed block shows a bar.
    return [0.0 if s is None else 0.05 + 0.95 * (s - low) / span for s in scores]


# In the HTML report, scores above this multiple of the median are clipped: one critical block
# (often the first, whose removal multiplies perplexity) would otherwise flatten every other
# bar, and the differences that decide which blocks go are among the ordinary ones.
CLIP_RATIO = 3.0


def _clip_cap(scores: list[float | None]) -> float | None:
    """The value tall bars are clipped to, or None when nothing needs clipping."""
    values = sorted(s for s in scores if s is not None)
    if len(values) < 3:
        return None
    median = statistics.median(values)
    if median <= 0 or values[-1] <= CLIP_RATIO * median:
        return None
    return max(v for v in values if v <= CLIP_RATIO * median)


def block_score_chart(report: dict[str, Any], width: int = 40) -> str:
    """One line per block: index, bar, score, and R (removed) / P (protected) marks."""
    scores = report["block_scores"]
    removed, protected = set(report["removed_blocks"]), set(report.get("protected_blocks", []))
    lines = [
        f"block scores ({report['criterion']}, lower = less important; R removed, P protected)"
    ]
    for block, (score, scale) in enumerate(zip(scores, _scaled(scores), strict=True)):
        mark = "R" if block in removed else "P" if block in protected else " "
        bar = _BAR * max(1, round(scale * width)) if score is not None else ""
        value = "n/a" if score is None else f"{score:.4g}"
        lines.append(f"{block:>4} {mark} {bar:<{width}} {value}")
    return "\n".join(lines)


def block_score_svg(
    report: dict[str, Any], bar_width: int = 22, height: int = 220, *, annotate: bool = False
) -> str:
    """A vertical bar chart: removed blocks red, protected blocks grey, others blue.

    Each bar is ``<rect class="bar removed|protected|kept" data-block="i">``. With
    ``annotate`` (the HTML report) the chart also has an ``id``, a ``viewBox`` so it scales
    with the page, an "R" / "P" mark above each removed / protected bar, "n/a" for blocks
    without a score, and bars over ``CLIP_RATIO`` times the median score clipped (drawn full
    height with a break mark, ``class="bar ... clipped"``).
    """
    scores = report["block_scores"]
    removed, protected = set(report["removed_blocks"]), set(report.get("protected_blocks", []))
    margin, gap = 40, 6
    top = 44 if annotate else 30  # room for the marks above the tallest bar
    width = margin * 2 + len(scores) * (bar_width + gap)
    total_height = height + 70 + (top - 30)
    extra = (
        f' id="block-scores" viewBox="0 0 {width} {total_height}" preserveAspectRatio="xMinYMin meet"'
        if annotate
        else ""
    )
    cap = _clip_cap(scores) if annotate else None
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_height}" role="img" '
        f'aria-label="block scores ({escape(report["criterion"])})" font-family="sans-serif" font-size="11"{extra}>',
        f'<text x="{margin}" y="16" font-size="13">Block scores: {escape(report["criterion"])} '
        f"(lower = less important{', tallest bars clipped' if cap is not None else ''})</text>",
    ]
    scaled = _scaled(
        scores if cap is None else [None if v is None else min(v, cap) for v in scores]
    )
    for block, (score, scale) in enumerate(zip(scores, scaled, strict=True)):
        x = margin + block * (bar_width + gap)
        bar = scale * height
        kind = "removed" if block in removed else "protected" if block in protected else "kept"
        color = {"removed": "#d62728", "protected": "#9e9e9e", "kept": "#1f77b4"}[kind]
        label = "n/a" if score is None else f"{score:.4g}"
        clipped = cap is not None and score is not None and score > cap
        parts.append(
            f'<rect class="bar {kind}{" clipped" if clipped else ""}" data-block="{block}" x="{x}" y="{top + height - bar:.1f}" '
            f'width="{bar_width}" height="{bar:.1f}" fill="{color}"><title>block {block}: {label} ({kind})</title></rect>'
        )
        if clipped:  # a white zigzag across the bar: the axis is broken there
            y = top + 14
            zigzag = " ".join(
                f"{x + i * bar_width / 4:.1f},{y + (3 if i % 2 else -3)}" for i in range(5)
            )
            parts.append(
                f'<polyline class="break" points="{zigzag}" fill="none" stroke="#fff" stroke-width="3"/>'
            )
        if annotate and score is None:  # not scored (protected blocks, by default)
            parts.append(
                f'<text class="na" x="{x + bar_width / 2}" y="{top + height - 4}" '
                f'text-anchor="middle" font-size="9" fill="#777">n/a</text>'
            )
        if annotate and kind != "kept":
            parts.append(
                f'<text class="mark {kind}" data-block="{block}" x="{x + bar_width / 2}" '
                f'y="{top + height - bar - 4:.1f}" text-anchor="middle" font-weight="bold" '
                f'fill="{color}">{"R" if kind == "removed" else "P"}</text>'
            )
        parts.append(
            f'<text x="{x + bar_width / 2}" y="{top + height + 15}" text-anchor="middle">{block}</text>'
        )
    legend_y = top + height + 32
    legend = (("removed", "#d62728"), ("protected", "#9e9e9e"), ("kept", "#1f77b4"))
    for i, (name, color) in enumerate(legend):
        parts.append(
            f'<rect x="{margin + i * 90}" y="{legend_y - 9}" width="10" height="10" fill="{color}"/>'
        )
        text = f"{name} ({name[0].upper()})" if annotate and name != "kept" else name
        parts.append(f'<text x="{margin + i * 90 + 14}" y="{legend_y}">{text}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
