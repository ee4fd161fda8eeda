"""Pictures of block scores: a text bar chart for terminals and an SVG for files and pages."""

from __future__ import annotations

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


def block_score_chart(report: dict[str, Any], width: int = 40) -> str:
    """One line per block: index, bar, score, and R (removed) / P (protected) marks."""
    scores = report["block_scores"]
    removed, protected = set(report["removed_blocks"]), set(report.get("protected_blocks", []))
    lines = [f"block scores ({report['criterion']}, lower = less important; R removed, P protected)"]
    for block, (score, scale) in enumerate(zip(scores, _scaled(scores), strict=True)):
        mark = "R" if block in removed else "P" if block in protected else " "
        bar = _BAR * max(1, round(scale * width)) if score is not None else ""
        value = "n/a" if score is None else f"{score:.4g}"
        lines.append(f"{block:>4} {mark} {bar:<{width}} {value}")
    return "\n".join(lines)


def block_score_svg(report: dict[str, Any], bar_width: int = 22, height: int = 220) -> str:
    """A vertical bar chart: removed blocks red, protected blocks grey, others blue."""
    scores = report["block_scores"]
    removed, protected = set(report["removed_blocks"]), set(report.get("protected_blocks", []))
    margin, gap = 40, 6
    width = margin * 2 + len(scores) * (bar_width + gap)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 70}" role="img" '
        f'aria-label="block scores ({escape(report["criterion"])})" font-family="sans-serif" font-size="11">',
        f'<text x="{margin}" y="16" font-size="13">Block scores: {escape(report["criterion"])} '
        "(lower = less important)</text>",
    ]
    for block, (score, scale) in enumerate(zip(scores, _scaled(scores), strict=True)):
        x = margin + block * (bar_width + gap)
        bar = scale * height
        kind = "removed" if block in removed else "protected" if block in protected else "kept"
        color = {"removed": "#d62728", "protected": "#9e9e9e", "kept": "#1f77b4"}[kind]
        label = "n/a" if score is None else f"{score:.4g}"
        parts.append(
            f'<rect class="bar {kind}" data-block="{block}" x="{x}" y="{30 + height - bar:.1f}" '
            f'width="{bar_width}" height="{bar:.1f}" fill="{color}"><title>block {block}: {label} ({kind})</title></rect>'
        )
        parts.append(f'<text x="{x + bar_width / 2}" y="{height + 45}" text-anchor="middle">{block}</text>')
    legend_y = height + 62
    for i, (name, color) in enumerate((("removed", "#d62728"), ("protected", "#9e9e9e"), ("kept", "#1f77b4"))):
        parts.append(f'<rect x="{margin + i * 90}" y="{legend_y - 9}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{margin + i * 90 + 14}" y="{legend_y}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
