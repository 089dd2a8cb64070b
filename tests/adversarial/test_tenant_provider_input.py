"""Nothing a provider or a config can send gives INTERNAL or UNKNOWN (issue 21, item 9).

A provider is another tenant's reach into the key holder: a deployment one node points at
(a discovered server, a shared group) answers every node. On 5b4b1cc a provider 413 was a
KeyError, a tool index of 2**31, an unhashable finish_reason or usage of 2**63 on the
LiteLLM path were INTERNAL, and Retry-After: 1e400 or ``cooldown_time: .inf`` were UNKNOWN;
some were logged as "end code=OK". A property test over upstream statuses and streamed
events, on both transports, checks every outcome is a mapped status and that the servicer
logs the code the client got.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from exo_remote_engine.server import RunningSidecar, SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import ConfigError, load_config
from tests.support.harness import DOCUMENTED_CODES, chat_request, raw_generate
from tests.support.raw_upstream import RawResponse, RawUpstream
from tests.support.transports import TRANSPORTS

T = TypeVar("T")
UNMAPPED = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
HUGE = st.sampled_from([2**31, 2**31 - 1, 2**32, 2**63 - 1, 2**63, 2**64, 10**30])
NUMBER = st.one_of(st.integers(0, 10**6), HUGE, st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5))
TEXT = st.one_of(st.none(), st.text(max_size=20), st.integers(), st.lists(st.integers(), max_size=2))
FINISH = st.one_of(
    st.none(), st.sampled_from(["stop", "length", "tool_calls", "content_filter"]), st.text(max_size=10),
    st.just([]), st.just({}), st.integers(), st.just(["stop"]),
)  # fmt: skip
TOOL_CALL = st.fixed_dictionaries(
    {"index": st.one_of(st.integers(-3, 3), HUGE, st.text(max_size=3), st.none())},
    optional={"id": TEXT, "type": st.just("function"), "function": st.fixed_dictionaries({}, optional={
        "name": TEXT, "arguments": TEXT})},
)  # fmt: skip
USAGE = st.fixed_dictionaries(
    {}, optional={"prompt_tokens": NUMBER, "completion_tokens": NUMBER, "total_tokens": NUMBER,
                  "completion_tokens_details": st.fixed_dictionaries({}, optional={"reasoning_tokens": NUMBER})}
)  # fmt: skip
CHUNK = st.fixed_dictionaries(
    {"id": st.just("c"), "object": st.just("chat.completion.chunk"), "created": st.just(1), "model": st.just("m"),
     "choices": st.lists(st.fixed_dictionaries(
         {"index": st.just(0), "delta": st.fixed_dictionaries({}, optional={
             "role": st.just("assistant"), "content": TEXT, "tool_calls": st.lists(TOOL_CALL, max_size=2)}),
          "finish_reason": FINISH}), max_size=1)},
    optional={"usage": st.one_of(st.none(), USAGE)},
)  # fmt: skip
EVENT = st.one_of(
    CHUNK.map(lambda c: b"data: " + json.dumps(c).encode() + b"\n\n"),
    st.sampled_from([b"data: {not json\n\n", b"data: []\n\n", b": comment\n\n", b'data: "text"\n\n']),
    st.fixed_dictionaries({"error": st.fixed_dictionaries({"message": st.text(max_size=20), "code": NUMBER})}).map(
        lambda e: b"data: " + json.dumps(e).encode() + b"\n\n"
    ),
)
RETRY_AFTER = st.sampled_from(["1e400", "inf", "nan", "-5", "99999999999999999999", "garbage", "0.5", "2",
                               "Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT"])  # fmt: skip
ERROR_BODY = st.sampled_from(
    [
        b"",
        b"{}",
        b"not json",
        b'{"error": {"message": "maximum context length exceeded"}}',
        b'{"error": "flat"}',
        b'{"error": {"message": "bad", "code": 99999999999999999999}}',
    ]
)


@st.composite
def provider_answers(draw: st.DrawFn) -> RawResponse:
    """An HTTP error with odd headers and body, or a 200 stream of hostile events."""
    if draw(st.booleans()):
        status = draw(st.one_of(st.sampled_from([400, 401, 403, 404, 408, 413, 422, 429, 500, 503, 529]),
                                st.integers(400, 599)))  # fmt: skip
        headers = {"Retry-After": draw(RETRY_AFTER)} if draw(st.booleans()) else {}
        return RawResponse(status, headers, draw(ERROR_BODY))
    events = draw(st.lists(EVENT, max_size=6))
    return RawResponse(200, {}, b"".join(events) + (b"data: [DONE]\n\n" if draw(st.booleans()) else b""))


class _Background:
    """An event loop in a thread, so that synchronous hypothesis examples can await."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class _EndLines(logging.Handler):
    """The servicer's ``end code=...`` line of each request id."""

    def __init__(self) -> None:
        super().__init__()
        self.codes: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " end code=" in message and message.startswith("request_id="):
            request_id = message.split()[0].removeprefix("request_id=")
            self.codes[request_id] = message.split(" end code=")[1].split()[0]


