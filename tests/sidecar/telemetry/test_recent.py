"""The last hour's tally on a controlled clock: outcomes older than an hour drop out, and
percentiles are exact (nearest rank) over the kept samples."""

from __future__ import annotations

from exo_remote_engine.sidecar.telemetry.recent import TTFT_SAMPLES, RecentOutcomes, percentile
from tests.support.traffic import FakeClock


def test_outcomes_leave_after_an_hour() -> None:
    clock = FakeClock(1_800_000_000.0)
    recent = RecentOutcomes(clock)
    recent.add("a", "OK")
    clock.now += 1800
    recent.add("a", "RATE_LIMITED")
    recent.add("b", "OK")
    assert recent.last_hour() == {"a": {"OK": 1, "RATE_LIMITED": 1}, "b": {"OK": 1}}
    clock.now += 1801  # the first outcome is now more than an hour old
    assert recent.last_hour() == {"a": {"RATE_LIMITED": 1}, "b": {"OK": 1}}
    clock.now += 3600
    assert recent.last_hour() == {}


def test_percentiles_are_nearest_rank_over_recent_samples() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    values = [float(v) for v in range(1, 11)]
    assert (percentile(values, 0.5), percentile(values, 0.9)) == (5.0, 9.0)
    recent = RecentOutcomes()
    for value in range(TTFT_SAMPLES + 50):
        recent.first_token("m", "m#1", float(value))
    kept = recent.ttft_samples()[("m", "m#1")]
    assert len(kept) == TTFT_SAMPLES and kept[0] == 50.0  # the oldest dropped first
