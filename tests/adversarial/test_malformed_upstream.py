"""A malformed stream event ends the stream the same way on both transports: UNAVAILABLE
with reason PROVIDER_UNAVAILABLE (README error table), the cause in the sidecar log
(redacted), never INTERNAL. The deltas before it still arrive."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest

from exo_remote_engine.contract.errors import Reason
from tests.conftest import PLANTED_KEY
from tests.support.harness import assert_no_key, chat_request, raw_generate
from tests.support.openai_upstream import OpenAIUpstream, Scenario

# Bodies LiteLLM refuses (it answers UNAVAILABLE); the direct reader said INTERNAL.
MALFORMED: dict[str, bytes] = {
    "choices-not-a-list": b'data: {"choices": "x"}\n\n',
    "choice-null": b'data: {"choices": [null]}\n\n',
    "delta-not-an-object": b'data: {"choices": [{"index": 0, "delta": "oops"}]}\n\n',
    "usage-not-numbers": b'data: {"choices": [], "usage": {"prompt_tokens": "abc", "completion_tokens": 1}}\n\n',
    "json-list": b"data: [1, 2]\n\n",
    "not-json": b"data: {not json " + PLANTED_KEY.encode() + b"\n\n",
}
# Bodies LiteLLM tolerates (the stream completes; a non-string content is dropped, a
# number as model is ignored); the direct reader refuses them like the malformed ones.
ODD: dict[str, bytes] = {
    "content-a-number": b'data: {"choices": [{"index": 0, "delta": {"content": 5}}]}\n\n',
    "usage-a-number": b'data: {"choices": [], "usage": 5}\n\n',
    "tool-call-a-number": b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [5]}}]}\n\n',
    "model-a-number": b'data: {"model": 5, "choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n',
}


def _scenario(body: bytes) -> Scenario:
    return Scenario(chunks=["first", " second"], flood=body, flood_count=1)


@pytest.mark.timeout(60)
async def test_malformed_events_are_provider_unavailable_with_the_cause_logged(
    transport: str, sidecar_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with OpenAIUpstream({name: _scenario(body) for name, body in MALFORMED.items()}) as upstream:
        sidecar = await sidecar_for(upstream, *MALFORMED)
        for name in MALFORMED:
            request_id = f"malformed-{transport}-{name}"
            outcome = await raw_generate(sidecar.address, chat_request(name, request_id=request_id))
            assert outcome.code == grpc.StatusCode.UNAVAILABLE, (name, outcome.code, outcome.details)
            assert outcome.error().reason is Reason.PROVIDER_UNAVAILABLE, name
            assert "".join(e.delta.text for e in outcome.events) == "first", name
            causes = [
                r.getMessage()
                for r in caplog.records
                if r.levelno >= logging.WARNING and request_id in r.getMessage() and "cause" in r.getMessage()
            ]
            assert causes, f"{name}: no log line with the cause of the failure"
            assert_no_key(outcome.details, *causes, where=f"{name}: the status or the logged cause")


@pytest.mark.timeout(60)
async def test_odd_events_are_never_internal(transport: str, sidecar_for: Any) -> None:
    async with OpenAIUpstream({name: _scenario(body) for name, body in ODD.items()}) as upstream:
        sidecar = await sidecar_for(upstream, *ODD)
        for name in ODD:
            outcome = await raw_generate(sidecar.address, chat_request(name))
            text = "".join(e.delta.text for e in outcome.events)
            if transport == "direct":
                assert outcome.code == grpc.StatusCode.UNAVAILABLE, (name, outcome.code, outcome.details)
                assert outcome.error().reason is Reason.PROVIDER_UNAVAILABLE, name
                assert text == "first", (name, text)
            else:
                assert outcome.code == grpc.StatusCode.OK, (name, outcome.code, outcome.details)
                assert text == ("firstx second" if name == "model-a-number" else "first second"), (name, text)