@pytest.fixture
def ends() -> Iterator[_EndLines]:
    handler = _EndLines()
    logger = logging.getLogger("exo_remote_engine.sidecar")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_provider_answer_gives_internal_or_unknown(
    transport: str, tmp_path: Path, ends: _EndLines, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream-test-key-000000")
    background = _Background()
    upstream = background.run(RawUpstream().__aenter__())
    config = tmp_path / "c.yaml"
    config.write_text(
        "model_list:\n  - model_name: m\n    litellm_params:\n      model: openai/m\n"
        f"      api_base: {upstream.url}/v1\n      api_key: os.environ/TEST_UPSTREAM_KEY\n"
        "exo_remote_settings:\n  num_retries: 0\n"
    )
    settings_ = SidecarSettings(listen="127.0.0.1:0", openai_fast_path=transport == "direct", accounting=False)
    sidecar: RunningSidecar = background.run(start_sidecar(settings_, load_config(config)))
    ids = itertools.count()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(answer=provider_answers())
    @example(answer=RawResponse(413, {}, b'{"error": {"message": "request entity too large"}}'))
    @example(answer=RawResponse(429, {"Retry-After": "1e400"}, b"{}"))
    @example(answer=RawResponse(503, {"retry-after-ms": "nan"}, b"{}"))
    @example(answer=RawResponse(200, {}, _events({"tool_calls": [{"index": 2**31, "function": {"name": "f"}}]})))
    @example(answer=RawResponse(200, {}, _events({"content": "x"}, finish=["stop"])))
    @example(answer=RawResponse(200, {}, _events({"content": "x"}, finish="stop", usage=2**63)))
    def run(answer: RawResponse) -> None:
        upstream.response = answer
        request_id = f"p-{transport}-{next(ids)}"
        got = background.run(raw_generate(sidecar.address, chat_request("m", request_id=request_id), 30))
        where = f"{got.code.name} {got.details[:200]!r} for {answer!r:.400}"
        assert got.code not in UNMAPPED and got.code in DOCUMENTED_CODES, where
        background.run(asyncio.sleep(0))  # the servicer's last log line is written after the status
        logged = ends.codes.get(request_id)
        assert logged == got.code.name, f"the servicer logged end code={logged}: {where}"

    try:
        run()
    finally:
        background.run(sidecar.stop(grace_s=None))
        background.run(upstream.__aexit__(None, None, None))
        background.close()


def _events(delta: dict[str, Any], finish: Any = None, usage: int | None = None) -> bytes:
    chunk: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    if usage is not None:
        chunk["usage"] = {"prompt_tokens": usage, "completion_tokens": 1, "total_tokens": usage}
    return b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"


@pytest.mark.parametrize("value", [".inf", "1e400", "-1", "86401"])
def test_a_cooldown_time_the_router_cannot_use_is_a_startup_error(tmp_path: Path, value: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "model_list:\n  - model_name: m\n    litellm_params: {model: openai/m, api_base: 'http://127.0.0.1:9/v1'}\n"
        f"router_settings:\n  cooldown_time: {value}\n"
    )
    with pytest.raises(ConfigError, match="cooldown_time must be a number of seconds from 0 to 86400"):
        load_config(config)
