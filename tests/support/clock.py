"""A clock that moves only when a test says so, for code that takes ``clock=`` (time.time or
time.monotonic in production): windows, TTLs, grace periods, without sleeping."""

from __future__ import annotations

# A wall-clock reading on a minute boundary (the rpm/tpm windows count whole minutes).
MINUTE_START = 1_800_000_000.0 - (1_800_000_000.0 % 60)


class FakeClock:
    """Seconds that move only when the test sets or advances ``now``."""

    def __init__(self, now: float = MINUTE_START + 10) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
