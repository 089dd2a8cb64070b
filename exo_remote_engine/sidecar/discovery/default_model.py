"""Which model to recommend when a client has no preference: small, fast, plain, cheap."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from exo_remote_engine.sidecar.discovery.types import DiscoveredModel

# Names of small, fast models: whole tokens, so "gemini" is not "mini".
_SMALL_RE: Final = re.compile(
    r"(?:^|[-_/.:])(?:mini|haiku|flash|small|lite|nano|instant|tiny|micro|"
    r"(?:0?\.\d+|[1-8](?:\.\d+)?)b)(?:$|[-_/.:])",
    re.IGNORECASE,
)
# Specialised variants that are neither the plain chat model nor fast.
_SPECIAL_RE: Final = re.compile(
    r"preview|exp(?:erimental)?(?:$|[-_/.:])|search|audio|thinking|reason|research|codex|computer-use|vision",
    re.IGNORECASE,
)


def choose_default(models: Sequence[DiscoveredModel], preferred: str | None) -> str | None:
    """The alias to recommend when a client has no preference.

    ``preferred`` (the configured default) wins when it is listed. Otherwise, among *ready*
    models, ordered by:

    1. a small / fast name (whole tokens ``mini``, ``haiku``, ``flash``, ``small``, ``lite``,
       ``nano``, ``instant``, ``tiny``, ``micro``, or a size of 8B or less such as ``8b``,
       ``3b``, ``0.5b``) before other names;
    2. plain models before specialised variants (preview / experimental / search / audio /
       thinking / reasoning / research / codex / computer-use / vision);
    3. the embedded offline model last;
    4. known per-token cost (input + output, from the listing or LiteLLM's map), cheapest
       first; unknown cost after every known one;
    5. the alias, alphabetically, so the choice is deterministic.

    None when nothing is ready.
    """
    if preferred and any(m.alias == preferred for m in models):
        return preferred
    ready = [m for m in models if m.ready]
    return min(ready, key=preference).alias if ready else None


def preference(m: DiscoveredModel) -> tuple[int, int, int, int, float, str]:
    """Sort key: small, fast, plain, cheap first (see :func:`choose_default`)."""
    cost = None
    if m.input_cost_per_token is not None or m.output_cost_per_token is not None:
        cost = (m.input_cost_per_token or 0.0) + (m.output_cost_per_token or 0.0)
    return (
        0 if _SMALL_RE.search(m.alias) or _SMALL_RE.search(m.entry.litellm_model) else 1,
        1 if _SPECIAL_RE.search(m.alias) else 0,
        1 if m.entry.source == "embedded" else 0,
        1 if cost is None else 0,
        cost or 0.0,
        m.alias,
    )
