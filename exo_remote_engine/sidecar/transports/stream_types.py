"""What a transport and the streaming backend share: the merge buffer, the stream's
state, the transport protocol.

Its own module so that :mod:`~exo_remote_engine.sidecar.relay.streaming` (which picks a
transport) and the transports (which fill a :class:`StreamState`) both import it and
not each other: the import graph stays acyclic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.config.loader import ModelEntry

Write = Callable[[pb.GenerateResponse], Awaitable[None]]
# Text received but not yet written, beyond which the transport waits for the writer.
MAX_PENDING_CHARS = 256 * 1024
MAX_TOOL_INDEX = 2**31 - 1


@dataclass
class _ToolFragment:
    index: int
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class DeltaBuffer:
    """Text, reasoning and tool-call fragments received but not yet written."""

    __slots__ = ("_reasoning", "_text", "_tools", "size")

    def __init__(self) -> None:
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._tools: dict[int, _ToolFragment] = {}
        self.size = 0  # characters pending: what the backpressure bound counts

    def __bool__(self) -> bool:
        return bool(self._text or self._reasoning or self._tools)

    def add_text(self, text: str) -> None:
        self._text.append(text)
        self.size += len(text)

    def add_reasoning(self, text: str) -> None:
        self._reasoning.append(text)
        self.size += len(text)

    def add_tool(self, index: int, call_id: str | None, name: str | None, args: str | None) -> None:
        if not 0 <= index <= MAX_TOOL_INDEX:  # the wire's int32; a provider's 2**31 is malformed
            raise ValueError(f"tool call index {index} is out of range")
        frag = self._tools.get(index)
        if frag is None:
            frag = self._tools[index] = _ToolFragment(index)
        if call_id:
            frag.id = call_id
        if name:
            frag.name = name
        if args:
            frag.arguments.append(args)
            self.size += len(args)

    def take(self) -> pb.Delta | None:
        """Everything pending as one merged delta, or None when nothing is pending."""
        if not self:
            return None
        delta = pb.Delta(text="".join(self._text), reasoning_text="".join(self._reasoning))
        for frag in self._tools.values():
            delta.tool_calls.append(
                pb.ToolCallDelta(
                    index=frag.index,
                    id=frag.id,
                    name=frag.name,
                    arguments_fragment="".join(frag.arguments),
                )
            )
        self._text.clear()
        self._reasoning.clear()
        self._tools.clear()
        self.size = 0
        return delta


class StreamState:
    """What a transport has read so far: pending deltas plus the stream's end facts."""

    __slots__ = (
        "_write",
        "buffer",
        "entry",
        "finish_reason",
        "model",
        "on_first",
        "ready",
        "saw_tool_calls",
        "space",
        "started",
        "usage",
    )

    def __init__(self, write: Write | None = None) -> None:
        self._write = write  # set: flush() writes itself; None: a separate writer task does
        self.buffer = DeltaBuffer()
        self.ready = asyncio.Event()
        self.space = asyncio.Event()  # set by the writer task each time it takes the buffer
        self.finish_reason: str | None = None
        self.model = ""
        self.usage: pb.Usage | None = None
        self.saw_tool_calls = False
        self.started = False  # a delta exists: from here on, no retry and no fallback
        self.entry: ModelEntry | None = None  # the model being (or last) tried
        self.on_first: list[Callable[[], None]] = []  # called when the first delta is handed over

    async def flush(self) -> None:
        """Hand over what is pending: write it now, or wake the writer task and let it run.

        Yielding matters in the second case: an HTTP reader does not yield while its
        socket has data buffered, and without it the writer would not run until the
        provider paused. Past :data:`MAX_PENDING_CHARS` it waits until the writer has
        taken the buffer: the provider is not read meanwhile."""
        if not self.buffer:
            return
        if not self.started:
            self.started = True
            for hook in self.on_first:
                hook()
        if self._write is not None:
            delta = self.buffer.take()
            try:
                await self._write(pb.GenerateResponse(delta=delta))
            except Exception as exc:
                raise WriteFailed from exc  # ours, not the provider's: never classified as one
        else:
            self.ready.set()
            if self.buffer.size >= MAX_PENDING_CHARS:
                self.space.clear()
                await self.space.wait()
            else:
                await asyncio.sleep(0)


class WriteFailed(Exception):
    """Writing to our own client failed; the cause is re-raised as it was."""


class Transport(Protocol):
    """Reads one provider stream for ``entry`` into ``state``; raises on failure.

    ``writes_inline``: the transport may await the write itself, because whatever arrives
    meanwhile waits in the socket and comes back as one block (so a slow reader still gets
    fewer, larger deltas). One task per stream instead of two is a large share of the
    per-token cost. LiteLLM yields chunk by chunk, so it gets a separate writer task that
    merges what accumulated during a write."""

    writes_inline: bool

    async def produce(self, entry: ModelEntry, request: pb.GenerateRequest, state: StreamState) -> None: ...
