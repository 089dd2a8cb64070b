"""Streams one completion from a provider and hands merged deltas to a writer.

A transport (:mod:`~exo_remote_engine.sidecar.transports.openai_transport` for OpenAI-compatible
servers, :mod:`~exo_remote_engine.sidecar.transports.litellm_transport` for everything else) reads the
provider into a :class:`StreamState`; the writer takes whatever accumulated while its
previous write was in flight. A slow reader therefore gets fewer, larger deltas and never
loses one, and gRPC sends fewer messages exactly when it is busiest (its cost is per
message, not per byte). The merge buffer is bounded (:data:`MAX_PENDING_CHARS`): past it
the transport stops reading the provider until the writer has taken it, so a client that
stops reading holds back the provider (TCP backpressure) instead of filling memory.
Retries and fallbacks live here, in one place, for both transports, and so does the log
line naming the cause of a provider failure. Cancelling the writer closes the upstream
HTTP stream at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.contract.openai_chat import FINISH_REASONS
from exo_remote_engine.contract.redaction import redact
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.config.loader import ModelEntry
from exo_remote_engine.sidecar.control.routing import Router
from exo_remote_engine.sidecar.telemetry.safe_logging import safe_logger
from exo_remote_engine.sidecar.transports.litellm_transport import LiteLLMTransport
from exo_remote_engine.sidecar.transports.openai_transport import OpenAICompatibleTransport
from exo_remote_engine.sidecar.transports.provider_errors import classify
from exo_remote_engine.sidecar.transports.stream_types import (
    MAX_PENDING_CHARS,
    StreamState,
    Transport,
    Write,
    WriteFailed,
)

__all__ = ["MAX_PENDING_CHARS", "OnAttempt", "StreamState", "StreamingBackend", "Transport", "Write"]

OnAttempt = Callable[[ModelEntry], None]

log = safe_logger(__name__)

_MAX_CAUSE_CHARS = 300


class StreamingBackend:
    """Serves Generate for a model entry: one transport call per attempt, retries and
    fallbacks before the first delta, exactly one Finished event at the end."""

    def __init__(
        self,
        num_retries: int = 1,
        retry_base_s: float = 0.25,
        retry_cap_s: float = 5.0,
        request_timeout_s: float = 600.0,
        openai_fast_path: bool = True,
        router: Router | None = None,
        groups: Callable[[ModelEntry], Sequence[ModelEntry]] = lambda entry: (entry,),
    ) -> None:
        self._router = router
        self._groups = groups
        self._num_retries = num_retries
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._litellm = LiteLLMTransport(request_timeout_s)
        self._direct = OpenAICompatibleTransport(request_timeout_s) if openai_fast_path else None

    def transport_for(self, entry: ModelEntry) -> Transport:
        """The direct reader when ``entry`` is a plain OpenAI-compatible deployment (it
        costs a fraction of LiteLLM's CPU per chunk), LiteLLM for everything else."""
        if self._direct is not None and self._direct.accepts(entry):
            return self._direct
        return self._litellm

    async def close(self) -> None:
        if self._direct is not None:
            await self._direct.close()

    async def generate(
        self,
        entry: ModelEntry,
        request: pb.GenerateRequest,
        write: Write,
        fallbacks: Sequence[ModelEntry] = (),
        on_attempt: OnAttempt | None = None,
    ) -> None:
        """Stream ``request`` to ``write``: deltas, then exactly one Finished event.

        ``entry`` and ``fallbacks`` name deployment groups (usually of one). Before the
        first delta a failing deployment is retried, on another member of its group when
        there is one (at once) or itself (bounded, jittered, honouring Retry-After up to a
        cap); then the fallbacks are tried in order. After the first delta nothing is
        retried, so no text is ever sent twice. ``on_attempt`` hears of each deployment tried."""
        candidates = [self._groups(e) for e in (entry, *fallbacks)]
        if all(self.transport_for(c).writes_inline for group in candidates for c in group):
            state = StreamState(write)
            try:
                await self._produce_with_retries(candidates, request, state, on_attempt)
            except WriteFailed as exc:
                assert exc.__cause__ is not None
                raise exc.__cause__ from None
            except Exception as exc:
                raise _classified(exc, state.entry or entry, request) from None
            await write(pb.GenerateResponse(finished=_finished(state.entry or entry, state)))
            return
        state = StreamState()
        ready = state.ready
        producer = asyncio.create_task(self._produce_with_retries(candidates, request, state, on_attempt))
        try:
            while not producer.done():
                await ready.wait()
                ready.clear()
                delta = state.buffer.take()
                state.space.set()
                if delta is not None:
                    await write(pb.GenerateResponse(delta=delta))
            delta = state.buffer.take()
            if delta is not None:
                await write(pb.GenerateResponse(delta=delta))
            failure = producer.exception()
            if failure is not None:
                raise _classified(failure, state.entry or entry, request)
            await write(pb.GenerateResponse(finished=_finished(state.entry or entry, state)))
        finally:
            if not producer.done():
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await producer

    async def _produce_with_retries(
        self,
        candidates: Sequence[Sequence[ModelEntry]],
        request: pb.GenerateRequest,
        state: StreamState,
        on_attempt: OnAttempt | None,
    ) -> None:
        # Two retry loops on purpose: this one handles *provider* failures (429, 5xx, a
        # dropped connection: classified here, where the provider's answer is seen), falls
        # back to the next model between attempts and stops as soon as a delta went out.
        # The engine's retry (engine/client.py) handles only *sidecar* failures
        # (unreachable, overloaded) and never retries a provider error, so a failure class
        # is retried in exactly one place. Hand-written because of the fallback step.
        try:
            for position, group in enumerate(candidates):
                last_model = position == len(candidates) - 1
                tried: set[str] = set()
                for attempt in range(self._num_retries + 1):
                    try:
                        entry = await self._router.pick(group, tried) if self._router is not None else group[0]
                    except RemoteError as unavailable:  # every deployment is limited or cooling down
                        if last_model:
                            raise
                        log.warning(
                            "request_id=%s model=%s %s; falling back to %s",
                            request.request_id,
                            group[0].alias,
                            unavailable.reason.value,
                            candidates[position + 1][0].alias,
                        )
                        break
                    state.entry = entry
                    if on_attempt is not None:
                        on_attempt(entry)
                    try:
                        await self._produce_once(entry, group, request, state)
                        return
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        if state.started:
                            raise  # text already went out: never retry, never fall back
                        tried.add(entry.deployment_name)
                        error = classify(exc, alias=entry.alias, provider=entry.provider)
                        if not error.retryable or attempt == self._num_retries:
                            if last_model:
                                raise
                            log.warning(
                                "request_id=%s model=%s failed (%s: %s); falling back to %s",
                                request.request_id,
                                entry.deployment_name,
                                error.reason.value,
                                error.message,
                                candidates[position + 1][0].alias,
                            )
                            break
                        if len(tried) < len(group):
                            log.info(
                                "request_id=%s deployment=%s %s; trying another deployment",
                                request.request_id,
                                entry.deployment_name,
                                error.reason.value,
                            )
                            continue  # another member of the group: no reason to wait
                        delay = random.uniform(0, self._retry_base_s * 2**attempt)
                        if error.retry_after_s is not None:
                            delay = max(delay, error.retry_after_s)
                        log.info(
                            "request_id=%s model=%s %s (%s); retry %d in %.2fs",
                            request.request_id,
                            entry.alias,
                            error.reason.value,
                            error.message,
                            attempt + 1,
                            delay,
                        )
                        await asyncio.sleep(min(delay, self._retry_cap_s))
        finally:
            state.ready.set()

    async def _produce_once(
        self, entry: ModelEntry, group: Sequence[ModelEntry], request: pb.GenerateRequest, state: StreamState
    ) -> None:
        """One transport call, reported to the router (in flight, latency, tokens, failures)."""
        router = self._router
        if router is None:
            await self.transport_for(entry).produce(entry, request, state)
            return
        router.started(entry)
        began = time.monotonic()
        try:
            await self.transport_for(entry).produce(entry, request, state)
        except Exception as exc:
            if state.started:
                router.ended(entry)
            else:
                router.failed(entry, getattr(exc, "status_code", None), len(group))
            raise
        except BaseException:
            router.ended(entry)
            raise
        usage = state.usage
        tokens = usage.prompt_tokens + usage.completion_tokens if usage is not None else 0
        router.succeeded(entry, time.monotonic() - began, tokens)


def _classified(exc: BaseException, entry: ModelEntry, request: pb.GenerateRequest) -> RemoteError:
    """The client's error for ``exc``; its cause goes to the log (redacted like every
    record), since the client's message says what happened but not why."""
    error = classify(exc, alias=entry.alias, provider=entry.provider)
    if not isinstance(exc, RemoteError):
        cause = f"{type(exc).__name__}: {str(exc)[:_MAX_CAUSE_CHARS]}"
        log.warning(
            "request_id=%s model=%s provider stream failed (%s), cause: %s",
            request.request_id,
            entry.alias,
            error.reason.value,
            cause,
            exc_info=exc if error.reason is Reason.INTERNAL else None,
        )
    return error


def _finished(entry: ModelEntry, state: StreamState) -> pb.Finished:
    reason = state.finish_reason or ("tool_calls" if state.saw_tool_calls else None)
    if reason is None:
        raise RemoteError(
            Reason.PROVIDER_UNAVAILABLE,
            f"the provider's stream for model {entry.alias!r} ended without a finish reason",
        )
    finished = pb.Finished(
        finish_reason=FINISH_REASONS.get(reason, pb.FINISH_REASON_STOP),
        model=redact(state.model) if state.model else entry.litellm_model,  # provider-chosen text
    )
    if state.usage is not None:
        finished.usage.CopyFrom(state.usage)
    return finished
