"""Pictures of block scores: a text bar chart for terminals and an SVG for files and pages."""

from __future__ import annotations

import math
import statistics
from html import escape
from typing import Any

_BAR = "█"


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
    """One line per block: index, bar, score, and R (removed) / P (protected) marks. Bars
    start at the axis bottom the header names (as in the SVG chart), so close scores do not
    look many times apart."""
    scores = report["block_scores"]
    removed, protected = set(report["removed_blocks"]), set(report.get("protected_blocks", []))
    values = [s for s in scores if s is not None]
    bottom, top, ticks = value_axis(values) if values else (0.0, 1.0, [0.0, 1.0])
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step)) + 1) if step < 10 else 0
    lines = [
        f"block scores ({report['criterion']}, lower = less important; R removed, P protected; "
        f"bars from {_tick_label(bottom, step)} to {_tick_label(top, step)})"
    ]
    for block, score in enumerate(scores):
        mark = "R" if block in removed else "P" if block in protected else " "
        if score is None:
            bar, value = "", "n/a"
        else:
            fraction = (score - bottom) / (top - bottom)
            bar = _BAR * max(1, round(fraction * width))
            value = f"{score:,.{decimals}f}" if abs(score) < 1e6 else f"{score:.4g}"
        lines.append(f"{block:>4} {mark} {bar:<{width}} {value}")
    return "\n".join(lines)


def _nice_step(span: float, ticks: int = 5) -> float:
    """A 1, 2 or 5 times a power of ten step that cuts ``span`` into about ``ticks`` parts."""
    raw = span / max(1, ticks - 1)
    power = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5, 10):
        if multiple * power >= raw:
            return multiple * power
    return 10 * power


def value_axis(values: list[float]) -> tuple[float, float, list[float]]:
    """Bottom, top and tick values of a labelled axis for ``values``.

    The axis starts at zero unless the values sit in a narrow band far from it (block
    perplexities of 19.10 and 19.57): there it starts just below the smallest value, and the
    tick labels say so, so a 2 % difference is visible without reading as a 10x one.
    """
    low, high = min(values), max(values)
    if high == low:
        high, low = high + (abs(high) or 1.0) * 0.5, low - (abs(low) or 1.0) * 0.5
    if low >= 0 and low <= 0.5 * high:
        low = 0.0
    step = _nice_step(high - low)
    bottom = math.floor(low / step) * step
    if bottom == low and bottom != 0:  # keep the smallest bar visible
        bottom -= step
    top = math.ceil(high / step) * step
    count = round((top - bottom) / step)
    return bottom, top, [bottom + i * step for i in range(count + 1)]


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:,.{decimals}f}" if abs(value) < 1e6 else f"{value:.3g}"


