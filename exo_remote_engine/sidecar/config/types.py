"""What a sidecar configuration is: model entries, router and node settings, the errors.

The types every part of the sidecar uses; reading a file into them is
:mod:`~exo_remote_engine.sidecar.config.loader`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exo_remote_engine.sidecar.config.rules import NodePolicy

EMBEDDED_ALIAS = "embedded-echo"
EMBEDDED_PROVIDER = "embedded"
ECHO_DISPLAY_NAME = (
    "Embedded echo: repeats your last message, not a language model (for a real offline model: pip install "
    "'.[local]', then python -m exo_remote_engine.sidecar.embedded.fetch; bash scripts/demo.sh does both)"
)
MASTER_KEY_NODE = "master-key"


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the file."""


MAX_OPERATOR_FILE_BYTES = 4 * 1024 * 1024  # thousands of models; a 58 MB YAML took 72 s to start


def read_operator_file(path: Path, kind: str, max_bytes: int = MAX_OPERATOR_FILE_BYTES) -> str:
    """The UTF-8 text of an operator's ``kind`` file (config, token file); ConfigError
    naming the file and why it cannot be read, or that it is larger than ``max_bytes``
    (read no further than that, so a huge or endless file costs nothing)."""
    try:
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ConfigError(
                f"{path}: the {kind} is larger than {max_bytes // (1024 * 1024)} MiB; "
                "that is not a configuration a sidecar should parse at start-up"
            )
        return data.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {kind}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read {kind}: not UTF-8 text (byte {exc.start})") from exc


@dataclass(frozen=True)
class ModelEntry:
    """One model alias and how LiteLLM reaches it. ``params`` may hold secrets."""

    alias: str
    litellm_model: str
    provider: str
    params: Mapping[str, Any] = field(repr=False, default_factory=dict)
    source: str = "config"
    display_name: str = ""
    context_window: int | None = None
    max_output_tokens: int | None = None
    supports_tools: bool | None = None
    supports_images: bool | None = None
    # Deployment-group facts (LiteLLM Router's): which member of its group this is, its
    # limits and weight, and prices that override LiteLLM's cost map.
    deployment: str = ""
    rpm: int | None = None
    tpm: int | None = None
    weight: float | None = None
    # First-token guard (router_settings' defaults apply when None): see relay/first_token.py.
    ttft_timeout_s: float | None = None
    hedge_after_s: float | None = None
    base_model: str | None = None
    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None
    cache_read_input_token_cost: float | None = None  # LiteLLM's cost-map names
    cache_creation_input_token_cost: float | None = None

    @property
    def deployment_name(self) -> str:
        return self.deployment or self.alias


@dataclass(frozen=True)
class RouterSettings:
    """LiteLLM's ``router_settings`` the sidecar acts on (LiteLLM's defaults)."""

    routing_strategy: str = "simple-shuffle"
    allowed_fails: int = 3
    cooldown_time_s: float = 5.0
    # No first delta within ttft_timeout: the attempt fails and the next member is tried;
    # hedge_after: a second attempt starts, the first to speak wins (None: off).
    ttft_timeout_s: float | None = None
    hedge_after_s: float | None = None


@dataclass(frozen=True)
class NodeQuota:
    """Per-node traffic and spend limits: ``exo_remote_settings.nodes.<name>``'s ``rpm``,
    ``tpm``, ``max_budget`` (USD) and ``budget_duration`` (LiteLLM's key fields), and
    ``allow_unpriced``: whether a budgeted node may use models whose price is unknown
    (their spend cannot be counted against the budget)."""

    rpm: int | None = None
    tpm: int | None = None
    max_budget: float | None = None
    budget_duration: str | None = None
    allow_unpriced: bool = False

    @property
    def budget_duration_s(self) -> float | None:
        return duration_seconds(self.budget_duration) if self.budget_duration else None


@dataclass(frozen=True)
class SidecarConfig:
    models: tuple[ModelEntry, ...]
    default_model: str
    secrets: frozenset[str] = field(repr=False, default_factory=frozenset)
    path: Path | None = None
    node_policies: Mapping[str, NodePolicy] = field(default_factory=dict)
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    num_retries: int = 1
    # alias -> every deployment of that model_name (models holds the first of each).
    groups: Mapping[str, tuple[ModelEntry, ...]] = field(default_factory=dict)
    router: RouterSettings = field(default_factory=RouterSettings)
    node_quotas: Mapping[str, NodeQuota] = field(default_factory=dict)
    master_key: str | None = field(default=None, repr=False)
    not_acted_on: tuple[str, ...] = ()
    # How long a request over a limit waits for capacity (0: refused at once).
    queue_timeout_s: float = 0.0
    # LiteLLM's context_window_fallbacks: where a request too long for a model may go.
    context_window_fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def get(self, alias: str) -> ModelEntry | None:
        return next((m for m in self.models if m.alias == alias), None)

    def deployments(self, entry: ModelEntry) -> tuple[ModelEntry, ...]:
        """The deployment group ``entry`` heads (itself alone when it is not grouped)."""
        group = self.groups.get(entry.alias) if entry.source == "config" else None
        return group if group else (entry,)


def embedded_entry() -> ModelEntry:
    """A model that needs no key and no network: LiteLLM's mock transport echoing the
    conversation. It exists so a fresh machine can run the whole path end to end; with the
    ``[local]`` extra the sidecar serves a real offline model instead (see
    :mod:`~exo_remote_engine.sidecar.embedded.model`), and without it this one says so."""
    return ModelEntry(
        alias=EMBEDDED_ALIAS,
        litellm_model="openai/embedded-echo",
        provider=EMBEDDED_PROVIDER,
        source="embedded",
        display_name=ECHO_DISPLAY_NAME,
        context_window=32768,
        max_output_tokens=4096,
        supports_tools=False,
        supports_images=False,
    )


_DURATION = re.compile(r"^(\d+)(s|m|h|d|w|mo)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400}


def duration_seconds(text: Any) -> float:
    """LiteLLM's duration strings: ``30s``, ``30m``, ``24h``, ``7d``, ``2w``, ``1mo`` (30 days)."""
    match = _DURATION.match(str(text).strip()) if isinstance(text, str) else None
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration like 30s, 30m, 24h, 7d, 1mo")
    return float(int(match.group(1)) * _UNIT_S[match.group(2)])


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
