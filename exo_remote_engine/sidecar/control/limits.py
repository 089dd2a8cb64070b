"""Requests and tokens per minute, counted in fixed one-minute windows.

LiteLLM's Router counts a deployment's ``rpm``/``tpm`` per calendar minute (its usage keys
carry the current minute), so a limit of 3 rpm admits exactly 3 requests between
12:00:00 and 12:00:59 and 3 more from 12:01:00. The same windows hold the sidecar's node
limits (``exo_remote_settings.nodes.<name>.rpm/tpm``). A request counts when it is
admitted; tokens count when the provider reports them (or, for a stream cut short, when
they are estimated), so a tpm limit stops the request after the one that crossed it.
Over a limit, the caller is told when the window ends: that Retry-After is true, because
the counts reset then. Time comes from an injectable clock, so tests control it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from exo_remote_engine.contract.errors import Reason, RemoteError

Clock = Callable[[], float]  # seconds since the epoch, like time.time
WINDOW_S = 60.0


@dataclass
class _Window:
    minute: int
    requests: int = 0
    tokens: int = 0


class UsageWindows:
    """Per-key request and token counts of the current minute (keys: ``node:<name>``,
    ``deployment:<name>``). Old minutes are dropped lazily when a key is next touched."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def _current(self, key: str) -> _Window:
        minute = int(self.clock() // WINDOW_S)
        window = self._windows.get(key)
        if window is None or window.minute != minute:
            window = self._windows[key] = _Window(minute)
        return window

    def requests(self, key: str) -> int:
        return self._current(key).requests

    def tokens(self, key: str) -> int:
        return self._current(key).tokens

    def counts(self, keys: list[str]) -> dict[str, tuple[int, int]]:
        """Requests and tokens of the current minute per key, each window read once (the
        shape of :meth:`RedisWindows.counts <.shared_windows.RedisWindows.counts>`)."""
        found = {}
        for key in keys:
            window = self._current(key)
            found[key] = (window.requests, window.tokens)
        return found

    def add_request(self, key: str) -> None:
        self._current(key).requests += 1

    def add_tokens(self, key: str, tokens: int) -> None:
        if tokens > 0:
            self._current(key).tokens += tokens

    def has_room(self, key: str, rpm: int | None, tpm: int | None) -> bool:
        """True when one more request fits under ``rpm`` and the minute's tokens are under ``tpm``."""
        window = self._current(key)
        return has_room(window.requests, window.tokens, rpm, tpm)

    def retry_after_s(self) -> float:
        """Seconds until the current window ends (when every count resets)."""
        now = self.clock()
        return (int(now // WINDOW_S) + 1) * WINDOW_S - now

    def admit(self, key: str, rpm: int | None, tpm: int | None, what: str) -> None:
        """Count one request under ``key``, or raise RATE_LIMITED naming ``what``'s limit."""
        window = self._current(key)
        if rpm is not None and window.requests >= rpm:
            raise rate_limited(f"{what} is at its limit of {rpm} requests per minute", self.retry_after_s(), "rpm")
        if tpm is not None and window.tokens >= tpm:
            raise rate_limited(
                f"{what} used {window.tokens} of its {tpm} tokens per minute", self.retry_after_s(), "tpm"
            )
        window.requests += 1


def has_room(requests: int, tokens: int, rpm: int | None, tpm: int | None) -> bool:
    """Whether a minute with these counts admits one more request (the rule of every window,
    in this process's memory or read from Redis)."""
    return (rpm is None or requests < rpm) and (tpm is None or tokens < tpm)


def rate_limited(message: str, retry_after_s: float, limit: str) -> RemoteError:
    return RemoteError(Reason.RATE_LIMITED, message, retry_after_s=retry_after_s, metadata={"limit": limit})
