"""Spend per node per day as an SVG drawn here, on the server: stacked bars, one colour per
node, a legend and a labelled axis. No script and no charting library, so the page works
offline and shows the same picture in any browser (and in a screenshot)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 16, 40
PALETTE = ("#3b82f6", "#f97316", "#10b981", "#a855f7", "#ef4444", "#eab308", "#06b6d4", "#ec4899", "#64748b")


def nice_ceiling(value: float) -> float:
    """The axis top: 1, 2 or 5 times a power of ten, at or above ``value``."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value * (1 - 1e-12))


def axis_usd(value: float) -> str:
    """A tick label in plain decimals ($0.00005, never $5e-05)."""
    return "$" + (f"{value:.8f}".rstrip("0").rstrip(".") or "0")


def spend_chart(days: Sequence[str], series: Mapping[str, Sequence[float]]) -> str:
    """``series``: node -> USD per day (aligned with ``days``). Returns an ``<svg>`` element."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    totals = [sum(values[i] for values in series.values()) for i in range(len(days))]
    top = nice_ceiling(max(totals, default=0.0))
    slot = plot_w / max(1, len(days))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}"'
        ' role="img" aria-label="spend per node per day, last 30 days" id="spend-chart">'
    ]
    for tick in range(5):
        value = top * tick / 4
        y = TOP + plot_h - plot_h * tick / 4
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        parts.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#374151">'
            f"{axis_usd(value)}</text>"
        )
    for index, day in enumerate(days):
        x = LEFT + slot * index
        base = float(TOP + plot_h)
        for colour, (node, values) in zip(_colours(len(series)), sorted(series.items()), strict=True):
            height = plot_h * values[index] / top if top else 0.0
            if height <= 0:
                continue
            base -= height
            parts.append(
                f'<rect x="{x + 1:.1f}" y="{base:.1f}" width="{max(1.0, slot - 2):.1f}" height="{height:.1f}"'
                f' fill="{colour}"><title>{escape(node)} {escape(day)}: ${values[index]:.6f}</title></rect>'
            )
        if index % 5 == 0 or index == len(days) - 1:
            parts.append(
                f'<text x="{x + slot / 2:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" font-size="10"'
                f' fill="#374151">{escape(day[5:])}</text>'
            )
    parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{TOP + plot_h}" y2="{TOP + plot_h}" stroke="#9ca3af"/>')
    for row, (colour, node) in enumerate(zip(_colours(len(series)), sorted(series), strict=True)):
        y = TOP + 14 * row
        parts.append(f'<rect x="{WIDTH - RIGHT + 12}" y="{y}" width="10" height="10" fill="{colour}"/>')
        parts.append(
            f'<text x="{WIDTH - RIGHT + 26}" y="{y + 9}" font-size="11" fill="#111827">{escape(node[:20])}</text>'
        )
    if not series:
        parts.append(
            f'<text x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" text-anchor="middle" font-size="13"'
            ' fill="#6b7280">no spend recorded in the last 30 days</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _colours(count: int) -> list[str]:
    return [PALETTE[i % len(PALETTE)] for i in range(count)]
