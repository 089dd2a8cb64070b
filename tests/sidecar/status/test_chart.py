"""The server-drawn spend chart: bar heights proportional to spend, stacked per day, on an
axis with a round top and plain-decimal labels; names escaped."""

from __future__ import annotations

import re

import pytest

from exo_remote_engine.sidecar.status.chart import BOTTOM, HEIGHT, TOP, axis_usd, nice_ceiling, spend_chart


@pytest.mark.parametrize(
    ("value", "top"), [(0.0, 1.0), (0.000152, 0.0002), (0.3, 0.5), (1.0, 1.0), (7.0, 10.0), (12.0, 20.0)]
)
def test_axis_top_is_round_and_above(value: float, top: float) -> None:
    assert nice_ceiling(value) == pytest.approx(top)


def test_axis_labels_are_plain_decimals() -> None:
    assert [axis_usd(v) for v in (0, 0.00005, 1.5, 20)] == ["$0", "$0.00005", "$1.5", "$20"]


def test_bars_are_stacked_and_proportional() -> None:
    days = ["2026-01-01", "2026-01-02"]
    svg = spend_chart(days, {"b<x>": [0.0, 1.0], "a": [2.0, 1.0]})
    heights = {
        title: float(h) for h, title in re.findall(r'height="([\d.]+)" fill="[^"]+"><title>([^<]+)</title>', svg)
    }
    plot_h = HEIGHT - TOP - BOTTOM  # the axis top is $2: a $2 bar fills the plot, $1 half of it
    assert heights["a 2026-01-01: $2.000000"] == pytest.approx(plot_h, abs=0.1)
    assert heights["a 2026-01-02: $1.000000"] == pytest.approx(plot_h / 2, abs=0.1)
    assert heights["b&lt;x&gt; 2026-01-02: $1.000000"] == pytest.approx(plot_h / 2, abs=0.1)
    assert len(heights) == 3  # a day without spend draws no bar
    assert "<x>" not in svg
