"""What the sidecar lists: discovered models as :class:`ModelEntry` records, and the merge
with the config's explicit entries (which win on alias clashes)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from exo_remote_engine.sidecar.config.loader import ModelEntry
from exo_remote_engine.sidecar.discovery.types import DiscoveredModel, ListedModel


def model_entry(
    alias: str,
    litellm_model: str,
    provider: str,
    listed: ListedModel,
    params: Mapping[str, Any],
) -> ModelEntry:
    return ModelEntry(
        alias=alias,
        litellm_model=litellm_model,
        provider=provider,
        params=dict(params),
        source="discovered",
        display_name=listed.display_name,
        context_window=listed.context_window,
        max_output_tokens=listed.max_output_tokens,
        supports_tools=listed.supports_tools,
        supports_images=listed.supports_images,
    )


def discovered_model(entry: ModelEntry, listed: ListedModel, reason: str) -> DiscoveredModel:
    return DiscoveredModel(
        entry=entry,
        ready=not reason,
        not_ready_reason=reason,
        input_cost_per_token=listed.input_cost_per_token,
        output_cost_per_token=listed.output_cost_per_token,
    )


def merge(config_entries: Iterable[ModelEntry], discovered: Iterable[DiscoveredModel]) -> list[DiscoveredModel]:
    """Config entries first (always ready: the loader validated them), then discovered models
    whose alias no earlier entry took. An explicit config alias wins; no alias twice."""
    out: list[DiscoveredModel] = []
    seen: set[str] = set()
    for entry in config_entries:
        if entry.alias not in seen:
            seen.add(entry.alias)
            out.append(DiscoveredModel(entry=entry, ready=True))
    for model in discovered:
        if model.alias not in seen:
            seen.add(model.alias)
            out.append(model)
    return out
