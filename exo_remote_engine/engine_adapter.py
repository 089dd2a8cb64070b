"""RemoteLLMInferenceEngine: classic exo's inference-engine contract, served by a sidecar.

exo drives an engine one id at a time: ``infer_prompt`` for the first, then
``sample``/``infer_tensor`` per id until the id is EOS or its token budget runs out, and
it never says when a request ended. So each request here is a :class:`_Generation`: a
task reads the sidecar's stream into pending text and control events, and every
``infer_*`` call hands exo one :class:`~exo_remote_engine.engine.codec.Step` carrying
everything pending (at least one whole delta, whatever the script), so exo's
``--max-generate-tokens`` counts provider deltas, not characters, and its loop is no
longer the bottleneck. The upstream call is cancelled when exo stops pulling: EOS
reached, exo's max-tokens finish, an API that went away, node shutdown, or an idle
watchdog.

Finish reason, usage, tool calls and errors travel in-band as control ids (see
:mod:`~exo_remote_engine.engine.codec`), so whichever node's API serves the request can
rebuild an exact OpenAI response from the ids alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.contract.openai_chat import FINISH_REASON_NAMES, chat_body_to_request, usage_to_openai
from exo_remote_engine.engine import codec
from exo_remote_engine.engine.catalog import RemoteCatalog
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.engine.connection.target import SidecarTarget
from exo_remote_engine.engine.tokenizer import PromptEnvelope, RemoteTokenizer
from exo_remote_engine.generated import remote_inference_pb2 as pb

if TYPE_CHECKING:
    InferenceEngine = object
else:
    try:  # a real subclass inside exo; a plain class where exo is absent (tests, tools)
        from exo.inference.inference_engine import InferenceEngine
    except ImportError:
        InferenceEngine = object

log = logging.getLogger("exo_remote_engine.engine")

ENGINE_CLASS_NAME = "RemoteLLMInferenceEngine"
# Most characters one step carries (whole code points): bounds one SendResult message when
# the provider is far ahead of exo; a step still holds at least one delta's worth.
STEP_MAX_CHARS = 16_384


def control_ids(event: dict[str, Any]) -> list[int]:
    """One structured event as control ids (decoded by the API side's StreamDecoder)."""
    return codec.encode_control(json.dumps(event, separators=(",", ":")).encode())


def finished_event(finished: pb.Finished) -> dict[str, Any]:
    return {
        "type": "finished",
        "finish_reason": FINISH_REASON_NAMES.get(finished.finish_reason, "stop"),
        "usage": usage_to_openai(finished.usage),
        "model": finished.model,
    }


def error_event(error: RemoteError) -> dict[str, Any]:
    return {
        "type": "error",
        "reason": error.reason.value,
        "status": error.http_status,
        "message": error.message,
        "retry_after_s": error.retry_after_s,
    }


class _Generation:
    """One request's upstream stream, consumed by exo one id at a time."""

    def __init__(self, request_id: str, request: pb.GenerateRequest | RemoteError, client: SidecarClient) -> None:
        self.request_id = request_id
        self._segments: deque[str | list[int]] = deque()
        self._available = asyncio.Event()
        self.finished = False  # EOS is queued
        self.consumer_waiting = False
        self.last_pull = time.monotonic()
        self.started = time.monotonic()
        if isinstance(request, RemoteError):
            self._task: asyncio.Task[None] | None = None
            self._fail(request)
        else:
            self._task = asyncio.create_task(self._pump(client, request), name=f"remote-{request_id}")

    # producer side ---------------------------------------------------------------
    def _push_text(self, text: str) -> None:
        # One segment per delta (joined when exo pulls): appending to one growing string
        # would copy the backlog once per delta while exo is behind.
        self._segments.append(text)
        self._available.set()

    def _push_ids(self, ids: list[int]) -> None:
        self._segments.append(ids)
        self._available.set()

    def _fail(self, error: RemoteError) -> None:
        self._push_ids(control_ids(error_event(error)))
        self._finish()

    def _finish(self) -> None:
        if not self.finished:
            self._push_ids([codec.EOS_ID])
            self.finished = True

    async def _pump(self, client: SidecarClient, request: pb.GenerateRequest) -> None:
        try:
            async for event in client.generate(request):
                if event.HasField("delta"):
                    delta = event.delta
                    if delta.text:
                        self._push_text(delta.text)
                    if delta.reasoning_text:
                        self._push_ids(control_ids({"type": "reasoning", "text": delta.reasoning_text}))
                    for call in delta.tool_calls:
                        self._push_ids(
                            control_ids(
                                {
                                    "type": "tool_call",
                                    "index": call.index,
                                    "id": call.id,
                                    "name": call.name,
                                    "arguments": call.arguments_fragment,
                                }
                            )
                        )
                elif event.HasField("finished"):
                    self._push_ids(control_ids(finished_event(event.finished)))
            self._finish()
        except RemoteError as exc:
            log.warning("request_id=%s remote error %s: %s", self.request_id, exc.reason.value, exc.message)
            self._fail(exc)
        except asyncio.CancelledError:
            self._finish()
            raise
        except Exception:
            log.exception("request_id=%s unexpected error reading the sidecar", self.request_id)
            self._fail(RemoteError(Reason.INTERNAL, "internal error in the remote engine"))

    # consumer side ---------------------------------------------------------------
    async def next_step(self) -> codec.Step:
        """Everything pending as one step (EOS last once the stream is over); waits for
        the provider when nothing is pending."""
        self.last_pull = time.monotonic()
        while not self._segments:
            if self.finished:
                return codec.Step([codec.EOS_ID])
            self._available.clear()
            self.consumer_waiting = True  # exo is consuming; the provider is the slow one
            try:
                await self._available.wait()
            finally:
                self.consumer_waiting = False
                self.last_pull = time.monotonic()
        ids: list[int] = []
        room = STEP_MAX_CHARS
        while self._segments and room > 0:
            head = self._segments.popleft()
            if isinstance(head, list):
                ids.extend(head)
                continue
            texts = [head]
            while self._segments and isinstance(following := self._segments[0], str):
                texts.append(following)
                self._segments.popleft()
            text = "".join(texts)
            if len(text) > room:
                self._segments.appendleft(text[room:])
                text = text[:room]
            ids.extend(codec.encode_text(text))
            room -= len(text)
        return codec.Step(ids)

    def cancel(self) -> None:
        """Stop the upstream call; exo gets EOS at its next pull."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._segments.clear()
        self.finished = False
        self._finish()

    @property
    def active(self) -> bool:
        return self._task is not None and not self._task.done()


class RemoteLLMInferenceEngine(InferenceEngine):  # type: ignore[misc,valid-type]
    """exo's engine interface over a sidecar. One shared instance per process."""

    def __init__(
        self,
        target: SidecarTarget | None = None,
        shard_downloader: Any = None,
        idle_timeout_s: float = 60.0,
    ) -> None:
        self.target = target or SidecarTarget.from_env()
        self.client = SidecarClient(self.target)
        self.tokenizer = RemoteTokenizer()
        self.shard: Any = None
        self.shard_downloader = shard_downloader
        self.catalog = RemoteCatalog()
        self.idle_timeout_s = idle_timeout_s
        self._generations: dict[str, _Generation] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self.session: dict[str, Any] = {}

    # --- exo's abstract methods ------------------------------------------------------
    async def encode(self, shard: Any, prompt: str) -> np.ndarray:
        return np.array(codec.encode_text(prompt), dtype=np.int64)

    async def decode(self, shard: Any, tokens: Any) -> str:
        return self.tokenizer.decode(tokens)

    async def sample(self, x: np.ndarray, temp: float = 0.0, top_p: float = 1.0) -> np.ndarray:
        # The next step was chosen by infer_*; sample passes it through (exo gives no request
        # id here). An object array keeps the Step itself for exo's ``.item()``.
        return np.asarray(x).reshape(-1)[-1:]

    async def infer_prompt(
        self, request_id: str, shard: Any, prompt: str, inference_state: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any] | None]:
        await self.ensure_shard(shard)
        old = self._generations.pop(request_id, None)
        if old is not None:
            old.cancel()
        generation = _Generation(request_id, self._build_request(request_id, shard, prompt), self.client)
        self._generations[request_id] = generation
        self._start_watchdog()
        return await self._next(request_id, generation), inference_state

    async def infer_tensor(
        self, request_id: str, shard: Any, input_data: np.ndarray, inference_state: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any] | None]:
        generation = self._generations.get(request_id)
        if generation is None:  # cancelled or unknown: end exo's loop for it
            if self.catalog.models and self.catalog.get(shard.model_id) is None:
                # A local model's layer routed here: exo's ring is not model-aware on some node.
                log.warning(
                    "request_id=%s asked to run a layer of %s, which this node does not serve",
                    request_id,
                    shard.model_id,
                )
            return _as_array(codec.Step([codec.EOS_ID])), inference_state
        return await self._next(request_id, generation), inference_state

    async def load_checkpoint(self, shard: Any, path: str) -> None:
        return None

    async def ensure_shard(self, shard: Any) -> None:
        # exo calls this for every prompt anywhere in the cluster: only our models matter.
        if shard is not None and self.catalog.get(shard.model_id) is not None:
            self.shard = shard

    # --- lifecycle -----------------------------------------------------------------
    async def _next(self, request_id: str, generation: _Generation) -> np.ndarray:
        step = await generation.next_step()
        if step == codec.EOS_ID:
            self._generations.pop(request_id, None)
        return _as_array(step)

    def _build_request(self, request_id: str, shard: Any, prompt: str) -> pb.GenerateRequest | RemoteError:
        alias = self.catalog.alias(shard.model_id)
        model = self.catalog.get(shard.model_id)
        if model is None and self.catalog.models:
            log.warning("request_id=%s asked to run %s, which this node does not serve", request_id, shard.model_id)
            return RemoteError(Reason.MODEL_NOT_FOUND, f"this node does not serve model {shard.model_id!r}")
        if model is not None and not model.ready:
            return RemoteError(
                Reason.MODEL_NOT_READY,
                f"model {shard.model_id!r} is not ready: {model.not_ready_reason or 'unknown reason'}",
            )
        try:
            envelope = PromptEnvelope.loads(prompt)
            return chat_body_to_request(envelope.chat_body(), request_id=request_id, model=alias)
        except RemoteError as exc:
            return exc
        except ValueError as exc:
            return RemoteError(Reason.INVALID_REQUEST, f"malformed prompt envelope: {exc}")

    def cancel(self, request_id: str) -> None:
        """Stop a request's upstream call now (client gone, timeout, max tokens)."""
        generation = self._generations.get(request_id)
        if generation is not None:
            log.info("request_id=%s cancelled upstream", request_id)
            generation.cancel()

    def on_token(self, request_id: str, tokens: list[int], is_finished: bool) -> None:
        """exo's on_token callback: a finished request (EOS or max tokens) frees its stream."""
        if is_finished:
            generation = self._generations.pop(request_id, None)
            if generation is not None and generation.active:
                generation.cancel()

    def _start_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch_idle(), name="remote-engine-watchdog")

    async def _watch_idle(self) -> None:
        """Cancel streams nobody pulls from: exo never says when it stopped consuming."""
        while self._generations:
            await asyncio.sleep(min(5.0, self.idle_timeout_s / 2))
            now = time.monotonic()
            for request_id, generation in list(self._generations.items()):
                if not generation.consumer_waiting and now - generation.last_pull > self.idle_timeout_s:
                    log.warning(
                        "request_id=%s idle for %.0fs, cancelling upstream", request_id, now - generation.last_pull
                    )
                    generation.cancel()
                    self._generations.pop(request_id, None)

    async def refresh_catalog(self, refresh: bool = False) -> RemoteCatalog:
        self.catalog.update(await self.client.list_models(refresh=refresh))
        return self.catalog

    async def health(self) -> bool:
        return await self.client.health()

    async def close(self) -> None:
        for generation in self._generations.values():
            generation.cancel()
        self._generations.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await self.client.close()


def _as_array(step: codec.Step) -> np.ndarray:
    """exo's (1, 1) result holding the step object (int64 would drop the ids it carries)."""
    result = np.empty((1, 1), dtype=object)
    result[0, 0] = step
    return result


_shared: RemoteLLMInferenceEngine | None = None


def shared_engine(shard_downloader: Any = None) -> RemoteLLMInferenceEngine:
    """The process's one engine (exo may ask for an engine more than once)."""
    global _shared
    if _shared is None:
        _shared = RemoteLLMInferenceEngine(shard_downloader=shard_downloader)
    elif shard_downloader is not None and _shared.shard_downloader is None:
        _shared.shard_downloader = shard_downloader
    return _shared
