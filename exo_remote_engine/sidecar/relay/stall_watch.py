"""Ends a stream whose client reads nothing.

While a write to the client waits, the provider is not read (the merge buffer in
:mod:`~exo_remote_engine.sidecar.transports.stream_types` is bounded), so a client that stops reading
would hold a stream slot and an upstream connection forever. A write still pending after
``limit_s`` cancels the stream's task; the servicer then ends it with CLIENT_STALLED.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from exo_remote_engine.generated import remote_inference_pb2 as pb

Write = Callable[[pb.GenerateResponse], Awaitable[None]]


class StallWatch:
    """One timer per stream, re-armed, because a timeout around every write costs about
    4 us each. Use as a context manager around the stream; write through :meth:`timed`."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.loop = asyncio.get_running_loop()
        self.writing_since: float | None = None  # loop time the pending write began
        self.fired = False
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> StallWatch:
        self._task = asyncio.current_task()
        self._timer = self.loop.call_later(self.limit_s, self._check)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def timed(self, write: Write) -> Write:
        """``write``, with each call watched: a client that reads nothing is ended later."""

        async def send(response: pb.GenerateResponse) -> None:
            self.writing_since = self.loop.time()
            await write(response)
            self.writing_since = None

        return send

    def uncancel(self) -> None:
        if self._task is not None:
            self._task.uncancel()

    def _check(self) -> None:
        since, now = self.writing_since, self.loop.time()
        if since is not None and now - since >= self.limit_s and self._task is not None:
            self.fired = True
            self._task.cancel()
            return
        self._timer = self.loop.call_at((now if since is None else since) + self.limit_s, self._check)
