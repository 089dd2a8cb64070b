"""Wait for the event itself, with a bounded timeout: the one way tests synchronise.

A sleep that stands in for an event is too short on a loaded box and too long on an idle
one; a bound of 1 s on something that takes milliseconds flakes under load. These wait for
the condition, polling briefly, and fail with what was awaited after a wide timeout, so a
hang fails the test instead of stalling the run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# How long a test waits for something that normally takes milliseconds: wide enough for a
# two-core box running the suite beside other work, short of any timeout being tested.
EVENT_TIMEOUT_S = 15.0


async def eventually(
    check: Callable[[], T | Awaitable[T]], what: str, timeout_s: float = EVENT_TIMEOUT_S, poll_s: float = 0.01
) -> T:
    """The first truthy value of ``check()`` (sync or async); AssertionError naming ``what``
    after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g}s (last: {value!r})")
        await asyncio.sleep(poll_s)


def eventually_sync(check: Callable[[], T], what: str, timeout_s: float = EVENT_TIMEOUT_S, poll_s: float = 0.01) -> T:
    """:func:`eventually` for sync code."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g}s (last: {value!r})")
        time.sleep(poll_s)
