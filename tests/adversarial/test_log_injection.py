"""Client strings cannot forge or flood the sidecar's log (issue 11, item 6).

A newline in ``request_id`` once wrote a second, forged log line, and a 15 MiB request
id wrote 45 MiB of log. Such ids are now refused before anything logs them (issue 21); the
sidecar's log renders every other argument as one printable, bounded line; messages sent
back to a client that quote its strings are bounded too.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import grpc
import pytest

from exo_remote_engine.sidecar.telemetry.safe_logging import MAX_ARG_CHARS, safe_logger
from tests.conftest import PLANTED_KEY
from tests.support.configs import write_proxy_config
from tests.support.harness import chat_request, raw_generate
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import start_sidecar_process

FORGED_LINE = "2026-01-01 00:00:00,000 INFO exo_remote_engine.sidecar request_id=FORGED start"
HOSTILE_IDS = (
    f"id-1\n{FORGED_LINE}",
    f"id-2\r\n{FORGED_LINE}",
    "id-3\x1b[2J\x1b[1;1H FORGED-ANSI",
    f"id-4\u2028{FORGED_LINE}",
    "id-5-" + "x" * (15 * 1024 * 1024),
)
# Every line the sidecar writes begins with its own timestamp (or LiteLLM's), or is an
# indented traceback line; none begins with anything a client wrote.
LINE_START = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ |\d\d:\d\d:\d\d - |\s)")
MAX_LINE_CHARS = 16 * 1024


@pytest.mark.timeout(120)
async def test_hostile_request_ids_and_model_names_stay_one_bounded_line(
    upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    upstream.scenarios["m"] = Scenario(chunks=["fine"])
    config = write_proxy_config(tmp_path / "c.yaml", upstream.url, ["m"])
    log = tmp_path / "sidecar.log"
    sidecar = await asyncio.to_thread(
        start_sidecar_process,
        config,
        log,
        {"TEST_UPSTREAM_KEY": PLANTED_KEY},
        "127.0.0.1:0",
        ["--log-level", "debug"],
    )
    try:
        for request_id in HOSTILE_IDS:
            # Refused before anything logs or stores it (issue 21): at most 128 printable characters.
            outcome = await raw_generate(sidecar.address, chat_request("m", request_id=request_id), timeout_s=30)
            assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, (outcome.code, outcome.details[:200])
            assert [v.field for v in outcome.error().violations] == ["request_id"]
        outcome = await raw_generate(sidecar.address, chat_request("m", request_id="plain-id-7"), timeout_s=30)
        assert outcome.code is grpc.StatusCode.OK, (outcome.code, outcome.details[:200])
        unknown = chat_request(f"no-such-model\n{FORGED_LINE}" + "y" * 100_000, request_id="id-6")
        outcome = await raw_generate(sidecar.address, unknown, timeout_s=30)
        assert outcome.code is grpc.StatusCode.NOT_FOUND
        assert "\n" not in outcome.details and len(outcome.details) < 2048, "the client's own echo is bounded"
    finally:
        await asyncio.to_thread(sidecar.stop)
    text = log.read_text(errors="replace")
    lines = text.splitlines()
    assert not any("id-1" in line or "id-5-" in line for line in lines), "a refused id is never logged"
    assert any("no-such-model" in line for line in lines), "a hostile model name is logged (escaped: see below)"
    offending = [line[:120] for line in lines if not LINE_START.match(line)]
    assert not offending, f"lines that do not start as the sidecar's own: {offending}"
    assert not [line for line in lines if line.lstrip().startswith(("2026-01-01", "FORGED"))]
    assert max(len(line) for line in lines) <= MAX_LINE_CHARS
    assert len(text) < 1024 * 1024, f"{len(text)} characters of log for six requests"


def test_tracebacks_are_indented_so_an_exception_text_cannot_start_a_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    log = safe_logger("exo_remote_engine.sidecar.test_log_injection")
    try:
        raise ValueError(f"bad\n{FORGED_LINE}")
    except ValueError:
        log.exception("request_id=%s unexpected error", "r\n" + "z" * 100_000)
    (record,) = [r for r in caplog.records if r.name.endswith("test_log_injection")]
    message = record.getMessage()
    assert "\n" not in message and len(message) < MAX_ARG_CHARS + 100
    rendered = caplog.text
    assert "Traceback" in rendered, "the traceback stays, for the operator"
    assert not [line for line in rendered.splitlines() if line.startswith("2026-01-01")]
