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
from collections.abc import Awaitable, Callable, Collection, Sequence

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.contract.openai_chat import FINISH_REASONS
from exo_remote_engine.contract.redaction import redact
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.config.loader import ModelEntry
from exo_remote_engine.sidecar.control.routing import Router, deployment_fault
from exo_remote_engine.sidecar.relay.first_token import first_token_within, hedged
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
# Runs an admission (here: a deployment pick) again as capacity returns, within a queue
# timeout (control/queueing.py); the backend knows nothing of nodes.
WaitForRoom = Callable[[Callable[[], Awaitable[ModelEntry]]], Awaitable[ModelEntry]]

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
        on_abandoned: OnAttempt | None = None,
        wait_for_room: WaitForRoom | None = None,
        context_fallbacks: Sequence[ModelEntry] = (),
    ) -> None:
        """Stream ``request`` to ``write``: deltas, then exactly one Finished event.

        ``entry`` and ``fallbacks`` name deployment groups (usually of one). Before the
        first delta a failing deployment is retried, on another member of its group when
        there is one (at once) or itself (bounded, jittered, honouring Retry-After up to a
        cap); then the fallbacks are tried in order. After the first delta nothing is
        retried, so no text is ever sent twice. ``on_attempt`` hears of each deployment tried,
        ``on_abandoned`` of each attempt cancelled after its prompt was sent (first-token
        guard); ``wait_for_room`` queues the last model's pick while its group is at its limits.
        The caller's own 4xx is its answer; only a context window too small moves it on, to
        ``context_fallbacks``. Every fallback is one the caller checked the node may use."""
        candidates = [self._groups(e) for e in (entry, *fallbacks)]
        larger = [self._groups(e) for e in context_fallbacks]
        hooks = _Hooks(on_attempt, on_abandoned, wait_for_room)
        if all(self.transport_for(c).writes_inline for group in (*candidates, *larger) for c in group):
            state = StreamState(write)
            try:
                await self._produce_all(candidates, larger, request, state, hooks)
            except WriteFailed as exc:
                assert exc.__cause__ is not None
                raise exc.__cause__ from None
            except Exception as exc:
                raise _classified(exc, state.entry or entry, request) from None
            await write(pb.GenerateResponse(finished=_finished(state.entry or entry, state)))
            return
        state = StreamState()
        ready = state.ready
        producer = asyncio.create_task(self._produce_all(candidates, larger, request, state, hooks))
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

    async def _produce_all(
        self,
        candidates: Sequence[Sequence[ModelEntry]],
        larger: Sequence[Sequence[ModelEntry]],
        request: pb.GenerateRequest,
        state: StreamState,
        hooks: _Hooks,
    ) -> None:
        """The models in order; a request too long for them moves, once, to ``larger``
        (LiteLLM's ``context_window_fallbacks``)."""
        try:
            await self._produce_with_retries(candidates, request, state, hooks)
        except Exception as exc:
            reason = classify(exc, alias="", provider="").reason
            if state.started or not larger or reason is not Reason.CONTEXT_WINDOW_EXCEEDED:
                raise
            log.warning(
                "request_id=%s exceeds the context window of %s; falling back to %s",
                request.request_id,
                candidates[0][0].alias,
                larger[0][0].alias,
            )
            await self._produce_with_retries(larger, request, state, hooks)

    async def _produce_with_retries(
        self,
        candidates: Sequence[Sequence[ModelEntry]],
        request: pb.GenerateRequest,
        state: StreamState,
        hooks: _Hooks,
    ) -> None:
        # Two retry loops on purpose: this one handles *provider* failures (429, 5xx, a
        # dropped connection: classified here, where the provider's answer is seen), falls
        # back to the next model between attempts and stops as soon as a delta went out.
        # The engine's retry (engine/connection/client.py) handles only *sidecar* failures
        # (unreachable, overloaded) and never retries a provider error, so a failure class
        # is retried in exactly one place. Hand-written because of the fallback step.
        # A request the provider refused for what it asks (400, 413, 422) goes back to its
        # caller at once: no other member, no fallback, no cooldown.
        try:
            for position, group in enumerate(candidates):
                last_model = position == len(candidates) - 1
                tried: set[str] = set()
                for attempt in range(self._num_retries + 1):
                    try:
                        entry = await self._pick(group, tried, hooks.wait_for_room if last_model else None)
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
                    if hooks.on_attempt is not None:
                        hooks.on_attempt(entry)
                    try:
                        await self._attempt(entry, group, request, state, tried, hooks)
                        return
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        if state.started:
                            raise  # text already went out: never retry, never fall back
                        tried.add(entry.deployment_name)
                        error = classify(exc, alias=entry.alias, provider=entry.provider)
                        if not deployment_fault(error):
                            raise  # the caller's own request: its answer, not another deployment's
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

    async def _pick(self, group: Sequence[ModelEntry], tried: Collection[str], wait: WaitForRoom | None) -> ModelEntry:
        router = self._router
        if router is None:
            return group[0]
        if wait is None:
            return await router.pick(group, tried)
        return await wait(lambda: router.pick(group, tried))

    async def _attempt(
        self,
        entry: ModelEntry,
        group: Sequence[ModelEntry],
        request: pb.GenerateRequest,
        state: StreamState,
        tried: set[str],
        hooks: _Hooks,
    ) -> None:
        """One attempt under the first-token guard (relay/first_token.py): a deadline for
        the first delta, and a hedged second attempt when ``hedge_after`` is set."""
        router = self._router
        settings = router.settings if router is not None else None
        ttft = entry.ttft_timeout_s or (settings.ttft_timeout_s if settings is not None else None)
        hedge = entry.hedge_after_s or (settings.hedge_after_s if settings is not None else None)
        if router is None or hedge is None:
            try:
                await self._produce_once(entry, group, request, state, ttft)
            except RemoteError as exc:
                abandoned = ttft is not None and exc.reason is Reason.PROVIDER_TIMEOUT and not state.started
                if abandoned and hooks.on_abandoned is not None:
                    hooks.on_abandoned(entry)  # cut by the guard: the provider has the prompt, it is charged
                raise
            return

        async def second() -> ModelEntry | None:
            try:
                extra = await router.pick(group, {*tried, entry.deployment_name})
            except RemoteError:
                return None  # every other member is limited or cooling down: no hedge
            tried.add(extra.deployment_name)
            return extra

        winner = await hedged(
            entry,
            lambda e, s: self._produce_once(e, group, request, s, ttft),
            state,
            hedge,
            second,
            hooks.on_abandoned or _ignore,
        )
        if hooks.on_attempt is not None:
            hooks.on_attempt(winner)

    async def _produce_once(
        self,
        entry: ModelEntry,
        group: Sequence[ModelEntry],
        request: pb.GenerateRequest,
        state: StreamState,
        ttft_s: float | None = None,
    ) -> None:
        """One transport call, reported to the router (in flight, time to first token,
        tokens, failures)."""
        router = self._router
        if router is None:
            await self.transport_for(entry).produce(entry, request, state)
            return
        router.started(entry)
        began = time.monotonic()
        state.on_first.clear()  # an earlier attempt's hooks
        state.on_first.append(lambda: router.first_token(entry, time.monotonic() - began))
        try:
            await first_token_within(ttft_s, entry, state, self.transport_for(entry).produce(entry, request, state))
        except Exception as exc:
            error = classify(exc, alias=entry.alias, provider=entry.provider)
            if state.started or not deployment_fault(error):
                router.ended(entry)  # a caller's own 4xx says nothing about the deployment
            else:
                if isinstance(exc, RemoteError) and exc.reason is Reason.PROVIDER_TIMEOUT:
                    router.first_token(entry, time.monotonic() - began)  # at least this long
                router.failed(entry, getattr(exc, "status_code", None), len(group))
            raise
        except BaseException:
            router.ended(entry)
            raise
        usage = state.usage
        tokens = usage.prompt_tokens + usage.completion_tokens if usage is not None else 0
        router.succeeded(entry, time.monotonic() - began, tokens)


class _Hooks:
    """What the caller of :meth:`StreamingBackend.generate` hears of and lends."""

    __slots__ = ("on_abandoned", "on_attempt", "wait_for_room")

    def __init__(self, on_attempt: OnAttempt | None, on_abandoned: OnAttempt | None, wait: WaitForRoom | None) -> None:
        self.on_attempt = on_attempt
        self.on_abandoned = on_abandoned
        self.wait_for_room = wait


def _ignore(entry: ModelEntry) -> None:
    return None


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
