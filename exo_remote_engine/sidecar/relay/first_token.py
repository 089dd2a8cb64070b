"""The first-token guard: a deadline on the first delta (``ttft_timeout``) and hedged
attempts (``hedge_after``).

A provider that accepts a request and then says nothing is the failure an error-driven
retry never sees: the stream is open, nothing is wrong yet, and the client waits. With
``ttft_timeout`` an attempt that has produced no delta in time is cancelled (its HTTP
stream closed), counts as that deployment's failure, and the request moves on like after
any retryable error (the next member, then the fallbacks). With ``hedge_after`` a second
attempt starts when the first has been silent that long; the first to produce a delta
wins and the other is cancelled at once. Each attempt reads into its own
:class:`StreamState`; only the winner's deltas are forwarded to the request's state, so
the client sees one stream and never text from two attempts. A cancelled attempt whose
request reached the provider is reported (``on_abandoned``) so its prompt is charged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.config.loader import ModelEntry
from exo_remote_engine.sidecar.transports.stream_types import StreamState, WriteFailed

# One attempt of ``entry`` reading into ``state`` (the backend's transport call).
Attempt = Callable[[ModelEntry, StreamState], Coroutine[Any, Any, None]]


async def first_token_within(
    seconds: float | None, entry: ModelEntry, state: StreamState, produce: Awaitable[None]
) -> None:
    """Await ``produce``; cancel it with PROVIDER_TIMEOUT (retryable) when ``state`` has
    no delta after ``seconds``. After the first delta the deadline is gone."""
    if seconds is None:
        await produce
        return
    try:
        async with asyncio.timeout(seconds) as deadline:
            state.on_first.append(lambda: deadline.reschedule(None))
            await produce
    except TimeoutError:
        if not deadline.expired():
            raise  # the transport's own timeout: classified as usual
        raise RemoteError(
            Reason.PROVIDER_TIMEOUT,
            f"deployment {entry.deployment_name!r} of model {entry.alias!r} sent no first token within {seconds:g}s",
            retry_after_s=0.0,
        ) from None


class _Run:
    """One attempt of a hedged request: its own state, forwarded only if it wins."""

    def __init__(self, race: _Race, entry: ModelEntry, attempt: Attempt) -> None:
        self.race = race
        self.entry = entry
        self.state = StreamState(self._forward)
        self.task: asyncio.Task[None] = asyncio.create_task(attempt(entry, self.state))

    async def _forward(self, response: pb.GenerateResponse) -> None:
        self.race.claim(self)
        parent = self.race.parent
        delta = response.delta
        if delta.text:
            parent.buffer.add_text(delta.text)
        if delta.reasoning_text:
            parent.buffer.add_reasoning(delta.reasoning_text)
        for call in delta.tool_calls:
            parent.buffer.add_tool(call.index, call.id, call.name, call.arguments_fragment)
        try:
            await parent.flush()
        except WriteFailed as exc:  # the client's write failed: re-raised as it was
            assert exc.__cause__ is not None
            raise exc.__cause__ from None


class _Race:
    def __init__(self, parent: StreamState) -> None:
        self.parent = parent
        self.runs: list[_Run] = []
        self.winner: _Run | None = None

    def claim(self, run: _Run) -> None:
        """The first run to produce a delta wins; every other is cancelled before any of
        its text can be forwarded (one event loop: nothing runs between the two)."""
        if self.winner is None:
            self.winner = run
            for other in self.runs:
                if other is not run:
                    other.task.cancel()
        elif self.winner is not run:
            raise asyncio.CancelledError


async def hedged(
    first: ModelEntry,
    attempt: Attempt,
    parent: StreamState,
    hedge_after_s: float,
    second: Callable[[], Awaitable[ModelEntry | None]],
    on_abandoned: Callable[[ModelEntry], None],
) -> ModelEntry:
    """Run ``first``; when it is silent for ``hedge_after_s``, also run ``second()`` (None:
    nothing to hedge with). Returns the winner, whose end facts are now ``parent``'s; raises
    the first attempt's error when every attempt failed before a delta."""
    race = _Race(parent)
    race.runs.append(_Run(race, first, attempt))
    try:
        done, _ = await asyncio.wait({race.runs[0].task}, timeout=hedge_after_s)
        if not done and race.winner is None:
            extra = await second()
            if extra is not None and race.winner is None:
                race.runs.append(_Run(race, extra, attempt))
        while True:
            if race.winner is not None:
                await race.winner.task
                break
            pending = {r.task for r in race.runs if not r.task.done()}
            if not pending:
                raise _first_error(race)
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for run in race.runs:
            if not run.task.done():
                run.task.cancel()
        for run in race.runs:
            with contextlib.suppress(BaseException):
                await run.task
            if run is not race.winner and _reached_provider(run):
                on_abandoned(run.entry)
    winner = race.winner
    state = winner.state
    parent.finish_reason, parent.model, parent.usage = state.finish_reason, state.model, state.usage
    parent.saw_tool_calls = parent.saw_tool_calls or state.saw_tool_calls
    parent.entry = winner.entry
    return winner.entry


def _reached_provider(run: _Run) -> bool:
    """A run cancelled or timed out (not one the provider refused): its prompt was sent."""
    if not run.task.cancelled():
        error = run.task.exception()
        return isinstance(error, RemoteError) and error.reason is Reason.PROVIDER_TIMEOUT
    return True


def _first_error(race: _Race) -> BaseException:
    for run in race.runs:
        if not run.task.cancelled() and run.task.exception() is not None:
            error = run.task.exception()
            assert error is not None
            return error
    return RemoteError(Reason.PROVIDER_UNAVAILABLE, "every hedged attempt was cancelled")
