"""Contract tests: drive RemoteLLMInferenceEngine exactly the way exo's node does
(infer_prompt, sample, EOS check, forwarded ids into infer_tensor, on_token callbacks),
against a real sidecar process and a real upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exo_remote_engine.engine import codec
from exo_remote_engine.engine.connection.target import RetryPolicy, SidecarTarget
from exo_remote_engine.engine.tokenizer import RemoteTokenizer
from exo_remote_engine.engine_adapter import RemoteLLMInferenceEngine
from tests.conftest import PLANTED_KEY
from tests.support.configs import write_proxy_config
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import SidecarProcess, free_port, start_sidecar_process

SLOW_CHUNKS = [f"t{i} " for i in range(3000)]
STORY = ["Once ", "upon a time, ", "a 🦊 met ", "a 狐狸."]
# 20,000 CJK characters in 4-character deltas (distinct: LiteLLM aborts on 100 identical ones).
CJK_CHUNKS = ["".join(chr(0x4E00 + (4 * i + j) % 20_000) for j in range(4)) for i in range(5_000)]


@dataclass(frozen=True)
class Shard:  # the fields exo's Shard has
    model_id: str
    start_layer: int = 0
    end_layer: int = 0
    n_layers: int = 1

    def is_first_layer(self) -> bool:
        return self.start_layer == 0

    def is_last_layer(self) -> bool:
        return self.end_layer == self.n_layers - 1


@pytest.fixture(scope="module")
def upstream_thread() -> Iterator[OpenAIUpstream]:
    scenarios = {
        "story": Scenario(chunks=STORY, usage=(9, 4)),
        "cjk": Scenario(chunks=CJK_CHUNKS),
        # Distinct chunks: LiteLLM aborts a stream after 100 identical ones.
        "slow": Scenario(chunks=SLOW_CHUNKS, interval_s=0.01),
        "limited": Scenario(status=429, retry_after="0", error_message=f"slow down {PLANTED_KEY}"),
    }
    with OpenAIUpstream.in_thread(scenarios=scenarios) as up:
        yield up


@pytest.fixture(scope="module")
def sidecar_process(
    upstream_thread: OpenAIUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    workdir = tmp_path_factory.mktemp("engine")
    aliases = ["story", "slow", "limited", "echo", "cjk"]
    config = write_proxy_config(workdir / "config.yaml", upstream_thread.url, aliases)
    sidecar = start_sidecar_process(config, workdir / "sidecar.log", env={"TEST_UPSTREAM_KEY": PLANTED_KEY})
    yield sidecar
    sidecar.stop()


@pytest.fixture
async def engine(sidecar_process: SidecarProcess) -> AsyncIterator[RemoteLLMInferenceEngine]:
    eng = RemoteLLMInferenceEngine(SidecarTarget(address=sidecar_process.address), idle_timeout_s=1.0)
    await eng.refresh_catalog()
    yield eng
    await eng.close()


def _prompt(text: str, **params: Any) -> str:
    # What exo's API does: its own tokenizer instance builds the prompt string.
    prompt = RemoteTokenizer().apply_chat_template([{"role": "user", "content": text}], params=params)
    assert isinstance(prompt, str)
    return prompt


async def drive(
    engine: RemoteLLMInferenceEngine,
    request_id: str,
    shard: Shard,
    prompt: str,
    max_tokens: int = 10_000,
    pause_after: int | None = None,
) -> list[int]:
    """exo's Node.process_prompt / process_inference_result loop for a one-node ring:
    returns exo's buffer (one item per loop turn, as exo appends ``token.item()``)."""
    result, state = await engine.infer_prompt(request_id, shard, prompt, {})
    ids: list[int] = []
    while True:
        token = await engine.sample(result, temp=0.0)
        await engine.ensure_shard(shard)
        ids.append(token.item())
        finished = ids[-1] == engine.tokenizer.eos_token_id or len(ids) >= max_tokens
        engine.on_token(request_id, [ids[-1]], finished)
        if finished or (pause_after is not None and len(ids) >= pause_after):
            return ids
        result, state = await engine.infer_tensor(request_id, shard, token.reshape(1, -1), state)


def _events(ids: list[int]) -> tuple[str, list[dict[str, Any]]]:
    pieces = codec.StreamDecoder().feed(ids)
    text = "".join(p for p in pieces if isinstance(p, str))
    return text, [json.loads(p) for p in pieces if isinstance(p, bytes)]


