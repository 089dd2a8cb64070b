"""Tail-aware ``latency-based-routing``: members ranked by a recent p90 of time to first token.

LiteLLM ranks by the mean of the last 10 latencies. A member that answers in 50 ms four
times out of five and in 2 s the fifth has a mean of 0.44 s and wins against a steady
0.5 s member, so one request in five waits 2 s: the mean hides exactly the tail a user
feels. Here each member keeps its time-to-first-token samples of the last
:data:`WINDOW_S` seconds (at most :data:`MAX_SAMPLES`), each weighted by its age (the
weight halves every :data:`HALF_LIFE_S`), and is ranked by the weighted 90th percentile.
A member without samples is tried first (as LiteLLM does); a member whose newest sample
is older than :data:`STALE_AFTER_S` gets a :data:`PROBE_SHARE` of the traffic, so a member
that has recovered is noticed without sending it a fair share first. Time is the
router's clock, so tests move it.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

WINDOW_S = 300.0
MAX_SAMPLES = 200
HALF_LIFE_S = 60.0
STALE_AFTER_S = 60.0
PERCENTILE = 0.9
PROBE_SHARE = 0.05

T = TypeVar("T")


class TtftWindow:
    """One member's recent times to first token, as (clock reading, seconds)."""

    __slots__ = ("_samples",)

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)

    def add(self, now: float, ttft_s: float) -> None:
        self._samples.append((now, max(0.0, ttft_s)))

    def _recent(self, now: float) -> deque[tuple[float, float]]:
        while self._samples and self._samples[0][0] < now - WINDOW_S:
            self._samples.popleft()
        return self._samples

    def percentile(self, now: float, q: float = PERCENTILE) -> float | None:
        """The age-weighted ``q`` quantile of the window; None without samples."""
        samples = self._recent(now)
        if not samples:
            return None
        weighted = sorted((value, 0.5 ** (max(0.0, now - at) / HALF_LIFE_S)) for at, value in samples)
        total = sum(w for _, w in weighted)
        running = 0.0
        for value, weight in weighted:
            running += weight
            if running >= q * total - 1e-12:
                return value
        return weighted[-1][0]

    def stale(self, now: float) -> bool:
        samples = self._recent(now)
        return not samples or now - samples[-1][0] > STALE_AFTER_S


def fastest_tail(room: Sequence[T], window: Callable[[T], TtftWindow], now: float, rng: random.Random) -> T:
    """The member to use: an untried one, else (rarely) a stale one as a probe, else the
    lowest p90 (ties at random)."""
    tails = [window(d).percentile(now) for d in room]
    untried = [d for d, tail in zip(room, tails, strict=True) if tail is None]
    if untried:
        return rng.choice(untried)
    stale = [d for d in room if window(d).stale(now)]
    if stale and len(stale) < len(room) and rng.random() < PROBE_SHARE:
        return rng.choice(stale)
    best = min(t for t in tails if t is not None)
    return rng.choice([d for d, tail in zip(room, tails, strict=True) if tail == best])
