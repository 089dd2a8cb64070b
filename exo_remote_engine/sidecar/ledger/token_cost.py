"""The price of prompt-cache and reasoning tokens, by LiteLLM's own rule.

A prompt read from a provider's cache costs a fraction of fresh input (OpenAI half,
Anthropic a tenth), writing one to Anthropic's cache costs more (1.25x); reasoning tokens
are completion tokens, priced separately where the map says so
(``output_cost_per_reasoning_token``). Pricing every prompt token at the input price
overcharges cached prompts several times over (LiteLLM#11789 was the reverse: streaming
billed cache reads about 7x). So when a provider reports these details the cost is
LiteLLM's ``generic_cost_per_token`` (what ``litellm.completion_cost`` uses) over the
cost-map entry with the deployment's overrides applied, the same field names
(``input_cost_per_token``, ``output_cost_per_token``, ``cache_read_input_token_cost``,
``cache_creation_input_token_cost``); without them the plain two-price product stands.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from exo_remote_engine.sidecar.config.loader import ModelEntry

CACHE_PRICE_FIELDS = ("cache_read_input_token_cost", "cache_creation_input_token_cost")


@dataclass(frozen=True)
class TokenDetails:
    """What the provider said about its tokens beyond the two totals (each a part of one)."""

    cached_prompt_tokens: int = 0
    cache_creation_prompt_tokens: int = 0
    reasoning_tokens: int = 0

    def __bool__(self) -> bool:
        return bool(self.cached_prompt_tokens or self.cache_creation_prompt_tokens or self.reasoning_tokens)


NO_DETAILS = TokenDetails()


@functools.lru_cache(maxsize=1024)
def _map_entry(model: str, provider: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The cost-map key and entry for ``model`` (as a hashable tuple; empty if unknown)."""
    import litellm

    prefix, sep, rest = model.partition("/")
    for key in (model, rest) if sep and prefix == provider else (model,):
        info = litellm.model_cost.get(key)
        if isinstance(info, dict) and (key is model or info.get("litellm_provider") in (provider, None)):
            return key, tuple(info.items())
    return rest if sep and prefix == provider else model, ()


def detailed_cost(
    entry: ModelEntry,
    price_in: float,
    price_out: float,
    prompt_tokens: int,
    completion_tokens: int,
    details: TokenDetails,
) -> float:
    """USD for a request whose usage carries cache or reasoning details."""
    from litellm.litellm_core_utils.llm_cost_calc.utils import generic_cost_per_token
    from litellm.types.utils import CompletionTokensDetailsWrapper, PromptTokensDetailsWrapper, Usage

    key, items = _map_entry(entry.base_model or entry.litellm_model, entry.provider)
    info: dict[str, Any] = dict(items)
    info.update(input_cost_per_token=price_in, output_cost_per_token=price_out)
    for field in CACHE_PRICE_FIELDS:
        override = getattr(entry, field)
        if override is not None:
            info[field] = override
    cached, written = details.cached_prompt_tokens, details.cache_creation_prompt_tokens
    usage = Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetailsWrapper(cached_tokens=cached, cache_creation_tokens=written),
        completion_tokens_details=CompletionTokensDetailsWrapper(reasoning_tokens=details.reasoning_tokens),
        cache_creation_input_tokens=written,
        cache_read_input_tokens=cached,
    )
    prompt_usd, completion_usd = generic_cost_per_token(
        model=key,
        usage=usage,
        custom_llm_provider=entry.provider,
        model_info=info,  # type: ignore[arg-type]
    )
    return float(prompt_usd) + float(completion_usd)