async def test_ids_decode_in_another_tokenizer_instance_with_eos_last(engine: RemoteLLMInferenceEngine) -> None:
    steps = await drive(engine, "r1", Shard("story"), _prompt("Tell me a story"))
    assert steps[-1] == codec.EOS_ID != 0
    ids = codec.expand(steps)  # what a peer receives
    assert ids[-1] == codec.EOS_ID and ids.count(codec.EOS_ID) == 1
    assert all(type(i) is int for i in ids)
    expected = "Once upon a time, a 🦊 met a 狐狸."
    assert RemoteTokenizer().decode(ids) == expected, "a second instance decodes the same text"
    assert RemoteTokenizer().decode(np.array(ids)) == expected
    assert RemoteTokenizer().decode(steps) == expected, "exo's own buffer (the TUI) decodes too"
    text, events = _events(ids)
    assert text == expected
    assert events == [
        {
            "type": "finished",
            "finish_reason": "stop",
            "model": "story",
            "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
        }
    ]
    assert len(steps) <= len(STORY) + 2, "at most one loop turn per delta, plus finish and EOS"
    boundaries = {"".join(STORY[:n]) for n in range(len(STORY) + 1)}
    for n in range(1, len(steps) + 1):
        assert RemoteTokenizer().decode(steps[:n]) in boundaries, "a turn carries whole deltas"
    assert not engine._generations, "a finished request leaves nothing behind"


async def test_20000_cjk_characters_fit_exo_default_token_budget(engine: RemoteLLMInferenceEngine) -> None:
    """exo's default --max-generate-tokens (10,000) counts loop turns: a turn per delta (or
    more), never per character, so 20,000 characters in 5,000 deltas end with EOS."""
    steps = await drive(engine, "r8", Shard("cjk"), _prompt("write"), max_tokens=10_000)
    assert steps[-1] == codec.EOS_ID, f"cut after {len(steps)} turns"
    assert len(steps) <= len(CJK_CHUNKS) + 2
    text, events = _events(codec.expand(steps))
    assert text == "".join(CJK_CHUNKS) and len(text) == 20_000
    assert events[-1]["finish_reason"] == "stop"


async def test_a_backlog_goes_to_exo_in_one_turn(engine: RemoteLLMInferenceEngine) -> None:
    """When the provider is ahead of exo's loop, the next turn carries everything pending."""
    result, _ = await engine.infer_prompt("r9", Shard("story"), _prompt("Tell me a story"), {})
    turns = [(await engine.sample(result)).item()]
    generation = engine._generations.get("r9")
    if generation is not None:  # the first turn left before the whole reply had arrived
        assert generation._task is not None and turns[0] != codec.EOS_ID
        await asyncio.wait_for(asyncio.shield(generation._task), timeout=30)  # the stream is all read
        result, _ = await engine.infer_tensor("r9", Shard("story"), np.array([[turns[0]]], dtype=object))
        turns.append((await engine.sample(result)).item())
    # Otherwise the whole reply was already there for the first turn (a session message can
    # carry it all on a loaded box): then that turn alone carries it.
    assert turns[-1] == codec.EOS_ID, "the rest, the finish event and EOS in one turn"
    text, events = _events(codec.expand(turns))
    assert text == "".join(STORY) and [e["type"] for e in events] == ["finished"]


async def test_parameters_from_the_envelope_reach_the_provider(
    engine: RemoteLLMInferenceEngine, upstream_thread: OpenAIUpstream
) -> None:
    await drive(engine, "r2", Shard("echo"), _prompt("hi", max_tokens=7, stop=["x"], temperature=0.2))
    sent = upstream_thread.requests_for("echo")[-1].body
    assert sent is not None and (sent["max_tokens"], sent["stop"], sent["temperature"]) == (7, ["x"], 0.2)


async def test_exo_max_tokens_finish_cancels_the_upstream(
    engine: RemoteLLMInferenceEngine, upstream_thread: OpenAIUpstream
) -> None:
    upstream_thread.clear()  # the module's upstream: an earlier test's "slow" stream is not this one
    ids = await drive(engine, "r3", Shard("slow"), _prompt("go"), max_tokens=5)
    stopped = time.monotonic()
    assert len(ids) == 5 and codec.EOS_ID not in codec.expand(ids)
    record = await asyncio.to_thread(upstream_thread.wait_closed_sync, "slow", 15)
    # Promptly: the stream would run 30 s; 5 s is a loaded box's margin.
    assert record.client_disconnected and record.ended_at - stopped < 5.0, record


