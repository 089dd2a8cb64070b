"""The last hour of requests, for the status page: what Prometheus counters cannot say
without a Prometheus (counters only grow; "in the last hour" needs their history).

Per node and per model, outcomes are counted in one-minute buckets and buckets older than
an hour are dropped when the key is next touched or read, so memory is bounded by keys x
outcomes x 60. Time to first token is kept as the last :data:`TTFT_SAMPLES` values per model and
deployment, from which the page computes exact percentiles of recent requests.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable

HOUR_S = 3600.0
_BUCKET_S = 60.0
TTFT_SAMPLES = 200
OK = "OK"


class HourTally:
    """Counts per key (a node, a model) and outcome (``OK`` or an error reason) over the last hour."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._buckets: dict[str, deque[tuple[int, Counter[str]]]] = {}

    def _prune(self, key: str, now: float) -> deque[tuple[int, Counter[str]]]:
        buckets = self._buckets.setdefault(key, deque())
        oldest = int((now - HOUR_S) // _BUCKET_S)
        while buckets and buckets[0][0] <= oldest:
            buckets.popleft()
        return buckets

    def add(self, key: str, outcome: str) -> None:
        now = self.clock()
        buckets = self._prune(key, now)
        minute = int(now // _BUCKET_S)
        if not buckets or buckets[-1][0] != minute:
            buckets.append((minute, Counter()))
        buckets[-1][1][outcome] += 1

    def last_hour(self) -> dict[str, dict[str, int]]:
        """Key -> outcome -> count in the last hour (keys with none are left out)."""
        now = self.clock()
        found: dict[str, dict[str, int]] = {}
        for key in list(self._buckets):
            total: Counter[str] = Counter()
            for _, counts in self._prune(key, now):
                total.update(counts)
            if total:
                found[key] = dict(total)
        return found


class RecentOutcomes:
    """The last hour per node and per model, and recent times to first token."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.nodes = HourTally(clock)
        self.models = HourTally(clock)
        self._ttft: dict[tuple[str, str], deque[float]] = {}

    def add(self, node: str, outcome: str, model: str | None = None) -> None:
        self.nodes.add(node, outcome)
        if model is not None:
            self.models.add(model, outcome)

    def last_hour(self) -> dict[str, dict[str, int]]:
        """Node -> outcome -> count in the last hour."""
        return self.nodes.last_hour()

    def first_token(self, model: str, deployment: str, seconds: float) -> None:
        key = (model, deployment)
        samples = self._ttft.get(key)
        if samples is None:
            samples = self._ttft[key] = deque(maxlen=TTFT_SAMPLES)
        samples.append(seconds)

    def ttft_samples(self) -> dict[tuple[str, str], list[float]]:
        """(model, deployment) -> its recent times to first token, oldest first."""
        return {key: list(samples) for key, samples in self._ttft.items()}


def percentile(samples: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile (``fraction`` 0.5 is the median); None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, -(-round(fraction * 1000) * len(ordered) // 1000))
    return ordered[min(rank, len(ordered)) - 1]
