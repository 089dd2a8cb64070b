"""A clock that moves only when a test says so, for code that takes ``clock=`` (time.time or
time.monotonic in production): windows, TTLs, grace periods, queue waits, without sleeping."""

from __future__ import annotations

import asyncio

# A wall-clock reading on a minute boundary (the rpm/tpm windows count whole minutes).
MINUTE_START = 1_800_000_000.0 - (1_800_000_000.0 % 60)


class FakeClock:
    """Wall-clock seconds that move only when a test sets or advances ``now``. ``sleep``
    waits on this clock (the sidecar's queue uses it when its clock has one): setting
    ``now`` wakes every sleeper whose time has come."""

    def __init__(self, now: float = MINUTE_START + 10) -> None:
        self._now = now
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        return self._now

    @now.setter
    def now(self, value: float) -> None:
        self._now = value
        for at, future in list(self._sleepers):
            if at <= value and not future.done():
                future.set_result(None)

    @property
    def sleepers(self) -> int:
        """Sleeps not yet over (a test waits for a queue's waiters to be asleep)."""
        return sum(1 for _, future in self._sleepers if not future.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self._now + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)
