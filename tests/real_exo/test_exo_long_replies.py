"""Long non-Latin replies through real classic exo at its default flags (issue #22, section 3).

exo stops a request after ``--max-generate-tokens`` loop turns (default 10,000). The
remote engine hands exo one turn per pending provider delta (a codec step), never one per
few characters, so a 20,000-character Chinese reply arrives whole with finish "stop";
when exo does stop early (a small limit), the provider call is cancelled. Skipped with the
reason when EXO_SRC is not set."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import PLANTED_KEY
from tests.support.configs import write_proxy_config
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import ExoNode, exo_skip_reason, start_lone_exo_node, start_sidecar_process

pytestmark = [pytest.mark.exo, pytest.mark.skipif(exo_skip_reason() is not None, reason=str(exo_skip_reason()))]

# 20,000 CJK characters in 4-character deltas (distinct: LiteLLM aborts on 100 identical ones).
CJK = ["".join(chr(0x4E00 + (4 * i + j) % 20_000) for j in range(4)) for i in range(5_000)]
# Emoji (astral, ZWJ sequences), Hebrew and Arabic: several code points per visible glyph.
MIXED = [f"שלום 👨‍👩‍👧 مرحبا {i} 🇯🇵 " for i in range(1_000)]
SLOW = [f"字{i} " for i in range(2_000)]
EARLY_STOP_TURNS = 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("exo-long")
    scenarios = {
        "cjk-model": Scenario(chunks=CJK),
        "mixed-model": Scenario(chunks=MIXED),
        "slow-model": Scenario(chunks=SLOW, interval_s=0.02),
    }
    with OpenAIUpstream.in_thread(scenarios=scenarios) as upstream:
        config = write_proxy_config(workdir / "config.yaml", upstream.url, list(scenarios))
        sidecar = start_sidecar_process(config, workdir / "sidecar.log", env={"TEST_UPSTREAM_KEY": PLANTED_KEY})
        nodes: list[ExoNode] = []
        try:
            # exo's defaults: no --max-generate-tokens (10,000), no --chatgpt-api-response-timeout.
            nodes.append(start_lone_exo_node(workdir, "d", sidecar.address, wait_models=list(scenarios)))
            yield {"upstream": upstream, "node": nodes[0], "workdir": workdir, "sidecar": sidecar}
        finally:
            for node in nodes:
                node.stop()
            sidecar.stop()


def _client(node: ExoNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.api}/v1", api_key="unused", max_retries=0, timeout=120)


def test_20000_chinese_characters_arrive_whole_streamed_and_not(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    expected = "".join(CJK)
    assert len(expected) == 20_000
    chunks = list(
        _client(node).chat.completions.create(
            model="cjk-model", messages=[{"role": "user", "content": "写两万字"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert (len(text), finishes) == (20_000, ["stop"])
    assert text == expected
    reply = _client(node).chat.completions.create(model="cjk-model", messages=[{"role": "user", "content": "再来"}])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == expected


def test_mixed_emoji_hebrew_arabic_reply_arrives_whole(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    expected = "".join(MIXED)
    reply = _client(node).chat.completions.create(model="mixed-model", messages=[{"role": "user", "content": "mix"}])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == expected, f"{len(reply.choices[0].message.content or '')} chars"


def test_exo_stopping_early_cancels_the_provider_call(stack: dict[str, Any]) -> None:
    """A node run with a small --max-generate-tokens ends the reply with "length" and the
    provider stops generating (and billing) at once."""
    upstream: OpenAIUpstream = stack["upstream"]
    node = start_lone_exo_node(
        stack["workdir"],
        "small",
        stack["sidecar"].address,
        wait_models=["slow-model"],
        extra_args=["--max-generate-tokens", str(EARLY_STOP_TURNS)],
    )
    try:
        upstream.clear()
        reply = _client(node).chat.completions.create(model="slow-model", messages=[{"role": "user", "content": "go"}])
        assert reply.choices[0].finish_reason == "length"
        content = reply.choices[0].message.content or ""
        assert content and "".join(SLOW).startswith(content), "what arrived is the start of the reply, in order"
        record = upstream.wait_closed_sync("slow-model", timeout=10)
        assert record.client_disconnected, "the sidecar hung up on the provider"
        assert record.chunks_written < len(SLOW) // 2, record
    finally:
        node.stop()


def test_start_up_line_names_the_ready_models(stack: dict[str, Any]) -> None:
    """One short line (issue #27), not every id the sidecar lists."""
    node: ExoNode = stack["node"]
    lines = [line for line in node.log_text().splitlines() if line.startswith("exo-remote: sidecar ")]
    prefix = f"exo-remote: sidecar {stack['sidecar'].address} serves 3 ready models: "
    assert len(lines) == 1 and lines[0].startswith(prefix), lines
    named = lines[0][len(prefix) :].replace(" (default)", "").split(", ")
    assert sorted(named) == ["cjk-model", "mixed-model", "slow-model"], lines
    assert "(default)" in lines[0] and "not ready" not in lines[0]
