"""``exo-remote chat`` ends the reply's line before its ``[finish ...]`` summary (issue #27),
run as the installed console script with stdout and stderr on one pipe, as ``2>&1 | less``
or a CI log shows them, against a real sidecar and upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.openai_upstream import OpenAIUpstream, Scenario

BIN = Path(sys.executable).parent


async def _chat_output(sidecar_address: str, model: str) -> str:
    """What a reader of one pipe carrying both stdout and stderr sees (Python's default
    buffering: a pipe's stdout is block-buffered, stderr is not)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXO_REMOTE_") and k != "PYTHONUNBUFFERED"}
    process = await asyncio.create_subprocess_exec(
        str(BIN / "exo-remote"),
        "--sidecar",
        sidecar_address,
        "chat",
        "--model",
        model,
        "hi",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, out
    return out.decode()


@pytest.mark.timeout(90)
async def test_chat_summary_is_on_its_own_line(upstream: OpenAIUpstream, sidecar_for: Callable[..., Any]) -> None:
    upstream.scenarios["bare"] = Scenario(chunks=["no newline ", "at the end"])
    upstream.scenarios["ended"] = Scenario(chunks=["ends with ", "a newline\n"])
    sidecar = await sidecar_for(upstream, "bare", "ended")
    bare = await _chat_output(sidecar.address, "bare")
    assert bare.splitlines()[0] == "no newline at the end", bare
    assert bare.splitlines()[1].startswith("[bare -> ") and "finish_reason=stop" in bare, bare
    ended = await _chat_output(sidecar.address, "ended")
    assert ended.splitlines()[:2] == ["ends with a newline", ended.splitlines()[1]], ended
    assert ended.splitlines()[1].startswith("[ended -> "), "no blank line when the reply ended its own line"
