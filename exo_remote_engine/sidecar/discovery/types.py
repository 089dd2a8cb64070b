"""The records discovery passes around: what a listing says about a model, what the sidecar
lists, how each source answered, and how to reach a hosted provider or a local server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from exo_remote_engine.sidecar.config.loader import ModelEntry


@dataclass(frozen=True)
class ListedModel:
    """One model as a listing (or LiteLLM's map) describes it. ``None`` means unknown.

    ``chat`` is the listing's own verdict from its type / capability fields: True (a chat
    model), False (embeddings, audio, image, ...), None (the listing does not say).
    """

    id: str
    display_name: str = ""
    context_window: int | None = None
    max_output_tokens: int | None = None
    supports_tools: bool | None = None
    supports_images: bool | None = None
    chat: bool | None = None
    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None


@dataclass(frozen=True)
class DiscoveredModel:
    """A model the sidecar can list: how to call it (``entry``), and whether it can now.

    ``entry.params`` carries ``api_key`` (and ``api_base`` when not the provider default)
    for ``litellm.acompletion(model=entry.litellm_model, **entry.params)``; it is excluded
    from ``repr``. Config entries wrapped by :func:`merge` are always ready.
    """

    entry: ModelEntry
    ready: bool
    not_ready_reason: str = ""
    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None

    @property
    def alias(self) -> str:
        return self.entry.alias


@dataclass(frozen=True)
class SourceStatus:
    """How one provider / server answered at the last refresh (for logs and diagnostics)."""

    source: str
    base_url: str  # without credentials, query or fragment
    ok: bool
    reason: str = ""  # "" when ok; never contains a key or provider text
    models: int = 0  # chat models contributed (ready or not)
    serving_last_good: bool = False  # the listing failed; the previous good one is served
    probe: bool = False  # the default Ollama probe: a failure is not an error
    checked_at: float = 0.0  # time.time() of the refresh


AuthStyle = Literal["bearer", "anthropic", "gemini"]
Paging = Literal["none", "anthropic", "gemini"]
Parser = Callable[[Any], list[ListedModel]]


@dataclass(frozen=True, kw_only=True)
class ProviderSpec:
    """How to list one hosted provider's models, declaratively (keyword arguments only: eight
    fields, several of them strings, read wrong when positional).

    ``api_base`` is in LiteLLM's own sense of ``<BASE_ENV>`` for that provider (what
    ``acompletion(api_base=...)`` accepts); the listing is at ``api_base + list_path``.
    ``normalize_base`` turns an override from ``base_env`` into that form.
    """

    name: str  # LiteLLM provider, also the alias prefix
    key_envs: tuple[str, ...]  # first non-empty wins; the first is named in "set ... on the sidecar"
    base_env: str
    default_base: str
    list_path: str
    auth: AuthStyle
    paging: Paging
    parse: Parser
    normalize_base: Callable[[str], str] = field(default=lambda base: base.rstrip("/"))
    map_bare_keys: bool = False  # LiteLLM's map also keys this provider's models without prefix


@dataclass(frozen=True)
class ServerSpec:
    """A local or OpenAI-compatible server at a known base URL.

    ``kind``: ``ollama``, ``llamacpp``, ``vllm``, ``lmstudio`` or ``openai`` (generic
    OpenAI-compatible; also spelled ``openai_compatible``). ``name`` is the alias prefix
    (``<name>/<model id>``); it defaults to the kind, and servers sharing a name get
    ``@host:port`` appended so aliases never collide.
    """

    kind: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    name: str | None = None

    def __post_init__(self) -> None:
        kind = _SERVER_KIND_ALIASES.get(self.kind.strip().lower().replace("-", "_"))
        if kind is None:
            raise ValueError(
                f"unknown server kind {self.kind!r}; expected one of ollama, llamacpp, vllm, lmstudio, openai"
            )
        object.__setattr__(self, "kind", kind)
        if not self.base_url.strip():
            raise ValueError(f"server of kind {kind!r} needs a base URL")


_SERVER_KIND_ALIASES: Final = {
    "ollama": "ollama",
    "llamacpp": "llamacpp",
    "llama.cpp": "llamacpp",
    "llama_cpp": "llamacpp",
    "vllm": "vllm",
    "hosted_vllm": "vllm",
    "lmstudio": "lmstudio",
    "lm_studio": "lmstudio",
    "openai": "openai",
    "openai_compatible": "openai",
    "generic": "openai",
}
