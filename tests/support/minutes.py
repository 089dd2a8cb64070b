"""The rpm/tpm windows of sidecar processes, which count calendar minutes of the real clock
(``limits.WINDOW_S``, keyed ``minute_key(key, int(now // WINDOW_S), ...)`` in Redis).

A burst on a loaded box may take long enough to cross a window's end, so a test that
counts admissions either checks what must hold in *whichever* windows its calls landed in
(:func:`assert_shared_limit`, read from the shared counts in Redis), or, where the counts
cannot be read (a host's own windows during a Redis outage), runs its attempt again in a
fresh window when one crossed (:func:`in_one_window`). Neither waits on luck, and neither
loosens the limit being checked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, TypeVar

import redis

from exo_remote_engine.contract.errors import RemoteError
from exo_remote_engine.sidecar.control.limits import WINDOW_S
from exo_remote_engine.sidecar.control.shared_windows import minute_key

T = TypeVar("T")


class Timed(Protocol):
    """A call as the test saw it: when it started and ended (the host's clock is this
    machine's), and its error if refused."""

    started: float
    ended: float
    error: RemoteError | None


def window_of(t: float) -> int:
    """The window a sidecar on this machine counts a request made at ``t`` in."""
    return int(t // WINDOW_S)


def windows_of(calls: Iterable[Timed]) -> list[int]:
    """Every window from the first call's start to the last call's end."""
    spans = [(c.started, c.ended) for c in calls]
    return list(range(window_of(min(s for s, _ in spans)), window_of(max(e for _, e in spans)) + 1))


async def until_room_in_window(room_s: float) -> None:
    """Wait (less than one window) until the current window has ``room_s`` seconds left."""
    into = time.time() % WINDOW_S
    if into > WINDOW_S - room_s:
        await asyncio.sleep(WINDOW_S - into + 0.2)


async def in_one_window(attempt: Callable[[], Awaitable[T]], room_s: float, tries: int = 3) -> T:
    """``attempt()``'s result from a run that began and ended in one window. Each run starts
    with ``room_s`` seconds left in a window none of the earlier runs touched, so its counts
    start from zero; after ``tries`` runs that all crossed a window's end, AssertionError."""
    for _ in range(tries):
        await until_room_in_window(room_s)
        began = window_of(time.time())
        result = await attempt()
        ended = window_of(time.time())
        if ended == began:
            return result
        await asyncio.sleep(max(0.0, (ended + 1) * WINDOW_S - time.time() + 0.2))  # a fresh window
    raise AssertionError(f"{tries} runs each crossed a {WINDOW_S:g} s window's end: the box is too slow")


def shared_counts(redis_url: str, key: str, windows: Iterable[int], what: str = "requests") -> dict[int, int]:
    """The counts of ``key`` (``node:<name>``, ``deployment:<name>``) in Redis, per window."""
    client = redis.Redis.from_url(redis_url)
    try:
        return {w: int(client.get(minute_key(key, w, what)) or 0) for w in windows}
    finally:
        client.close()


def forget_shared_counts(redis_url: str, key: str) -> None:
    """Drop every window of ``key`` from Redis (a test that shares the session's Redis)."""
    client = redis.Redis.from_url(redis_url)
    try:
        prefix = minute_key(key, 0, "requests").rsplit(":", 2)[0]  # exo-remote:{node:<name>}
        names = list(client.scan_iter(match=f"{prefix}:*"))
        if names:
            client.delete(*names)
    finally:
        client.close()


def assert_shared_limit(calls: Iterable[Timed], counts: dict[int, int], limit: int) -> None:
    """What a limit shared by every host means, in whichever windows ``calls`` landed
    (``counts``: the shared counts of :func:`windows_of` the calls): no window admitted more
    than ``limit``; every admitted call, and nothing else, was counted; a call was refused
    only in a window that was full (the windows its start and end allow). The first two
    leave at least ``len(calls) - limit * len(counts)`` refusals for the third to check."""
    calls = list(calls)
    admitted = sum(c.error is None for c in calls)
    refused = [c for c in calls if c.error is not None]
    assert all(n <= limit for n in counts.values()), f"a window admitted over the limit of {limit}: {counts}"
    assert sum(counts.values()) == admitted, f"{admitted} admitted, counted in the shared windows: {counts}"
    for c in refused:
        spanned = range(window_of(c.started), window_of(c.ended) + 1)
        assert any(counts.get(w) == limit for w in spanned), (
            f"refused in a window with room: windows {list(spanned)} of {counts} (limit {limit}): {c.error}"
        )
