"""The LiteLLM transport: ``litellm.acompletion(stream=True)`` for every provider family.

It is the general path (Anthropic, Gemini, Bedrock, Ollama's native API, the embedded
model, ...). Plain OpenAI-compatible deployments take the cheaper direct reader in
:mod:`~exo_remote_engine.sidecar.transports.openai_transport` unless the sidecar is told not to.
Every HTTP response LiteLLM reads passes the limits of
:mod:`~exo_remote_engine.sidecar.transports.upstream_limits` first.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import litellm

from exo_remote_engine.contract.openai_chat import chat_completion_body
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.config.loader import EMBEDDED_PROVIDER, ModelEntry
from exo_remote_engine.sidecar.transports.provider_errors import ProviderProtocolError
from exo_remote_engine.sidecar.transports.stream_types import StreamState
from exo_remote_engine.sidecar.transports.upstream_limits import guard_litellm_transports


class LiteLLMTransport:
    writes_inline = False

    def __init__(self, request_timeout_s: float = 600.0) -> None:
        self._timeout = request_timeout_s
        guard_litellm_transports()  # before LiteLLM creates its first HTTP client

    async def produce(self, entry: ModelEntry, request: pb.GenerateRequest, state: StreamState) -> None:
        stream = await _open_stream(self.call_kwargs(entry, request))
        try:
            async for chunk in stream:
                try:
                    _absorb(chunk, state)
                except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as exc:
                    # A field of the wrong type or range (an index of 2**31, usage of 2**63, a
                    # list as finish_reason): the provider's fault, not ours (no INTERNAL).
                    detail = f"{type(exc).__name__}: {exc}"
                    raise ProviderProtocolError(f"the provider sent a malformed stream event ({detail})") from None
                await state.flush()
        finally:
            # Closing, not just dropping, the stream is what closes the HTTP connection.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def call_kwargs(self, entry: ModelEntry, request: pb.GenerateRequest) -> dict[str, Any]:
        kwargs = chat_completion_body(request)
        kwargs["timeout"] = self._timeout  # a config's litellm_params.timeout overrides it
        kwargs.update(entry.params)
        # LiteLLM's Router reads stream_timeout, acompletion does not: for a stream it is
        # the timeout (httpx applies it to every read, so it bounds a stall mid-stream too),
        # as on the direct reader.
        stream_timeout = kwargs.pop("stream_timeout", None)
        if stream_timeout is not None:
            kwargs["timeout"] = stream_timeout
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


def _absorb(chunk: Any, state: StreamState) -> None:
    buffer = state.buffer
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
                state.saw_tool_calls = True
                for call in delta.tool_calls:
                    fn = call.function
                    buffer.add_tool(
                        call.index or 0,
                        call.id,
                        fn.name if fn is not None else None,
                        fn.arguments if fn is not None else None,
                    )
        if choice.finish_reason:
            if not isinstance(choice.finish_reason, str):
                raise TypeError(f"finish_reason is a {type(choice.finish_reason).__name__}, not a string")
            state.finish_reason = choice.finish_reason
    usage = getattr(chunk, "usage", None)
    if usage:
        details = getattr(usage, "prompt_tokens_details", None)
        cdetails = getattr(usage, "completion_tokens_details", None)
        state.usage = pb.Usage(
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            cached_prompt_tokens=int(
                getattr(details, "cached_tokens", 0) or getattr(usage, "cache_read_input_tokens", 0) or 0
            ),
            reasoning_tokens=int(getattr(cdetails, "reasoning_tokens", 0) or 0),
            # Anthropic's cache writes (LiteLLM keeps them beside the OpenAI fields).
            cache_creation_prompt_tokens=int(
                getattr(usage, "cache_creation_input_tokens", 0) or getattr(details, "cache_creation_tokens", 0) or 0
            ),
        )
    if chunk.model:
        state.model = chunk.model


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
