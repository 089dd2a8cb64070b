"""The hosted providers discovery lists, one declarative :class:`ProviderSpec` each."""

from __future__ import annotations

import re
from typing import Final

from exo_remote_engine.sidecar.discovery.parsers.hosted import (
    parse_anthropic,
    parse_gemini,
    parse_groq,
    parse_ids,
    parse_mistral,
    parse_openrouter,
    parse_together,
)
from exo_remote_engine.sidecar.discovery.types import ProviderSpec


def gemini_base(base: str) -> str:
    """LiteLLM calls ``{GEMINI_API_BASE}/models/<model>:generateContent``: the base carries
    the API version. A base without one gets ``/v1beta`` (for both listing and calls)."""
    base = base.rstrip("/")
    return base if re.search(r"/v1(?:beta|alpha)?\d*$", base) else base + "/v1beta"


def anthropic_base(base: str) -> str:
    """LiteLLM appends ``/v1/messages`` to ``ANTHROPIC_API_BASE``: keep the root."""
    base = base.rstrip("/")
    for suffix in ("/v1/messages", "/v1"):
        base = base.removesuffix(suffix)
    return base


PROVIDERS: Final[tuple[ProviderSpec, ...]] = (
    ProviderSpec(
        name="openai",
        key_envs=("OPENAI_API_KEY",),
        base_env="OPENAI_API_BASE",
        default_base="https://api.openai.com/v1",
        list_path="/models",
        auth="bearer",
        paging="none",
        parse=parse_ids,
        map_bare_keys=True,
    ),
    ProviderSpec(
        name="anthropic",
        key_envs=("ANTHROPIC_API_KEY",),
        base_env="ANTHROPIC_API_BASE",
        default_base="https://api.anthropic.com",
        list_path="/v1/models",
        auth="anthropic",
        paging="anthropic",
        parse=parse_anthropic,
        normalize_base=anthropic_base,
        map_bare_keys=True,
    ),
    ProviderSpec(
        name="gemini",
        key_envs=("GEMINI_API_KEY", "GOOGLE_API_KEY"),
        base_env="GEMINI_API_BASE",
        default_base="https://generativelanguage.googleapis.com/v1beta",
        list_path="/models",
        auth="gemini",
        paging="gemini",
        parse=parse_gemini,
        normalize_base=gemini_base,
    ),
    ProviderSpec(
        name="mistral",
        key_envs=("MISTRAL_API_KEY",),
        base_env="MISTRAL_API_BASE",
        default_base="https://api.mistral.ai/v1",
        list_path="/models",
        auth="bearer",
        paging="none",
        parse=parse_mistral,
    ),
    ProviderSpec(
        name="groq",
        key_envs=("GROQ_API_KEY",),
        base_env="GROQ_API_BASE",
        default_base="https://api.groq.com/openai/v1",
        list_path="/models",
        auth="bearer",
        paging="none",
        parse=parse_groq,
    ),
    ProviderSpec(
        name="openrouter",
        key_envs=("OPENROUTER_API_KEY",),
        base_env="OPENROUTER_API_BASE",
        default_base="https://openrouter.ai/api/v1",
        list_path="/models",
        auth="bearer",
        paging="none",
        parse=parse_openrouter,
    ),
    ProviderSpec(
        name="together_ai",
        key_envs=("TOGETHERAI_API_KEY", "TOGETHER_API_KEY"),
        base_env="TOGETHERAI_API_BASE",
        default_base="https://api.together.xyz/v1",
        list_path="/models",
        auth="bearer",
        paging="none",
        parse=parse_together,
    ),
    ProviderSpec(
        name="deepseek",
        key_envs=("DEEPSEEK_API_KEY",),
        base_env="DEEPSEEK_API_BASE",
        default_base="https://api.deepseek.com",
        list_path="/models",
        auth="bearer",
        paging="none",
        parse=parse_ids,
    ),
    ProviderSpec(
        name="xai",
        key_envs=("XAI_API_KEY",),
        base_env="XAI_API_BASE",
        default_base="https://api.x.ai/v1",
        list_path="/models",
        auth="bearer",
        paging="none",
        parse=parse_ids,
    ),
)
