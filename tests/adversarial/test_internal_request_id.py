"""An INTERNAL error names the request id the README tells operators to look up, while the
secret in the unexpected exception stays out of the status and the log."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import grpc
import pytest

from exo_remote_engine.contract.errors import Reason
from tests.conftest import PLANTED_KEY
from tests.support.harness import assert_no_key, chat_request, raw_generate
from tests.support.openai_upstream import OpenAIUpstream


@pytest.mark.timeout(30)
async def test_internal_error_shows_the_real_request_id(
    upstream: OpenAIUpstream, sidecar_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sidecar = await sidecar_for(upstream, "m")

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"a bug holding the key {PLANTED_KEY}")

    sidecar.servicer.backend.generate = broken  # anything unexpected inside the servicer
    for request_id in (str(uuid.uuid4()), "exo-" + uuid.uuid4().hex + uuid.uuid4().hex):
        outcome = await raw_generate(sidecar.address, chat_request("m", request_id=request_id))
        assert outcome.code == grpc.StatusCode.INTERNAL
        assert outcome.error().reason is Reason.INTERNAL
        assert request_id in outcome.details, f"the id operators look up is gone: {outcome.details!r}"
        assert "[REDACTED]" not in outcome.details
        logged = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
        assert logged, "the sidecar log names the request id too"
    assert "a bug holding the key" in caplog.text, "the cause is in the log (as a traceback)"
    assert_no_key(caplog.text, *(r.getMessage() for r in caplog.records), where="the sidecar log")
