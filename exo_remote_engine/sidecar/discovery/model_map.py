"""LiteLLM's *bundled* model map, read with guards: metadata comes from it only when the map
files the model under that provider, so unknown stays unknown (``None``), never a guess."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import date
from typing import Any, Final

from exo_remote_engine.sidecar.discovery.chat_filter import is_chat_model
from exo_remote_engine.sidecar.discovery.parsers.untrusted_json import as_bool, as_str, positive_int, price
from exo_remote_engine.sidecar.discovery.providers import PROVIDERS
from exo_remote_engine.sidecar.discovery.types import ListedModel


def litellm_model_map() -> Mapping[str, Any]:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch it
    import litellm

    cost = getattr(litellm, "model_cost", None)
    return cost if isinstance(cost, Mapping) else {}


def map_entry(provider: str, model_id: str, bare_keys: bool = True) -> Mapping[str, Any] | None:
    """The map's entry for ``provider``'s ``model_id`` (``<provider>/<id>`` or bare ``<id>``),
    only when the map files it under that provider (or its ``text-completion-`` variant)."""
    model_map = litellm_model_map()
    candidates = [f"{provider}/{model_id}"]
    if bare_keys:
        candidates.append(model_id)
    for key in candidates:
        info = model_map.get(key)
        if isinstance(info, Mapping) and info.get("litellm_provider") in (provider, f"text-completion-{provider}"):
            return info
    return None


def with_map_info(listed: ListedModel, info: Mapping[str, Any] | None) -> ListedModel:
    """Fill what the listing left unknown from the map entry; the listing always wins."""
    if info is None:
        return listed

    def pick(mine: Any, theirs: Any) -> Any:
        return theirs if mine is None else mine

    return replace(
        listed,
        context_window=pick(listed.context_window, positive_int(info.get("max_input_tokens"))),
        max_output_tokens=pick(listed.max_output_tokens, positive_int(info.get("max_output_tokens"))),
        supports_tools=pick(listed.supports_tools, as_bool(info.get("supports_function_calling"))),
        supports_images=pick(listed.supports_images, as_bool(info.get("supports_vision"))),
        input_cost_per_token=pick(listed.input_cost_per_token, price(info.get("input_cost_per_token"))),
        output_cost_per_token=pick(listed.output_cost_per_token, price(info.get("output_cost_per_token"))),
    )


_DATED_RE: Final = re.compile(r"^(?P<base>.+?)-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")


def drop_dated_duplicates(ids: Iterable[str]) -> list[str]:
    """Drop ``<base>-2024-08-06`` / ``-20241022`` / ``-0613`` snapshots whose undated
    ``<base>`` or ``<base>-latest`` is also known: one line per model, not per snapshot."""
    known = set(ids)
    kept = []
    for model_id in known:
        match = _DATED_RE.match(model_id)
        if match and (match["base"] in known or f"{match['base']}-latest" in known):
            continue
        kept.append(model_id)
    return sorted(kept)


def known_chat_models(provider: str) -> tuple[ListedModel, ...]:
    """``provider``'s chat models in LiteLLM's bundled map (mode ``chat``), without dated
    snapshot duplicates, rows that are not models (fine-tune and batch pricing, wildcards,
    rows with neither a token price nor a token limit), models past their deprecation date
    and non-chat families; metadata filled from the map."""
    spec = next((p for p in PROVIDERS if p.name == provider), None)
    return _known_chat_models(provider, spec.map_bare_keys if spec else False, date.today().isoformat())


@functools.lru_cache(maxsize=64)
def _known_chat_models(provider: str, bare_keys: bool, today: str) -> tuple[ListedModel, ...]:
    rows: dict[str, Mapping[str, Any]] = {}
    for key, info in litellm_model_map().items():
        if not isinstance(info, Mapping) or info.get("litellm_provider") != provider or info.get("mode") != "chat":
            continue
        if key.startswith(f"{provider}/"):
            model_id = key[len(provider) + 1 :]
        elif bare_keys and "/" not in key:
            model_id = key
        else:
            continue  # e.g. Together's "together-ai-up-to-4b" pricing tiers
        if not model_id or "*" in model_id or model_id.startswith("ft:") or model_id.endswith(":batch"):
            continue
        if not any(k in info for k in ("input_cost_per_token", "max_input_tokens", "max_tokens")):
            continue  # e.g. OpenAI's "container" (code interpreter sessions)
        if is_chat_model(model_id, None, "chat"):
            rows[model_id] = info
    # Dedupe first, then drop the deprecated: a snapshot of a retired model goes with it.
    out = []
    for model_id in drop_dated_duplicates(rows):
        deprecated = as_str(rows[model_id].get("deprecation_date"))
        if deprecated and deprecated <= today:
            continue
        out.append(with_map_info(ListedModel(id=model_id), map_entry(provider, model_id, bare_keys)))
    return tuple(out)