def block_score_svg(
    report: dict[str, Any], bar_width: int = 22, height: int = 220, *, annotate: bool = False
) -> str:
    """A vertical bar chart on a labelled value axis: removed blocks red, protected blocks
    grey, others blue, an "R" / "P" mark above each removed / protected bar.

    Each bar is ``<rect class="bar removed|protected|kept" data-block="i">``; a block without
    a score (protected blocks are not scored by default) is a short stub with class
    ``unscored`` and its mark, or "n/a" when it is not protected. Bars over ``CLIP_RATIO``
    times the median score are clipped (drawn to the top with a break mark, ``class="bar ...
    clipped"``) so one critical block does not flatten the rest. With ``annotate`` (the HTML
    report) the chart also has an ``id`` and a ``viewBox`` so it scales with the page.
    """
    scores = report["block_scores"]
    removed, protected = set(report["removed_blocks"]), set(report.get("protected_blocks", []))
    criterion = escape(report["criterion"])
    left, right, gap, stub = 64, 16, 6, 4
    top = 44  # room for the title and the marks above the tallest bar
    # Wide enough for the title and the legend however few blocks there are.
    width = max(left + right + len(scores) * (bar_width + gap), 460)
    total_height = top + height + 56
    extra = (
        f' id="block-scores" viewBox="0 0 {width} {total_height}" preserveAspectRatio="xMinYMin meet"'
        if annotate
        else ""
    )
    cap = _clip_cap(scores)
    shown = [None if v is None else (v if cap is None else min(v, cap)) for v in scores]
    values = [v for v in shown if v is not None]
    bottom, axis_top, ticks = value_axis(values) if values else (0.0, 1.0, [0.0, 1.0])

    def y_of(value: float) -> float:
        return top + height - height * (value - bottom) / (axis_top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_height}" role="img" '
        f'aria-label="block scores ({criterion})" font-family="sans-serif" font-size="11"{extra}>',
        f'<text x="{left}" y="16" font-size="13">Block scores: {criterion} '
        f"(lower = less important{', tallest bars clipped' if cap is not None else ''})</text>",
    ]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    parts.append(f'<g class="axis" data-bottom="{bottom:g}" data-top="{axis_top:g}">')
    for tick in ticks:
        y = y_of(tick)
        parts.append(
            f'<line x1="{left - 4}" x2="{left + len(scores) * (bar_width + gap)}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#e3e3e3"/><text class="tick" x="{left - 7}" y="{y + 4:.1f}" '
            f'text-anchor="end">{_tick_label(tick, step)}</text>'
        )
    parts.append(
        f'<line x1="{left - 4}" x2="{left - 4}" y1="{top}" y2="{top + height}" stroke="#555"/>'
        f'<text class="axis-label" transform="translate(14 {top + height / 2}) rotate(-90)" '
        f'text-anchor="middle">score ({criterion})</text></g>'
    )
    for block, (score, value) in enumerate(zip(scores, shown, strict=True)):
        x = left + block * (bar_width + gap)
        kind = "removed" if block in removed else "protected" if block in protected else "kept"
        color = {"removed": "#d62728", "protected": "#9e9e9e", "kept": "#1f77b4"}[kind]
        bar = stub if value is None else max(1.0, top + height - y_of(value))
        classes = [kind]
        if score is None:
            classes.append("unscored")
        clipped = cap is not None and score is not None and score > cap
        if clipped:
            classes.append("clipped")
        label = "not scored" if score is None else f"{score:.6g}"
        opacity = ' fill-opacity="0.5"' if score is None else ""
        parts.append(
            f'<rect class="bar {" ".join(classes)}" data-block="{block}" x="{x}" '
            f'y="{top + height - bar:.1f}" width="{bar_width}" height="{bar:.1f}" fill="{color}"'
            f"{opacity}>"
            f"<title>block {block}: {label} ({kind})</title></rect>"
        )
        if clipped:  # a white zigzag across the bar: the axis is broken there
            y = top + 14
            zigzag = " ".join(
                f"{x + i * bar_width / 4:.1f},{y + (3 if i % 2 else -3)}" for i in range(5)
            )
            parts.append(
                f'<polyline class="break" points="{zigzag}" fill="none" stroke="#fff" stroke-width="3"/>'
            )
        mark_y = top + height - bar - 4
        if kind != "kept":
            parts.append(
                f'<text class="mark {kind}" data-block="{block}" x="{x + bar_width / 2}" '
                f'y="{mark_y:.1f}" text-anchor="middle" font-weight="bold" '
                f'fill="{color}">{"R" if kind == "removed" else "P"}</text>'
            )
        elif score is None:
            parts.append(
                f'<text class="na" x="{x + bar_width / 2}" y="{mark_y:.1f}" '
                f'text-anchor="middle" font-size="9" fill="#777">n/a</text>'
            )
        parts.append(
            f'<text x="{x + bar_width / 2}" y="{top + height + 15}" text-anchor="middle">{block}</text>'
        )
    legend_y = top + height + 36
    legend = (("removed (R)", "#d62728"), ("protected (P)", "#9e9e9e"), ("kept", "#1f77b4"))
    for i, (name, color) in enumerate(legend):
        parts.append(
            f'<rect x="{left + i * 110}" y="{legend_y - 9}" width="10" height="10" fill="{color}"/>'
            f'<text x="{left + i * 110 + 14}" y="{legend_y}">{name}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def markdown_cell(value: Any) -> str:
    """A value as a GitHub-flavoured Markdown table cell."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value).replace("|", "\\|")


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """The lines of a Markdown table of ``rows`` (dicts), one column per name."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(markdown_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


RANKING_COLUMNS = [
    "rank",
    "criteria",
    "num_blocks",
    "removed_blocks",
    "params_after",
    "params_removed_ratio",
    "estimated_speedup",
    "validation_ppl",
]


def ranking_markdown(search: dict[str, Any]) -> str:
    """A search report's ranking (report.json ``search``) as a Markdown table, best first."""
    return "\n".join(markdown_table(RANKING_COLUMNS, search["ranking"])) + "\n"


# An export's artifacts, one row each: (key, heading). The CLI prints them aligned, the report
# page renders them as its table.
EXPORT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "artifact"),
    ("size", "MiB"),
    ("ppl", "ppl"),
    ("ppl_unquantized", "unquantized"),
    ("ppl_parent", "parent"),
    ("tokens_per_s", "tokens/s"),
    ("speedup", "speed-up"),
    ("verified_by", "runtime"),
    ("vllm", "vLLM tokens/s, batch 1 / 16 (speed-up)"),
)


def _fixed(value: Any, digits: int) -> str:
    return (
        "-"
        if not isinstance(value, int | float) or isinstance(value, bool)
        else f"{value:.{digits}f}"
    )


def export_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """An export's artifacts: size, perplexity beside the unquantized model's and the
    parent's, generation tokens/s and the speed-up over the parent in the same runtime."""
    rows = []
    for entry in report.get("targets") or []:
        size = sum(f.get("bytes", 0) for f in entry.get("files") or []) / 2**20
        rows.append(
            {
                "name": str(entry.get("name", "")),
                "size": f"{size:.1f}",
                "ppl": _fixed(entry.get("ppl"), 2),
                "ppl_unquantized": _fixed(entry.get("ppl_unquantized"), 2),
                "ppl_parent": _fixed(entry.get("ppl_parent"), 2),
                "tokens_per_s": _fixed(entry.get("tokens_per_s"), 1),
                "speedup": _fixed(entry.get("speedup"), 2),
                "verified_by": str(entry.get("verified_by", "")),
                "vllm": _vllm_cell(entry.get("vllm")),
            }
        )
    return rows


def _vllm_cell(check: Any) -> str:
    """An HF-quantized artifact in vLLM: tokens/s at batch 1 and batched, the batch-1
    speed-up over the parent; or why it was not run ("-": not a vLLM format)."""
    if not isinstance(check, dict):
        return "-"
    if "skipped" in check:
        return f"not run: {check['skipped']}"
    if not check.get("loads"):
        return "does not load"
    rates = check.get("tokens_per_s") or {}
    cell = " / ".join(_fixed(rates.get(batch), 1) for batch in sorted(rates, key=int))
    speedup = (check.get("speedup") or {}).get("1")
    return cell + (f" ({speedup:.2f}x)" if isinstance(speedup, int | float) else "")
