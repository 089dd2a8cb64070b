"""A tool schema nested 500 levels deep is INVALID_ARGUMENT, not INTERNAL (issue 11, item 8).

It once raised RecursionError in the sidecar's own validation: INTERNAL for the client and
a 30 KB traceback in the log. The depth is now checked iteratively against a limit.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest

from exo_remote_engine.contract.openai_chat import MAX_SCHEMA_DEPTH
from exo_remote_engine.generated import remote_inference_pb2 as pb
from tests.support.harness import EXCEPTION_REPR, chat_request, raw_generate
from tests.support.openai_upstream import OpenAIUpstream


def _nested_properties(depth: int) -> str:
    """JSON text of an object schema whose properties nest ``depth`` times (written as
    text: json.dumps itself would recurse)."""
    return '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}' + "}}" * depth


def _with_schema(text: str) -> pb.GenerateRequest:
    request = chat_request("m", request_id="deep")
    request.tools.append(pb.ToolDefinition(name="f", parameters_json_schema=text))
    return request


DEEP_SCHEMAS = {
    "properties-500": _nested_properties(500),
    "arrays-500": "[" * 500 + "]" * 500,
    "object-in-arrays-100000": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
}


@pytest.mark.parametrize("name", list(DEEP_SCHEMAS))
async def test_deep_tool_schema_is_invalid_argument_without_a_traceback(
    upstream: OpenAIUpstream, sidecar_for: Any, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    caplog.set_level(logging.DEBUG)
    sidecar = await sidecar_for(upstream, "m")
    outcome = await raw_generate(sidecar.address, _with_schema(DEEP_SCHEMAS[name]))
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, (outcome.code, outcome.details)
    error = outcome.error()
    assert error.violations and error.violations[0].field == "tools[0].parameters_json_schema", error
    # A top-level array is refused for not being an object, before its depth is looked at.
    reason = "must be a JSON object" if name == "arrays-500" else f"deeper than {MAX_SCHEMA_DEPTH} levels"
    assert reason in error.message, error.message
    ours = [r for r in caplog.records if r.name.startswith("exo_remote_engine")]
    assert ours, "the sidecar logged the refusal"
    assert not [r for r in ours if r.exc_info or r.exc_text or "Recursion" in r.getMessage()]
    assert not EXCEPTION_REPR.search(outcome.details)
    assert not upstream.requests, "nothing reached the provider"


async def test_a_schema_at_the_depth_limit_still_reaches_the_provider(
    upstream: OpenAIUpstream, sidecar_for: Any
) -> None:
    sidecar = await sidecar_for(upstream, "m")
    # _nested_properties(n) is 2n + 1 levels of JSON containers deep at most.
    outcome = await raw_generate(sidecar.address, _with_schema(_nested_properties(MAX_SCHEMA_DEPTH // 2 - 1)))
    assert outcome.code is grpc.StatusCode.OK, outcome.details
    assert len(upstream.requests) == 1
