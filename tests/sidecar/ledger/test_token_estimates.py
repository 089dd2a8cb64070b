"""Token estimates and bounds (sidecar/ledger/token_estimates.py) against a real tokenizer:
LiteLLM's bundled cl100k_base (offline), the one OpenAI's gpt-4 family counts with."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litellm.litellm_core_utils.default_encoding import encoding

from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.ledger.token_estimates import (
    estimate_text_tokens,
    implausible_usage,
    prompt_bound,
    prompt_estimate,
)
from tests.support.harness import chat_request

SAMPLES = {
    "chinese": "敏捷的棕色狐狸跳过了懒狗。人工智能正在改变我们的世界，每个人都应该了解它的基本原理。",
    "japanese": "素早い茶色の狐がのろまな犬を飛び越えた。東京は日本の首都です。",
    "korean": "빠른 갈색 여우가 게으른 개를 뛰어넘었다. 서울은 대한민국의 수도입니다.",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "thai": "สุนัขจิ้งจอกสีน้ำตาลกระโดดข้ามสุนัขขี้เกียจ",
    "emoji": "👋🌍🚀✨🎉" * 4,
}


def tokens(text: str) -> int:
    return len(encoding.encode(text, disallowed_special=()))


@pytest.mark.parametrize("language", sorted(SAMPLES))
def test_non_latin_text_is_never_estimated_below_the_tokenizer(language: str) -> None:
    text = SAMPLES[language]
    assert estimate_text_tokens(text) >= tokens(text), (estimate_text_tokens(text), tokens(text))
    assert estimate_text_tokens(text) >= len(text) // 2, "never 4 characters a token"


def test_cjk_is_a_token_per_character_or_more() -> None:
    assert estimate_text_tokens("你好世界" * 50) >= 200
    assert estimate_text_tokens("English prose, four characters a token") == 10


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_the_prompt_bound_is_never_below_the_tokenizer_nor_the_estimate(text: str) -> None:
    request = chat_request("m", text)
    assert prompt_bound(request) >= tokens(text) + 7  # 7: OpenAI's template tokens for one message
    assert prompt_bound(request) >= prompt_estimate(request) >= estimate_text_tokens(text)


def test_tools_images_and_tool_calls_count_toward_the_prompt() -> None:
    plain = chat_request("m", "hi")
    rich = chat_request(
        "m", "hi", tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    )
    rich.messages[0].content.append(pb.ContentPart(image_url=pb.ImageUrl(url="https://example.com/a.png")))
    rich.messages.append(
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id="c1", name="lookup", arguments_json='{"q": 1}')])
    )
    assert prompt_bound(rich) > prompt_bound(plain) + 3000
    assert prompt_estimate(rich) > prompt_estimate(plain) + 3000


@pytest.mark.parametrize(
    ("usage", "problem"),
    [
        (pb.Usage(prompt_tokens=10, completion_tokens=5), None),
        (pb.Usage(prompt_tokens=-5, completion_tokens=10), "prompt_tokens is negative (-5)"),
        (pb.Usage(completion_tokens=-1), "completion_tokens is negative (-1)"),
        (pb.Usage(prompt_tokens=10**15), "prompt_tokens is absurd"),
        (pb.Usage(cached_prompt_tokens=-3), "cached_prompt_tokens is negative (-3)"),
    ],
)
def test_impossible_usage_is_named(usage: pb.Usage, problem: str | None) -> None:
    found = implausible_usage(usage)
    assert found == problem if problem is None else (found is not None and found.startswith(problem))
