"""Waiting for capacity instead of refusal, fair across nodes.

Over a node's ``rpm``/``tpm``, its or the sidecar's concurrent-stream limit, or with every
member of a deployment group at its limit, a request with a ``queue_timeout``
(``exo_remote_settings.queue_timeout``, or the node's own) waits in line instead of being
refused at once. LiteLLM's scheduler holds one priority queue per model and polls it; here
every admission check that can say "later" (RATE_LIMITED, OVERLOADED) is run again by
:meth:`FairQueue.wait` when capacity may have returned: a stream ended (:meth:`kick`), or
the refusal's Retry-After (a minute window's end) passed.

Order: one line per node, first in first out within it; between nodes, turns go round
robin, one admission per node per round, nodes with a higher ``priority`` first in each
round. So a node that sends a thousand requests waits behind its own, not in front of
another node's one. A waiter runs its own admission (in its own task), so a request
cancelled while queued leaves the line at once and holds nothing; one whose timeout
passes gets the refusal it would have had without the queue, with its Retry-After.

Time is the sidecar's clock; a test clock brings its own ``sleep`` (tests/support/traffic.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.sidecar.control.limits import Clock
from exo_remote_engine.sidecar.control.policy import Policy
from exo_remote_engine.sidecar.telemetry.metrics import Metrics

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]

QUEUEABLE = (Reason.RATE_LIMITED, Reason.OVERLOADED)
_RECHECK_S = 1.0  # a refusal without a Retry-After is tried again this often


class _Waiter:
    __slots__ = ("node", "refusal", "refused_at", "report", "since", "turn")

    def __init__(self, node: str, refusal: RemoteError, now: float) -> None:
        self.node = node
        self.refusal = refusal
        self.refused_at = self.since = now
        loop = asyncio.get_running_loop()
        self.turn: asyncio.Future[None] = loop.create_future()
        self.report: asyncio.Future[bool] = loop.create_future()  # True: admitted


class FairQueue:
    """The sidecar's line of requests waiting for capacity (one per process)."""

    def __init__(self, clock: Clock, metrics: Metrics | None = None, sleep: Sleep | None = None) -> None:
        self.clock = clock
        self.metrics = metrics
        self._sleep: Sleep = sleep or asyncio.sleep
        self._lines: dict[str, deque[_Waiter]] = {}
        self._priority: dict[str, int] = {}
        self._last_served = ""
        self._kicked = False
        self._dispatcher: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None
        self._timer_at = float("inf")

    def depth(self, node: str | None = None) -> int:
        """Requests waiting (of ``node``, or of every node)."""
        if node is not None:
            return len(self._lines.get(node, ()))
        return sum(len(line) for line in self._lines.values())

    def waiting_nodes(self) -> frozenset[str]:
        return frozenset(node for node, line in self._lines.items() if line)

    async def wait(self, node: str, admit: Callable[[], Awaitable[T]], timeout_s: float, priority: int = 0) -> T:
        """``admit()``'s result, at once or after waiting in ``node``'s line for at most
        ``timeout_s`` (then its last refusal). Only RATE_LIMITED and OVERLOADED wait."""
        if not self._lines.get(node):  # behind its own node's line otherwise: FIFO
            try:
                return await admit()
            except RemoteError as exc:
                if exc.reason not in QUEUEABLE or timeout_s <= 0:
                    raise
                refusal = exc
        elif timeout_s <= 0:
            return await admit()
        else:
            refusal = RemoteError(Reason.OVERLOADED, f"node {node!r} has requests waiting", retry_after_s=_RECHECK_S)
        waiter = _Waiter(node, refusal, self.clock())
        self._lines.setdefault(node, deque()).append(waiter)
        self._priority[node] = priority
        self._retry_at(refusal.retry_after_s)
        self._kick_soon()
        began = self.clock()
        admitted = False
        try:
            with self._counted(node):
                result = await self._queued(waiter, admit, began + timeout_s)
            admitted = True
            return result
        finally:
            line = self._lines.get(node)
            if line is not None and waiter in line:
                line.remove(waiter)
            if not waiter.report.done():
                waiter.report.set_result(False)  # gone (cancelled, timed out): the turn moves on
            if self.metrics is not None:
                self.metrics.queue_waited(node, self.clock() - began, admitted)

    async def _queued(self, waiter: _Waiter, admit: Callable[[], Awaitable[T]], deadline: float) -> T:
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise self._timed_out(waiter)
            timer = asyncio.ensure_future(self._sleep(remaining))
            try:
                await asyncio.wait({waiter.turn, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
            if not waiter.turn.done():
                raise self._timed_out(waiter)
            waiter.turn = asyncio.get_running_loop().create_future()
            try:
                result = await admit()
            except RemoteError as exc:
                if exc.reason not in QUEUEABLE:
                    raise
                waiter.refusal, waiter.refused_at = exc, self.clock()
                self._retry_at(exc.retry_after_s)
                waiter.report.set_result(False)
                waiter.report = asyncio.get_running_loop().create_future()
                continue
            waiter.report.set_result(True)
            return result

    def _timed_out(self, waiter: _Waiter) -> RemoteError:
        """The queue timeout passed: today's refusal, its Retry-After still true."""
        now, refusal = self.clock(), waiter.refusal
        retry = refusal.retry_after_s
        return dataclasses.replace(
            refusal,
            message=f"{refusal.message} (after waiting {now - waiter.since:.0f}s in line)",
            retry_after_s=None if retry is None else max(0.0, retry - (now - waiter.refused_at)),
        )

    def kick(self) -> None:
        """Capacity may have returned (a stream ended): waiters get their turns."""
        if any(self._lines.values()):
            self._kick_soon()

    def _kick_soon(self) -> None:
        self._kicked = True
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def _dispatch(self) -> None:
        """Rounds of turns while the last round admitted someone (or a kick came)."""
        while self._kicked:
            self._kicked = False
            for node in self._rotation():
                line = self._lines.get(node)
                while line:
                    waiter = line[0]
                    report = waiter.report
                    if not waiter.turn.done():
                        waiter.turn.set_result(None)
                    admitted = await report
                    if waiter in line and not admitted:
                        break  # still over its limit: the next node's turn
                    if admitted:
                        self._last_served = node
                        self._kicked = True  # there may be room for more: another round
                        break

    def _rotation(self) -> list[str]:
        """Nodes with waiters: higher priority first, round robin after the last served."""
        nodes = sorted(n for n, line in self._lines.items() if line)
        after = [n for n in nodes if n > self._last_served] + [n for n in nodes if n <= self._last_served]
        return sorted(after, key=lambda n: -self._priority.get(n, 0))  # stable: keeps the rotation

    def _retry_at(self, retry_after_s: float | None) -> None:
        """Wake the line when a refusal's Retry-After ends (a new minute's window)."""
        delay = _RECHECK_S if retry_after_s is None else max(0.0, min(retry_after_s, 3600.0))
        at = self.clock() + delay
        if at >= self._timer_at and self._timer is not None and not self._timer.done():
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().create_task(self._wake_after(delay))

    async def _wake_after(self, delay: float) -> None:
        await self._sleep(delay)
        self._timer_at = float("inf")
        self.kick()

    @contextlib.contextmanager
    def _counted(self, node: str) -> Iterator[None]:
        if self.metrics is not None:
            self.metrics.queue_depth(node, +1)
        try:
            yield
        finally:
            if self.metrics is not None:
                self.metrics.queue_depth(node, -1)

    async def close(self) -> None:
        for task in (self._timer, self._dispatcher):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class Lines:
    """The sidecar's lines: one for node limits (rpm, tpm), one for stream slots (the
    global cap and each node's), one per deployment group; a request waits in each at
    most what is left of its one ``queue_timeout``."""

    def __init__(
        self,
        policy: Policy,
        queue_timeout_s: float,
        clock: Clock,
        metrics: Metrics | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        self.policy = policy
        self.queue_timeout_s = queue_timeout_s
        self.clock = clock
        self._metrics = metrics
        self._sleep = sleep
        self.limits = self.new_line()
        self.slots = self.new_line()
        self.groups: dict[str, FairQueue] = {}

    def new_line(self) -> FairQueue:
        return FairQueue(self.clock, self._metrics, self._sleep)

    def ticket(self, node: str) -> Ticket:
        rules = self.policy.nodes.get(node)
        timeout = rules.queue_timeout_s if rules is not None and rules.queue_timeout_s is not None else None
        priority = rules.priority if rules is not None else 0
        return Ticket(self, node, self.clock() + (self.queue_timeout_s if timeout is None else timeout), priority)

    async def close(self) -> None:
        for line in (self.limits, self.slots, *self.groups.values()):
            await line.close()


class Ticket:
    """One request's place in the lines, with its one deadline."""

    __slots__ = ("_lines", "deadline", "node", "priority")

    def __init__(self, lines: Lines, node: str, deadline: float, priority: int) -> None:
        self._lines = lines
        self.node = node
        self.deadline = deadline
        self.priority = priority

    def _left(self) -> float:
        return self.deadline - self._lines.clock()

    async def limits(self, admit: Callable[[], Awaitable[None]]) -> None:
        """The node's rpm/tpm (and budget, never waited for) through its line."""
        await self._lines.limits.wait(self.node, admit, self._left(), self.priority)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a stream slot; waiting for one is fair across nodes, and ending the stream
        gives the next waiter its turn."""
        lines, node = self._lines, self.node

        async def take() -> None:
            lines.policy.take_slot(node, lines.slots.waiting_nodes() - {node})

        await lines.slots.wait(node, take, self._left(), self.priority)
        try:
            yield
        finally:
            lines.policy.give_back(node)
            lines.slots.kick()

    def group(self, alias: str) -> Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]:
        """How the backend waits for a member of ``alias``'s group under its limits."""
        line = self._lines.groups.get(alias)
        if line is None:
            line = self._lines.groups[alias] = self._lines.new_line()

        async def wait(pick: Callable[[], Awaitable[T]]) -> T:
            return await line.wait(self.node, pick, self._left(), self.priority)

        return wait