async def test_a_request_nobody_pulls_is_cancelled_by_the_watchdog(
    engine: RemoteLLMInferenceEngine, upstream_thread: OpenAIUpstream
) -> None:
    upstream_thread.clear()  # the module's upstream: an earlier test's "slow" stream is not this one
    await drive(engine, "r4", Shard("slow"), _prompt("go"), pause_after=3)  # exo stops calling
    record = await asyncio.to_thread(upstream_thread.wait_closed_sync, "slow", 10)
    assert record.client_disconnected
    result, _ = await engine.infer_tensor("r4", Shard("slow"), np.array([[5]]))
    assert int(result.item()) == codec.EOS_ID, "a late pull ends exo's loop cleanly"


async def test_provider_error_before_first_delta_becomes_an_error_event(engine: RemoteLLMInferenceEngine) -> None:
    started = time.monotonic()
    ids = await drive(engine, "r5", Shard("limited"), _prompt("x"))
    text, events = _events(ids)
    assert text == "" and ids[-1] == codec.EOS_ID
    assert events[-1]["type"] == "error" and events[-1]["reason"] == "RATE_LIMITED" and events[-1]["status"] == 429
    assert PLANTED_KEY not in json.dumps(events)
    assert time.monotonic() - started < 15, "retries are bounded"


async def test_unavailable_sidecar_is_retried_then_reported() -> None:
    target = SidecarTarget(address=f"127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=3, max_total_s=3))
    eng = RemoteLLMInferenceEngine(target)
    try:
        started = time.monotonic()
        ids = await drive(eng, "r6", Shard("story"), _prompt("x"))
        _, events = _events(ids)
        assert events[-1]["reason"] == "SIDECAR_UNAVAILABLE" and events[-1]["status"] == 503
        assert time.monotonic() - started < 10
    finally:
        await eng.close()


async def test_sidecar_killed_mid_stream_ends_the_request_without_duplicates(
    upstream_thread: OpenAIUpstream, tmp_path: Path
) -> None:
    config = write_proxy_config(tmp_path / "c.yaml", upstream_thread.url, ["slow"])
    sidecar = start_sidecar_process(config, tmp_path / "s.log", env={"TEST_UPSTREAM_KEY": PLANTED_KEY})
    eng = RemoteLLMInferenceEngine(SidecarTarget(address=sidecar.address))
    try:
        ids = await drive(eng, "r7", Shard("slow"), _prompt("go"), pause_after=20)
        os.kill(sidecar.process.pid, signal.SIGKILL)
        while ids[-1] != codec.EOS_ID:
            result, _ = await eng.infer_tensor("r7", Shard("slow"), np.array([[ids[-1]]]))
            ids.append(result.item())
        text, events = _events(codec.expand(ids))
        assert text and "".join(SLOW_CHUNKS).startswith(text), "in order, nothing repeated or lost"
        assert events[-1]["type"] == "error" and events[-1]["reason"] in ("SIDECAR_UNAVAILABLE", "CANCELLED")
    finally:
        await eng.close()
        sidecar.stop()


async def test_a_backlog_over_the_step_limit_is_split_in_order_without_loss() -> None:
    """A step carries at most STEP_MAX_CHARS characters (one bounded SendResult message);
    a larger backlog takes more turns, nothing lost or reordered, deltas joined."""
    from exo_remote_engine.contract.errors import Reason, RemoteError
    from exo_remote_engine.engine_adapter import STEP_MAX_CHARS, _Generation

    generation = _Generation("b1", RemoteError(Reason.INTERNAL, "no upstream in this test"), client=None)  # type: ignore[arg-type]
    generation._segments.clear()
    generation.finished = False
    for chunk in CJK_CHUNKS:  # 20,000 characters waiting when exo pulls
        generation._push_text(chunk)
    generation._push_ids(codec.encode_control(b'{"type":"finished"}'))
    generation._finish()
    first, second = await generation.next_step(), await generation.next_step()
    assert first == codec.STEP_ID and second == codec.EOS_ID
    assert len(codec.decode_ids([first])) == STEP_MAX_CHARS
    assert codec.StreamDecoder().feed([first, second]) == ["".join(CJK_CHUNKS), b'{"type":"finished"}']
