"""Streams one completion from LiteLLM and hands merged deltas to a writer.

The provider is read by a producer task into a :class:`DeltaBuffer`; the writer takes
whatever accumulated while its previous write was in flight. A slow reader therefore
gets fewer, larger deltas and never loses one, and gRPC sends fewer messages exactly when
it is busiest (its cost is per message, not per byte). Cancelling the writer closes the
upstream HTTP stream at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import litellm

from exo_remote_engine.errors import Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.openai_wire import FINISH_REASONS, request_to_litellm_kwargs
from exo_remote_engine.sidecar.config import EMBEDDED_PROVIDER, ModelEntry
from exo_remote_engine.sidecar.litellm_errors import classify

log = logging.getLogger(__name__)

Write = Callable[[pb.GenerateResponse], Awaitable[None]]


@dataclass
class _ToolFragment:
    index: int
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class DeltaBuffer:
    """Text, reasoning and tool-call fragments received but not yet written."""

    __slots__ = ("_reasoning", "_text", "_tools")

    def __init__(self) -> None:
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._tools: dict[int, _ToolFragment] = {}

    def __bool__(self) -> bool:
        return bool(self._text or self._reasoning or self._tools)

    def add_text(self, text: str) -> None:
        self._text.append(text)

    def add_reasoning(self, text: str) -> None:
        self._reasoning.append(text)

    def add_tool(self, index: int, call_id: str | None, name: str | None, args: str | None) -> None:
        frag = self._tools.get(index)
        if frag is None:
            frag = self._tools[index] = _ToolFragment(index)
        if call_id:
            frag.id = call_id
        if name:
            frag.name = name
        if args:
            frag.arguments.append(args)

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
        return delta


@dataclass
class _Outcome:
    finish_reason: str | None = None
    model: str = ""
    usage: Any = None
    saw_tool_calls: bool = False
    started: bool = False  # a delta exists: from here on, no retry and no fallback
    entry: ModelEntry | None = None  # the model being (or last) tried


class LiteLLMBackend:
    """Calls ``litellm.acompletion(stream=True)`` for a configured model entry."""

    def __init__(
        self,
        secrets: Callable[[], Iterable[str]],
        request_timeout_s: float = 600.0,
        num_retries: int = 1,
        retry_base_s: float = 0.25,
        retry_cap_s: float = 5.0,
    ) -> None:
        self._secrets = secrets
        self._timeout = request_timeout_s
        self._num_retries = num_retries
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s

    async def generate(
        self,
        entry: ModelEntry,
        request: pb.GenerateRequest,
        write: Write,
        fallbacks: Sequence[ModelEntry] = (),
    ) -> None:
        """Stream ``request`` to ``write``: deltas, then exactly one Finished event.

        Before the first delta a failing model is retried (bounded, jittered, honouring
        Retry-After up to a cap) and then its fallbacks are tried in order; after the first
        delta nothing is retried, so no text is ever sent twice."""
        buffer = DeltaBuffer()
        outcome = _Outcome()
        ready = asyncio.Event()
        producer = asyncio.create_task(self._produce_with_retries([entry, *fallbacks], request, buffer, outcome, ready))
        try:
            while not producer.done():
                await ready.wait()
                ready.clear()
                delta = buffer.take()
                if delta is not None:
                    await write(pb.GenerateResponse(delta=delta))
            delta = buffer.take()
            if delta is not None:
                await write(pb.GenerateResponse(delta=delta))
            exc = producer.exception()
            if exc is not None:
                failed = outcome.entry or entry
                raise classify(exc, alias=failed.alias, provider=failed.provider, secrets=self._secrets())
            await write(pb.GenerateResponse(finished=self._finished(entry, outcome)))
        finally:
            if not producer.done():
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await producer

    async def _produce_with_retries(
        self,
        candidates: Sequence[ModelEntry],
        request: pb.GenerateRequest,
        buffer: DeltaBuffer,
        outcome: _Outcome,
        ready: asyncio.Event,
    ) -> None:
        try:
            for position, entry in enumerate(candidates):
                for attempt in range(self._num_retries + 1):
                    outcome.entry = entry
                    try:
                        await self._produce(entry, request, buffer, outcome, ready)
                        return
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        if outcome.started:
                            raise  # text already went out: never retry, never fall back
                        error = classify(exc, alias=entry.alias, provider=entry.provider, secrets=self._secrets())
                        last_model = position == len(candidates) - 1
                        if not error.retryable or attempt == self._num_retries:
                            if last_model:
                                raise
                            log.warning(
                                "request_id=%s model=%s failed (%s); falling back to %s",
                                request.request_id,
                                entry.alias,
                                error.reason.value,
                                candidates[position + 1].alias,
                            )
                            break
                        delay = random.uniform(0, self._retry_base_s * 2**attempt)
                        if error.retry_after_s is not None:
                            delay = max(delay, error.retry_after_s)
                        log.info(
                            "request_id=%s model=%s %s; retry %d in %.2fs",
                            request.request_id,
                            entry.alias,
                            error.reason.value,
                            attempt + 1,
                            delay,
                        )
                        await asyncio.sleep(min(delay, self._retry_cap_s))
        finally:
            ready.set()

    async def _produce(
        self,
        entry: ModelEntry,
        request: pb.GenerateRequest,
        buffer: DeltaBuffer,
        outcome: _Outcome,
        ready: asyncio.Event,
    ) -> None:
        stream = await _open_stream(self._call_kwargs(entry, request))
        try:
            async for chunk in stream:
                self._absorb(chunk, buffer, outcome)
                if buffer:
                    outcome.started = True
                    ready.set()
                    # LiteLLM does not yield while its socket has data buffered; without
                    # this the writer would not run until the provider paused.
                    await asyncio.sleep(0)
        finally:
            # Closing, not just dropping, the stream is what closes the HTTP connection.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    @staticmethod
    def _absorb(chunk: Any, buffer: DeltaBuffer, outcome: _Outcome) -> None:
        choices = chunk.choices
        if choices:
            choice = choices[0]
            delta = choice.delta
            if delta is not None:
                if delta.content:
                    buffer.add_text(delta.content)
                reasoning = getattr(delta, "reasoning_content", None)
                if reasoning:
                    buffer.add_reasoning(reasoning)
                if delta.tool_calls:
                    outcome.saw_tool_calls = True
                    for call in delta.tool_calls:
                        fn = call.function
                        buffer.add_tool(
                            call.index or 0,
                            call.id,
                            fn.name if fn is not None else None,
                            fn.arguments if fn is not None else None,
                        )
            if choice.finish_reason:
                outcome.finish_reason = choice.finish_reason
        usage = getattr(chunk, "usage", None)
        if usage:
            outcome.usage = usage
        if chunk.model:
            outcome.model = chunk.model

    def _call_kwargs(self, entry: ModelEntry, request: pb.GenerateRequest) -> dict[str, Any]:
        kwargs = request_to_litellm_kwargs(request)
        kwargs["timeout"] = self._timeout  # a config's litellm_params.timeout overrides it
        kwargs.update(entry.params)
        kwargs.update(
            model=entry.litellm_model,
            stream=True,
            stream_options={"include_usage": True},
            num_retries=0,  # retries happen before the first delta, in one place, not here
            max_retries=0,
        )
        if entry.provider == EMBEDDED_PROVIDER:
            kwargs["mock_response"] = _echo_reply(kwargs["messages"])
            kwargs["api_key"] = "embedded"
        return kwargs

    @staticmethod
    def _finished(entry: ModelEntry, outcome: _Outcome) -> pb.Finished:
        reason = outcome.finish_reason or ("tool_calls" if outcome.saw_tool_calls else None)
        if reason is None:
            raise RemoteError(
                Reason.PROVIDER_UNAVAILABLE,
                f"the provider's stream for model {entry.alias!r} ended without a finish reason",
            )
        finished = pb.Finished(
            finish_reason=FINISH_REASONS.get(reason, pb.FINISH_REASON_STOP),
            model=outcome.model or entry.litellm_model,
        )
        usage = outcome.usage
        if usage is not None:
            finished.usage.prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
            finished.usage.completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
            details = getattr(usage, "prompt_tokens_details", None)
            finished.usage.cached_prompt_tokens = int(getattr(details, "cached_tokens", 0) or 0)
            cdetails = getattr(usage, "completion_tokens_details", None)
            finished.usage.reasoning_tokens = int(getattr(cdetails, "reasoning_tokens", 0) or 0)
        return finished


async def _open_stream(kwargs: dict[str, Any]) -> Any:
    """``acompletion`` that cannot leak: cancelled while LiteLLM is still opening the
    stream (its first call takes half a second), the stream is closed once it arrives
    instead of lingering, and paying for tokens, until garbage collection."""
    opening = asyncio.ensure_future(litellm.acompletion(**kwargs))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        # Cancelling LiteLLM while it wraps a response that already arrived leaks that
        # response's connection; cancelling it while the provider is silent is what aborts the
        # request. So: close the stream if it arrives soon, else cancel the stalled request.
        opening.add_done_callback(_close_abandoned)
        asyncio.get_running_loop().call_later(_ABANDON_GRACE_S, opening.cancel)
        raise


def _close_abandoned(opening: asyncio.Future[Any]) -> None:
    if opening.cancelled() or opening.exception() is not None:
        return
    aclose = getattr(opening.result(), "aclose", None)
    if aclose is not None:
        task = asyncio.ensure_future(aclose())
        _abandoned.add(task)
        task.add_done_callback(_abandoned.discard)


_abandoned: set[asyncio.Future[Any]] = set()
_ABANDON_GRACE_S = 0.5


async def warm_up() -> None:
    """Pay LiteLLM's first-call costs (lazy imports, client setup) before serving."""
    stream = await litellm.acompletion(
        model="openai/warm-up",
        messages=[{"role": "user", "content": "."}],
        mock_response=".",
        api_key="warm-up",
        stream=True,
    )
    async for _ in stream:
        pass


def _echo_reply(messages: list[dict[str, Any]]) -> str:
    """The embedded model's reply: the last user message, echoed. Offline by design."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        return f"Echo from the embedded model: {content}"
    return "Echo from the embedded model: (no user message)"
