"""What the sidecar lists: discovered models as :class:`ModelEntry` records, and the merge
with the config's explicit entries (which win on alias clashes).

A listing is a provider's or a local server's text: an id becomes an alias that nodes type,
``exo-remote models`` prints and may become the default model, so an id that is long or
holds control characters (an ANSI escape) is dropped, and a display name is cut and made
printable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from exo_remote_engine.sidecar.config.loader import ModelEntry
from exo_remote_engine.sidecar.discovery.types import DiscoveredModel, ListedModel

MAX_MODEL_ID_CHARS = 200
MAX_DISPLAY_NAME_CHARS = 200
_MODEL_ID = re.compile(r"[!-~]+")  # visible ASCII: no space, no control, no escape


def valid_model_id(model_id: str) -> bool:
    """Whether a listed id may become an alias: visible ASCII (no blank, control or
    escape character), at most :data:`MAX_MODEL_ID_CHARS` (real ids are far shorter)."""
    return len(model_id) <= MAX_MODEL_ID_CHARS and _MODEL_ID.fullmatch(model_id) is not None


def _shown(name: str) -> str:
    return "".join(c for c in name[:MAX_DISPLAY_NAME_CHARS] if c.isprintable())


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
        display_name=_shown(listed.display_name),
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
