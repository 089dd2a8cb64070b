"""Dynamic model discovery: what the sidecar's keys and servers make available right now.

Nobody maintains a static model list. At every refresh the sidecar

* asks each hosted provider whose key it holds for its model listing (one declarative
  :class:`ProviderSpec` per provider in :data:`PROVIDERS`), following pagination;
* asks each configured local / OpenAI-compatible server (:class:`ServerSpec`: Ollama,
  llama.cpp, vLLM, LM Studio, generic ``/v1/models``), plus Ollama's default local address
  unless told otherwise;
* keeps chat-capable models only (:func:`is_chat_model`, every filter rule in one place);
* fills per-model metadata (context window, max output tokens, tools, images) from the
  listing where the provider reports it and from LiteLLM's *bundled* model map otherwise,
  and only when the model is in that map: unknown stays ``None``, never a guess;
* marks every model ready or not, with a reason a person can act on
  (``set ANTHROPIC_API_KEY on the sidecar``, ``the sidecar's ANTHROPIC_API_KEY was rejected
  (HTTP 401)``, ``server at http://127.0.0.1:1234 unreachable``, ...).

:class:`ModelDiscovery` caches the result for a TTL, refreshes in the background, queries
every source concurrently under its own timeout (a hung provider never delays the others),
serves a provider's last good listing while its refresh fails, and lets concurrent callers
share one in-flight refresh. :func:`merge` puts explicit config entries first (they win on
alias clashes) and :func:`choose_default` picks a default model deterministically.

Keys come from the ``environ`` mapping the discovery is given (read again at every refresh,
so a key added to a re-read env file is picked up) and travel only in request headers and in
:attr:`ModelEntry.params` (kept out of every ``repr``). No reason, status or log line is ever
built from a key or from a provider's response text.

``litellm.get_valid_models`` is deliberately not used (blocking, unbounded, names only, stale
or wrong for several providers); neither are LiteLLM's ``supports_*`` helpers, which answer
False for unknown models.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Final, Literal

import aiohttp
from yarl import URL

from exo_remote_engine.sidecar.config import ModelEntry

__all__ = [
    "DEFAULT_OLLAMA_URL",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_TTL_S",
    "PROVIDERS",
    "DiscoveredModel",
    "ListedModel",
    "ModelDiscovery",
    "ProviderSpec",
    "ServerSpec",
    "SourceStatus",
    "choose_default",
    "is_chat_model",
    "known_chat_models",
    "merge",
]

log = logging.getLogger(__name__)

DEFAULT_TTL_S: Final = 60.0
DEFAULT_TIMEOUT_S: Final = 5.0
DEFAULT_OLLAMA_URL: Final = "http://127.0.0.1:11434"
MAX_LISTING_BYTES: Final = 32 * 1024 * 1024  # OpenRouter's full listing is ~2 MB
MAX_PAGES: Final = 50
OLLAMA_SHOW_CONCURRENCY: Final = 8
ANTHROPIC_VERSION: Final = "2023-06-01"


# --------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class ProviderSpec:
    """How to list one hosted provider's models, declaratively.

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
# kind -> (LiteLLM model prefix, provider family shown to clients)
_SERVER_LITELLM: Final = {
    "ollama": ("ollama_chat", "ollama"),
    "llamacpp": ("openai", "openai"),
    "vllm": ("hosted_vllm", "hosted_vllm"),
    "lmstudio": ("lm_studio", "lm_studio"),
    "openai": ("openai", "openai"),
}


# --------------------------------------------------------------------------------------
# The chat filter: every rule in one place
# --------------------------------------------------------------------------------------

# Ids that are never chat models, whatever else is known: matched as whole segments
# (separated by - _ / . : or the ends), case-insensitive.
_NON_CHAT_SEGMENTS: Final = (
    # embeddings
    r"embed(?:ding)?s?",
    r"text-embedding",
    r"bge",
    r"e5",
    r"gte",
    r"minilm",
    # audio: speech-to-text, text-to-speech, realtime / live voice
    r"whisper",
    r"tts",
    r"transcribe",
    r"transcription",
    r"realtime",
    r"native-audio",
    r"live",
    # moderation / guard-only classifiers
    r"moderation",
    r"guard",
    r"safeguard",
    r"shieldgemma",
    # image / video / music generation, OCR
    r"dall-e",
    r"gpt-image",
    r"imagen",
    r"image",
    r"image-generation",
    r"flux",
    r"stable-diffusion",
    r"sdxl",
    r"veo",
    r"sora",
    r"lyria",
    r"ocr",
    # ranking, attributed QA
    r"rerank",
    r"aqa",
)
_NON_CHAT_RE: Final = re.compile(r"(?:^|[-_/.:])(?:" + "|".join(_NON_CHAT_SEGMENTS) + r")(?:$|[-_/.:])", re.IGNORECASE)
# Legacy completion-only ids (no chat endpoint).
_COMPLETION_ONLY_RE: Final = re.compile(r"^(?:babbage|davinci)(?:-\d+)?$", re.IGNORECASE)
# LiteLLM map modes that acompletion() serves ("responses" models are bridged by LiteLLM).
_CHAT_MODES: Final = frozenset({"chat", "responses"})


def is_chat_model(model_id: str, listing_says: bool | None = None, map_mode: str | None = None) -> bool:
    """Whether ``model_id`` is a chat model the sidecar should offer.

    Rules, in order:

    1. the listing's own type / capability fields said "not chat" (``listing_says`` False:
       Gemini without ``generateContent``, Mistral ``completion_chat`` false, Together type
       other than ``chat``, LM Studio ``embeddings``, Ollama without ``completion``,
       OpenRouter without text output, Groq ``active`` false) -> drop;
    2. the id names a non-chat family (:data:`_NON_CHAT_SEGMENTS`: embeddings, whisper / tts /
       transcribe / realtime / live audio, moderation and guard-only models, dall-e /
       gpt-image / imagen / image / flux / veo / sora / lyria generation, OCR, rerank, AQA)
       or a legacy completion-only model -> drop, even if the listing says chat (a TTS model
       still answers ``generateContent``; a guard model is typed ``chat``);
    3. the listing said chat -> keep;
    4. LiteLLM's bundled map knows the model: keep iff its mode is ``chat`` or ``responses``;
    5. nothing is known -> keep (OpenAI, DeepSeek and xAI list bare ids; a new id is far
       more likely a chat model than not, and rule 2 caught the known non-chat families).
    """
    if listing_says is False:
        return False
    if _NON_CHAT_RE.search(model_id) or _COMPLETION_ONLY_RE.match(model_id.rsplit("/", 1)[-1]):
        return False
    if listing_says is True:
        return True
    if map_mode is not None:
        return map_mode in _CHAT_MODES
    return True


# --------------------------------------------------------------------------------------
# Small typed readers for untrusted JSON
# --------------------------------------------------------------------------------------


class _Malformed(Exception):
    """The body is not the listing shape this provider documents."""


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if value > 0 else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _float(value: Any) -> float | None:
    """A non-negative price; OpenRouter sends strings, ``"-1"`` for "varies"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and value >= 0 and value == value:  # not NaN
        return float(value)
    return None


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _strs(value: Any) -> list[str] | None:
    """A list of strings, or None when the field is absent / not a list."""
    if not isinstance(value, list):
        return None
    return [v for v in value if isinstance(v, str)]


def _items(page: Any, key: str, *, optional: bool = False) -> list[Mapping[str, Any]]:
    """``page[key]`` as a list of objects; anything else is a malformed listing."""
    if not isinstance(page, Mapping):
        raise _Malformed
    if key not in page and optional:
        return []
    items = page.get(key)
    if not isinstance(items, list):
        raise _Malformed
    return [item for item in items if isinstance(item, Mapping) and _str(item.get("id" if key == "data" else "name"))]


def _contains(values: list[str] | None, wanted: str) -> bool | None:
    return None if values is None else wanted in values


# --------------------------------------------------------------------------------------
# Listing parsers, one per provider shape (documented field names; see tests/support)
# --------------------------------------------------------------------------------------


def _parse_ids(page: Any) -> list[ListedModel]:
    """OpenAI / DeepSeek / xAI: ``{"object": "list", "data": [{"id", "object", "created",
    "owned_by"}]}`` -- ids only."""
    return [ListedModel(id=_str(m["id"])) for m in _items(page, "data")]


def _parse_anthropic(page: Any) -> list[ListedModel]:
    """``{"data": [{"type": "model", "id", "display_name", "created_at", "max_input_tokens",
    "max_tokens", "capabilities": {"image_input": {"supported": bool}, ...}}], "has_more",
    "first_id", "last_id"}``. Tool use is not reported (LiteLLM's map fills it)."""
    out = []
    for m in _items(page, "data"):
        caps = _dict(m.get("capabilities"))
        out.append(
            ListedModel(
                id=_str(m["id"]),
                display_name=_str(m.get("display_name")),
                context_window=_int(m.get("max_input_tokens")),
                max_output_tokens=_int(m.get("max_tokens")),
                supports_images=_bool(_dict(caps.get("image_input")).get("supported")),
            )
        )
    return out


def _parse_gemini(page: Any) -> list[ListedModel]:
    """``{"models": [{"name": "models/<id>", "displayName", "inputTokenLimit",
    "outputTokenLimit", "supportedGenerationMethods": [...]}], "nextPageToken"}``. Chat
    models support ``generateContent``; embeddings ``embedContent``, Imagen ``predict``."""
    out = []
    for m in _items(page, "models", optional=True):
        methods = _strs(m.get("supportedGenerationMethods"))
        out.append(
            ListedModel(
                id=_str(m["name"]).removeprefix("models/"),
                display_name=_str(m.get("displayName")),
                context_window=_int(m.get("inputTokenLimit")),
                max_output_tokens=_int(m.get("outputTokenLimit")),
                chat=_contains(methods, "generateContent"),
            )
        )
    return out


def _parse_mistral(page: Any) -> list[ListedModel]:
    """``{"object": "list", "data": [{"id", "type": "base"|"fine-tuned", "name",
    "max_context_length", "aliases", "capabilities": {"completion_chat", "completion_fim",
    "function_calling", "vision", "classification", "moderation", "ocr", ...}}]}``."""
    out = []
    for m in _items(page, "data"):
        caps = _dict(m.get("capabilities"))
        out.append(
            ListedModel(
                id=_str(m["id"]),
                context_window=_int(m.get("max_context_length")),
                supports_tools=_bool(caps.get("function_calling")),
                supports_images=_bool(caps.get("vision")),
                chat=_bool(caps.get("completion_chat")),
            )
        )
    return out


def _parse_groq(page: Any) -> list[ListedModel]:
    """``{"object": "list", "data": [{"id", "owned_by", "active", "context_window",
    "max_completion_tokens", "public_apps"}]}``. Whisper / TTS / guard models are only
    told apart by id."""
    return [
        ListedModel(
            id=_str(m["id"]),
            context_window=_int(m.get("context_window")),
            max_output_tokens=_int(m.get("max_completion_tokens")),
            chat=False if m.get("active") is False else None,
        )
        for m in _items(page, "data")
    ]


def _parse_openrouter(page: Any) -> list[ListedModel]:
    """``{"data": [{"id", "name", "context_length", "architecture": {"modality",
    "input_modalities", "output_modalities"}, "pricing": {"prompt", "completion"} (USD per
    token, strings), "top_provider": {"context_length", "max_completion_tokens"},
    "supported_parameters": [...]}]}``."""
    out = []
    for m in _items(page, "data"):
        arch = _dict(m.get("architecture"))
        outputs = _strs(arch.get("output_modalities"))
        pricing = _dict(m.get("pricing"))
        out.append(
            ListedModel(
                id=_str(m["id"]),
                display_name=_str(m.get("name")),
                context_window=_int(m.get("context_length")),
                max_output_tokens=_int(_dict(m.get("top_provider")).get("max_completion_tokens")),
                supports_tools=_contains(_strs(m.get("supported_parameters")), "tools"),
                supports_images=_contains(_strs(arch.get("input_modalities")), "image"),
                chat=False if outputs is not None and "text" not in outputs else None,
                input_cost_per_token=_float(pricing.get("prompt")),
                output_cost_per_token=_float(pricing.get("completion")),
            )
        )
    return out


def _parse_together(page: Any) -> list[ListedModel]:
    """A top-level JSON array: ``[{"id", "object": "model", "type": "chat"|"language"|
    "code"|"image"|"embedding"|"moderation"|"rerank"|"audio"|"transcribe", "display_name",
    "context_length", "pricing": {"input", "output"} (USD per million tokens)}]``."""
    if isinstance(page, Mapping) and isinstance(page.get("data"), list):
        page = page["data"]  # tolerate an OpenAI-style wrapper
    if not isinstance(page, list):
        raise _Malformed
    out = []
    for m in page:
        if not isinstance(m, Mapping) or not _str(m.get("id")):
            continue
        kind = m.get("type")
        pricing = _dict(m.get("pricing"))
        per_m_in, per_m_out = _float(pricing.get("input")), _float(pricing.get("output"))
        out.append(
            ListedModel(
                id=_str(m["id"]),
                display_name=_str(m.get("display_name")),
                context_window=_int(m.get("context_length")),
                chat=(kind == "chat") if isinstance(kind, str) else None,
                input_cost_per_token=None if per_m_in is None else per_m_in / 1e6,
                output_cost_per_token=None if per_m_out is None else per_m_out / 1e6,
            )
        )
    return out


def _parse_generic(page: Any) -> list[ListedModel]:
    """Any ``/v1/models``: ``{"data": [{"id", ...}]}``, plus the context fields the common
    servers add (vLLM ``max_model_len``, llama.cpp ``meta.n_ctx`` / ``meta.n_ctx_train``,
    others ``context_length`` / ``context_window``)."""
    out = []
    for m in _items(page, "data"):
        meta = _dict(m.get("meta"))
        context = (
            _int(m.get("max_model_len"))
            or _int(meta.get("n_ctx"))
            or _int(meta.get("n_ctx_train"))
            or _int(m.get("context_length"))
            or _int(m.get("context_window"))
        )
        inputs = _strs(_dict(m.get("architecture")).get("input_modalities"))
        out.append(ListedModel(id=_str(m["id"]), context_window=context, supports_images=_contains(inputs, "image")))
    return out


def _gemini_base(base: str) -> str:
    """LiteLLM calls ``{GEMINI_API_BASE}/models/<model>:generateContent``: the base carries
    the API version. A base without one gets ``/v1beta`` (for both listing and calls)."""
    base = base.rstrip("/")
    return base if re.search(r"/v1(?:beta|alpha)?\d*$", base) else base + "/v1beta"


def _anthropic_base(base: str) -> str:
    """LiteLLM appends ``/v1/messages`` to ``ANTHROPIC_API_BASE``: keep the root."""
    base = base.rstrip("/")
    for suffix in ("/v1/messages", "/v1"):
        base = base.removesuffix(suffix)
    return base


PROVIDERS: Final[tuple[ProviderSpec, ...]] = (
    ProviderSpec(
        "openai",
        ("OPENAI_API_KEY",),
        "OPENAI_API_BASE",
        "https://api.openai.com/v1",
        "/models",
        "bearer",
        "none",
        _parse_ids,
        map_bare_keys=True,
    ),
    ProviderSpec(
        "anthropic",
        ("ANTHROPIC_API_KEY",),
        "ANTHROPIC_API_BASE",
        "https://api.anthropic.com",
        "/v1/models",
        "anthropic",
        "anthropic",
        _parse_anthropic,
        normalize_base=_anthropic_base,
        map_bare_keys=True,
    ),
    ProviderSpec(
        "gemini",
        ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
        "GEMINI_API_BASE",
        "https://generativelanguage.googleapis.com/v1beta",
        "/models",
        "gemini",
        "gemini",
        _parse_gemini,
        normalize_base=_gemini_base,
    ),
    ProviderSpec(
        "mistral",
        ("MISTRAL_API_KEY",),
        "MISTRAL_API_BASE",
        "https://api.mistral.ai/v1",
        "/models",
        "bearer",
        "none",
        _parse_mistral,
    ),
    ProviderSpec(
        "groq",
        ("GROQ_API_KEY",),
        "GROQ_API_BASE",
        "https://api.groq.com/openai/v1",
        "/models",
        "bearer",
        "none",
        _parse_groq,
    ),
    ProviderSpec(
        "openrouter",
        ("OPENROUTER_API_KEY",),
        "OPENROUTER_API_BASE",
        "https://openrouter.ai/api/v1",
        "/models",
        "bearer",
        "none",
        _parse_openrouter,
    ),
    ProviderSpec(
        "together_ai",
        ("TOGETHERAI_API_KEY", "TOGETHER_API_KEY"),
        "TOGETHERAI_API_BASE",
        "https://api.together.xyz/v1",
        "/models",
        "bearer",
        "none",
        _parse_together,
    ),
    ProviderSpec(
        "deepseek",
        ("DEEPSEEK_API_KEY",),
        "DEEPSEEK_API_BASE",
        "https://api.deepseek.com",
        "/models",
        "bearer",
        "none",
        _parse_ids,
    ),
    ProviderSpec(
        "xai",
        ("XAI_API_KEY",),
        "XAI_API_BASE",
        "https://api.x.ai/v1",
        "/models",
        "bearer",
        "none",
        _parse_ids,
    ),
)


# --------------------------------------------------------------------------------------
# LiteLLM's bundled model map (guarded: unknown stays unknown)
# --------------------------------------------------------------------------------------


def _model_map() -> Mapping[str, Any]:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch it
    import litellm

    cost = getattr(litellm, "model_cost", None)
    return cost if isinstance(cost, Mapping) else {}


def _map_entry(provider: str, model_id: str, bare_keys: bool = True) -> Mapping[str, Any] | None:
    """The map's entry for ``provider``'s ``model_id`` (``<provider>/<id>`` or bare ``<id>``),
    only when the map files it under that provider (or its ``text-completion-`` variant)."""
    model_map = _model_map()
    candidates = [f"{provider}/{model_id}"]
    if bare_keys:
        candidates.append(model_id)
    for key in candidates:
        info = model_map.get(key)
        if isinstance(info, Mapping) and info.get("litellm_provider") in (provider, f"text-completion-{provider}"):
            return info
    return None


def _with_map_info(listed: ListedModel, info: Mapping[str, Any] | None) -> ListedModel:
    """Fill what the listing left unknown from the map entry; the listing always wins."""
    if info is None:
        return listed

    def pick(mine: Any, theirs: Any) -> Any:
        return theirs if mine is None else mine

    return replace(
        listed,
        context_window=pick(listed.context_window, _int(info.get("max_input_tokens"))),
        max_output_tokens=pick(listed.max_output_tokens, _int(info.get("max_output_tokens"))),
        supports_tools=pick(listed.supports_tools, _bool(info.get("supports_function_calling"))),
        supports_images=pick(listed.supports_images, _bool(info.get("supports_vision"))),
        input_cost_per_token=pick(listed.input_cost_per_token, _float(info.get("input_cost_per_token"))),
        output_cost_per_token=pick(listed.output_cost_per_token, _float(info.get("output_cost_per_token"))),
    )


_DATED_RE: Final = re.compile(r"^(?P<base>.+?)-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")


def _drop_dated_duplicates(ids: Iterable[str]) -> list[str]:
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
    for key, info in _model_map().items():
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
    for model_id in _drop_dated_duplicates(rows):
        deprecated = _str(rows[model_id].get("deprecation_date"))
        if deprecated and deprecated <= today:
            continue
        out.append(_with_map_info(ListedModel(id=model_id), _map_entry(provider, model_id, bare_keys)))
    return tuple(out)


# --------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------

FailureKind = Literal["auth", "http", "unreachable", "timeout", "malformed", "bad_url"]


class _ListingFailed(Exception):
    def __init__(self, kind: FailureKind, status: int | None = None) -> None:
        super().__init__(kind, status)
        self.kind: FailureKind = kind
        self.status = status


def _shown(url: str) -> str:
    """A URL fit for a reason or a log line: no user, password, query or fragment."""
    try:
        parsed = URL(url)
        if not parsed.is_absolute():
            return "(invalid URL)"
        return str(parsed.with_user(None).with_query(None).with_fragment(None)).rstrip("/")
    except (ValueError, TypeError):
        return "(invalid URL)"


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_LISTING_BYTES:
            raise _ListingFailed("malformed")
        chunks.append(chunk)


async def _request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: Mapping[str, str],
    params: Mapping[str, str] | None = None,
    body: Any = None,
) -> Any:
    try:
        target = URL(url)
        if not target.is_absolute() or target.scheme not in ("http", "https"):
            raise _ListingFailed("bad_url")
        async with session.request(
            method, target, headers=dict(headers), params=params, json=body, allow_redirects=False
        ) as response:
            if response.status in (401, 403):
                raise _ListingFailed("auth", response.status)
            if response.status != 200:
                raise _ListingFailed("http", response.status)
            raw = await _read_bounded(response)
    except _ListingFailed:
        raise
    except (aiohttp.InvalidURL, ValueError) as exc:
        raise _ListingFailed("bad_url") from exc
    except aiohttp.ClientPayloadError as exc:
        raise _ListingFailed("malformed") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise _ListingFailed("unreachable") from exc
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _ListingFailed("malformed") from exc


def _auth_headers(style: AuthStyle, key: str) -> dict[str, str]:
    if style == "anthropic":
        return {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}
    if style == "gemini":
        return {"x-goog-api-key": key}
    return {"Authorization": f"Bearer {key}"}


async def _list_provider(
    session: aiohttp.ClientSession, spec: ProviderSpec, api_base: str, key: str
) -> list[ListedModel]:
    url = api_base + spec.list_path
    headers = _auth_headers(spec.auth, key)
    params: dict[str, str] = {}
    if spec.paging == "anthropic":
        params = {"limit": "1000"}
    elif spec.paging == "gemini":
        params = {"pageSize": "1000"}
    models: list[ListedModel] = []
    seen_cursors: set[str] = set()
    for _ in range(MAX_PAGES):
        page = await _request_json(session, "GET", url, headers, params or None)
        try:
            models += spec.parse(page)
        except _Malformed as exc:
            raise _ListingFailed("malformed") from exc
        cursor = _next_cursor(spec.paging, page)
        if cursor is None:
            return models
        if cursor in seen_cursors:
            raise _ListingFailed("malformed")  # a cursor loop would page forever
        seen_cursors.add(cursor)
        params = {**params, ("after_id" if spec.paging == "anthropic" else "pageToken"): cursor}
    raise _ListingFailed("malformed")  # more than MAX_PAGES pages: not a model list


def _next_cursor(paging: Paging, page: Any) -> str | None:
    if not isinstance(page, Mapping):
        return None
    if paging == "anthropic" and page.get("has_more") is True:
        return _str(page.get("last_id")) or None
    if paging == "gemini":
        return _str(page.get("nextPageToken")) or None
    return None


# --------------------------------------------------------------------------------------
# Local / OpenAI-compatible servers
# --------------------------------------------------------------------------------------


def _server_root(base_url: str) -> str:
    base = base_url.strip().rstrip("/")
    return base.removesuffix("/v1")


def _server_api_base(server: ServerSpec) -> str:
    """What LiteLLM gets as ``api_base``: Ollama's root; ``.../v1`` for the others."""
    if server.kind == "ollama":
        return _server_root(server.base_url)
    base = server.base_url.strip().rstrip("/")
    if server.kind == "lmstudio":
        return _server_root(base) + "/v1"
    return base if re.search(r"/v\d+$", base) else base + "/v1"


async def _list_server(session: aiohttp.ClientSession, server: ServerSpec) -> list[ListedModel]:
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    try:
        if server.kind == "ollama":
            return await _list_ollama(session, _server_root(server.base_url), headers)
        if server.kind == "lmstudio":
            page = await _request_json(session, "GET", _server_root(server.base_url) + "/api/v0/models", headers)
            return _parse_lmstudio(page)
        page = await _request_json(session, "GET", _server_api_base(server) + "/models", headers)
        models = _parse_generic(page)
        if server.kind == "llamacpp":
            models = await _llamacpp_props(session, _server_root(server.base_url), headers, page, models)
        return models
    except _Malformed as exc:
        raise _ListingFailed("malformed") from exc


def _parse_lmstudio(page: Any) -> list[ListedModel]:
    """LM Studio's native ``GET /api/v0/models``: ``{"object": "list", "data": [{"id",
    "type": "llm"|"vlm"|"embeddings", "publisher", "arch", "compatibility_type",
    "quantization", "state": "loaded"|"not-loaded", "max_context_length",
    "capabilities": ["tool_use"]}]}``."""
    out = []
    for m in _items(page, "data"):
        kind = m.get("type")
        caps = _strs(m.get("capabilities"))
        out.append(
            ListedModel(
                id=_str(m["id"]),
                context_window=_int(m.get("max_context_length")),
                supports_tools=_contains(caps, "tool_use"),
                supports_images={"vlm": True, "llm": False}.get(kind) if isinstance(kind, str) else None,
                chat={"llm": True, "vlm": True, "embeddings": False}.get(kind) if isinstance(kind, str) else None,
            )
        )
    return out


async def _llamacpp_props(
    session: aiohttp.ClientSession,
    root: str,
    headers: Mapping[str, str],
    page: Any,
    models: list[ListedModel],
) -> list[ListedModel]:
    """llama.cpp: ``/v1/models`` gives ``meta.n_ctx`` (runtime) / ``meta.n_ctx_train``;
    ``/props`` gives ``chat_template_caps.supports_tools`` and ``modalities.vision`` for the
    model named ``model_alias`` (or the only model). Best effort: /props may be disabled."""
    # The ollama-style "models" list marks embedding-only models by capabilities.
    listed: Any = page.get("models") if isinstance(page, Mapping) else None
    embedding_only = {
        _str(m.get("name")) or _str(m.get("model"))
        for m in (listed if isinstance(listed, list) else [])
        if isinstance(m, Mapping)
        and (caps := _strs(m.get("capabilities"))) is not None
        and "embedding" in caps
        and "completion" not in caps
    }
    models = [replace(m, chat=False) if m.id in embedding_only else m for m in models]
    try:
        props = await _request_json(session, "GET", root + "/props", headers)
    except _ListingFailed:
        return models
    if not isinstance(props, Mapping):
        return models
    target = _str(props.get("model_alias"))
    if not target and len(models) == 1:
        target = models[0].id
    tools = _bool(_dict(props.get("chat_template_caps")).get("supports_tools"))
    vision = _bool(_dict(props.get("modalities")).get("vision"))
    return [
        replace(
            m,
            supports_tools=m.supports_tools if tools is None else tools,
            supports_images=m.supports_images if vision is None else vision,
        )
        if m.id == target
        else m
        for m in models
    ]


async def _list_ollama(session: aiohttp.ClientSession, root: str, headers: Mapping[str, str]) -> list[ListedModel]:
    """``GET /api/tags``: ``{"models": [{"name": "llama3.2:latest", "model", "modified_at",
    "size", "digest", "details": {"family", "parameter_size", "quantization_level"}}]}``;
    then ``POST /api/show {"model": name}`` per model: ``{"capabilities": ["completion",
    "tools", "vision", "embedding", ...], "model_info": {"general.architecture": "llama",
    "llama.context_length": 131072, ...}, "parameters": "num_ctx 8192\\n...", ...}``."""
    tags = await _request_json(session, "GET", root + "/api/tags", headers)
    names = [_str(m["name"]) for m in _items(tags, "models")]
    limiter = asyncio.Semaphore(OLLAMA_SHOW_CONCURRENCY)

    async def show(name: str) -> ListedModel:
        async with limiter:
            try:
                info = await _request_json(session, "POST", root + "/api/show", headers, body={"model": name})
            except _ListingFailed as exc:
                if exc.kind == "auth":
                    raise
                return ListedModel(id=name)  # listed, details unknown
        return _parse_ollama_show(name, info)

    return list(await asyncio.gather(*(show(n) for n in names)))


_NUM_CTX_RE: Final = re.compile(r"^\s*num_ctx\s+(\d+)\s*$", re.MULTILINE)


def _parse_ollama_show(name: str, info: Any) -> ListedModel:
    if not isinstance(info, Mapping):
        return ListedModel(id=name)
    caps = _strs(info.get("capabilities"))
    model_info = _dict(info.get("model_info"))
    arch = _str(model_info.get("general.architecture"))
    context = _int(model_info.get(f"{arch}.context_length")) if arch else None
    num_ctx = _NUM_CTX_RE.search(_str(info.get("parameters")))
    if num_ctx:  # a Modelfile's num_ctx is what the server actually runs with
        context = int(num_ctx.group(1)) or context
    return ListedModel(
        id=name,
        context_window=context,
        supports_tools=_contains(caps, "tools"),
        supports_images=_contains(caps, "vision"),
        chat=_contains(caps, "completion"),
    )


# --------------------------------------------------------------------------------------
# Building entries
# --------------------------------------------------------------------------------------


def _entry(
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


def _discovered(entry: ModelEntry, listed: ListedModel, reason: str) -> DiscoveredModel:
    return DiscoveredModel(
        entry=entry,
        ready=not reason,
        not_ready_reason=reason,
        input_cost_per_token=listed.input_cost_per_token,
        output_cost_per_token=listed.output_cost_per_token,
    )


def _failure_reason(failure: _ListingFailed | TimeoutError, shown: str, timeout: float, auth_text: str) -> str:
    """What a person can do about a failed listing. ``auth_text``: e.g. "the sidecar's
    ANTHROPIC_API_KEY was rejected" (names the variable, never the key)."""
    if isinstance(failure, TimeoutError):
        return f"server at {shown} did not answer within {timeout:g}s"
    if failure.kind == "auth":
        return f"{auth_text} (HTTP {failure.status})"
    if failure.kind == "http":
        return f"server at {shown} answered HTTP {failure.status} to the model listing"
    if failure.kind == "malformed":
        return f"server at {shown} returned a malformed model list"
    if failure.kind == "bad_url":
        return f"{shown} is not a valid http(s) base URL"
    return f"server at {shown} unreachable"


# --------------------------------------------------------------------------------------
# Merge and default choice
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# ModelDiscovery
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LastGood:
    api_base: str
    models: tuple[ListedModel, ...]


@dataclass(frozen=True)
class _Outcome:
    models: tuple[DiscoveredModel, ...]
    status: SourceStatus
    secret: str | None = field(default=None, repr=False)


class ModelDiscovery:
    """Discovers, caches and refreshes the sidecar's models.

    ``snapshot()`` returns config entries merged with discovered models, from cache within
    ``ttl`` seconds. ``environ`` is called at every refresh; keys and ``*_API_BASE``
    overrides are read from what it returns (never from ``os.environ`` behind its back).
    """

    def __init__(
        self,
        *,
        config_entries: Sequence[ModelEntry] = (),
        environ: Callable[[], Mapping[str, str]] = lambda: os.environ,
        servers: Sequence[ServerSpec | tuple[str, str, str | None]] = (),
        providers: Sequence[ProviderSpec] = PROVIDERS,
        ttl: float = DEFAULT_TTL_S,
        timeout: float = DEFAULT_TIMEOUT_S,
        default_ollama: str | None = DEFAULT_OLLAMA_URL,
        include_keyless: bool = True,
        keyless_limit: int | None = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        :param servers: ``ServerSpec``s or ``(kind, base_url, api_key | None)`` tuples.
        :param default_ollama: probed when no ``ollama`` server is configured
            (``OLLAMA_API_BASE`` in ``environ`` overrides the address); ``None`` disables the
            probe. It contributes models when it answers and nothing otherwise, never an error.
        :param include_keyless: list the LiteLLM-known chat models of providers without a key
            (not ready, "set <KEY> on the sidecar").
        :param keyless_limit: at most this many of those per provider, best first (None: all).
        """
        self.config_entries: tuple[ModelEntry, ...] = tuple(config_entries)
        self._environ = environ
        self._providers = tuple(providers)
        self._servers = _name_servers([s if isinstance(s, ServerSpec) else ServerSpec(*s) for s in servers])
        self.ttl = ttl
        self.timeout = timeout
        self.default_ollama = default_ollama
        self.include_keyless = include_keyless
        self.keyless_limit = keyless_limit
        self._clock = clock
        self._last_good: dict[str, _LastGood] = {}
        self._snapshot: tuple[DiscoveredModel, ...] | None = None
        self._snapshot_at = 0.0
        self._statuses: tuple[SourceStatus, ...] = ()
        self._secrets: frozenset[str] = frozenset()
        self._inflight: asyncio.Task[tuple[DiscoveredModel, ...]] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._last_reported: dict[str, str] = {}

    # -- public -------------------------------------------------------------------------

    async def snapshot(self, refresh: bool = False) -> list[DiscoveredModel]:
        """Config entries + discovered models; refreshed when stale or ``refresh``."""
        if not refresh and self._snapshot is not None and self._clock() - self._snapshot_at < self.ttl:
            return list(self._snapshot)
        return list(await self._shared_refresh())

    async def lookup(self, alias: str) -> DiscoveredModel | None:
        """The model named ``alias`` in the (cached, or refreshed when stale) snapshot."""
        return next((m for m in await self.snapshot() if m.alias == alias), None)

    def cached(self) -> list[DiscoveredModel]:
        """The last snapshot without any I/O (empty before the first refresh)."""
        return list(self._snapshot or ())

    @property
    def statuses(self) -> tuple[SourceStatus, ...]:
        """Per provider / server outcome of the last refresh."""
        return self._statuses

    @property
    def secrets(self) -> frozenset[str]:
        """Every key value the last refresh used: add them to the redactor."""
        return self._secrets

    def start(self) -> None:
        """Refresh now and then every ``ttl`` seconds in the background (needs a running loop)."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="model-discovery")

    async def stop(self) -> None:
        """Cancel the background loop and any refresh in flight."""
        tasks = [t for t in (self._loop_task, self._inflight) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loop_task = None
        self._inflight = None

    # -- refresh machinery --------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._shared_refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("model discovery refresh failed")
            await asyncio.sleep(self.ttl)

    async def _shared_refresh(self) -> tuple[DiscoveredModel, ...]:
        task = self._inflight
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._refresh(), name="model-discovery-refresh")
            self._inflight = task
        # shield: a cancelled caller must not cancel the refresh the others wait for
        return await asyncio.shield(task)

    async def _refresh(self) -> tuple[DiscoveredModel, ...]:
        env = dict(self._environ())
        started = time.time()
        if "litellm" not in sys.modules:  # the first import takes seconds: not on the loop
            await asyncio.to_thread(_model_map)
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=False
        ) as session:
            jobs = [self._guard(spec.name, self._provider(session, spec, env)) for spec in self._providers]
            jobs += [self._guard(s.name or s.kind, self._server(session, s, started)) for s in self._servers]
            probe = self._probe_server(env)
            if probe is not None:
                jobs.append(self._guard("ollama", self._server(session, probe, started, probe=True)))
            outcomes = await asyncio.gather(*jobs)
        discovered: list[DiscoveredModel] = []
        for outcome in outcomes:
            discovered += sorted(outcome.models, key=lambda m: m.alias)
        discovered.sort(key=lambda m: not m.ready)  # stable: ready first, source order kept
        merged = tuple(merge(self.config_entries, discovered))
        self._statuses = tuple(replace(o.status, checked_at=started) for o in outcomes)
        self._secrets = frozenset(o.secret for o in outcomes if o.secret)
        self._snapshot, self._snapshot_at = merged, self._clock()
        self._report()
        return merged

    async def _guard(self, source: str, job: Awaitable[_Outcome]) -> _Outcome:
        """Whatever happens in one source stays there (and is bounded by ``timeout``)."""
        try:
            return await job
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("model discovery for %s failed: %s", source, type(exc).__name__)
            status = SourceStatus(source, "", ok=False, reason=f"discovery of {source} failed (sidecar error)")
            return _Outcome((), status)

    def _probe_server(self, env: Mapping[str, str]) -> ServerSpec | None:
        if self.default_ollama is None or any(s.kind == "ollama" for s in self._servers):
            return None
        base = env.get("OLLAMA_API_BASE") or self.default_ollama
        taken = {s.name for s in self._servers}
        return ServerSpec("ollama", base, None, "ollama" if "ollama" not in taken else f"ollama@{_hostport(base)}")

    async def _provider(self, session: aiohttp.ClientSession, spec: ProviderSpec, env: Mapping[str, str]) -> _Outcome:
        key_var, key = next(((v, env[v]) for v in spec.key_envs if env.get(v)), (spec.key_envs[0], ""))
        override = env.get(spec.base_env, "").strip()
        api_base = spec.normalize_base(override) if override else spec.default_base
        shown = _shown(api_base)
        params: dict[str, Any] = {"api_key": key} if key else {}
        if override:
            params["api_base"] = api_base

        def build(listed: Iterable[ListedModel], reason: str, *, fill_from_map: bool) -> tuple[DiscoveredModel, ...]:
            out = []
            for lm in listed:
                info = _map_entry(spec.name, lm.id, spec.map_bare_keys)
                if not is_chat_model(lm.id, lm.chat, _str(info.get("mode")) if info else None):
                    continue
                lm = _with_map_info(lm, info) if fill_from_map else lm
                alias = f"{spec.name}/{lm.id}"
                out.append(_discovered(_entry(alias, alias, spec.name, lm, params), lm, reason))
            return tuple(out)

        if not key:
            self._last_good.pop(spec.name, None)
            reason = f"set {spec.key_envs[0]} on the sidecar"
            models = build(known_chat_models(spec.name), reason, fill_from_map=False) if self.include_keyless else ()
            if self.keyless_limit is not None:  # a sample of what a key would unlock, best first
                models = tuple(sorted(models, key=preference)[: self.keyless_limit])
            return _Outcome(models, SourceStatus(spec.name, shown, ok=False, reason=reason, models=len(models)))

        try:
            async with asyncio.timeout(self.timeout):
                listed = await _list_provider(session, spec, api_base, key)
        except (_ListingFailed, TimeoutError) as failure:
            reason = _failure_reason(failure, shown, self.timeout, f"the sidecar's {key_var} was rejected")
            last = self._last_good.get(spec.name)
            last_models = last.models if last is not None and last.api_base == api_base else None
            if isinstance(failure, _ListingFailed) and failure.kind == "auth":
                self._last_good.pop(spec.name, None)
                fallback = last_models if last_models is not None else known_chat_models(spec.name)
                models = build(fallback, reason, fill_from_map=last_models is not None)
            elif last_models is not None:
                models = build(last_models, "", fill_from_map=True)
                status = SourceStatus(
                    spec.name, shown, ok=False, reason=reason, models=len(models), serving_last_good=True
                )
                return _Outcome(models, status, key)
            else:
                models = build(known_chat_models(spec.name), reason, fill_from_map=False)
            return _Outcome(models, SourceStatus(spec.name, shown, ok=False, reason=reason, models=len(models)), key)
        self._last_good[spec.name] = _LastGood(api_base, tuple(listed))
        models = build(listed, "", fill_from_map=True)
        return _Outcome(models, SourceStatus(spec.name, shown, ok=True, models=len(models)), key)

    async def _server(
        self, session: aiohttp.ClientSession, server: ServerSpec, started: float, *, probe: bool = False
    ) -> _Outcome:
        name = server.name or server.kind
        litellm_prefix, provider = _SERVER_LITELLM[server.kind]
        api_base = _server_api_base(server)
        shown = _shown(server.base_url.strip())
        memory_key = f"server:{name}"
        params: dict[str, Any] = {"api_base": api_base}
        if server.api_key:
            params["api_key"] = server.api_key

        def build(listed: Iterable[ListedModel], reason: str) -> tuple[DiscoveredModel, ...]:
            out = []
            for lm in listed:
                info = _map_entry("ollama", lm.id.removesuffix(":latest")) if server.kind == "ollama" else None
                if not is_chat_model(lm.id, lm.chat, _str(info.get("mode")) if info else None):
                    continue
                lm = _with_map_info(lm, info)
                model_id = lm.id.removesuffix(":latest") if server.kind == "ollama" else lm.id
                entry = _entry(f"{name}/{model_id}", f"{litellm_prefix}/{lm.id}", provider, lm, params)
                out.append(_discovered(entry, lm, reason))
            return tuple(out)

        try:
            async with asyncio.timeout(self.timeout):
                listed = await _list_server(session, server)
        except (_ListingFailed, TimeoutError) as failure:
            hint = (
                f"server at {shown} rejected the sidecar's API key"
                if server.api_key
                else f"server at {shown} requires an API key"
            )
            reason = _failure_reason(failure, shown, self.timeout, hint)
            last = self._last_good.get(memory_key)
            last_models = last.models if last is not None and last.api_base == api_base else None
            if isinstance(failure, _ListingFailed) and failure.kind == "auth":
                self._last_good.pop(memory_key, None)
                models = build(last_models or (), reason)
            elif last_models is not None:
                models = build(last_models, "")
                status = SourceStatus(
                    name, shown, ok=False, reason=reason, models=len(models), serving_last_good=True, probe=probe
                )
                return _Outcome(models, status, server.api_key)
            else:
                models = ()
            status = SourceStatus(name, shown, ok=False, reason=reason, models=len(models), probe=probe)
            return _Outcome(models, status, server.api_key)
        self._last_good[memory_key] = _LastGood(api_base, tuple(listed))
        models = build(listed, "")
        return _Outcome(models, SourceStatus(name, shown, ok=True, models=len(models), probe=probe), server.api_key)

    def _report(self) -> None:
        """Log each source when its state changes (INFO/WARNING) and every refresh at DEBUG."""
        for status in self._statuses:
            state = "ok" if status.ok else status.reason
            changed = self._last_reported.get(status.source) != state
            self._last_reported[status.source] = state
            if status.ok:
                level = logging.INFO if changed else logging.DEBUG
                log.log(level, "discovery: %s: %d chat models", status.source, status.models)
            elif status.probe or status.reason.startswith("set "):
                log.debug("discovery: %s: %s", status.source, status.reason)
            else:
                level = logging.WARNING if changed else logging.DEBUG
                suffix = f" (serving the last good listing of {status.models})" if status.serving_last_good else ""
                log.log(level, "discovery: %s: %s%s", status.source, status.reason, suffix)


def _hostport(url: str) -> str:
    try:
        parsed = URL(url.strip())
        return f"{parsed.host}:{parsed.port}" if parsed.host else "invalid"
    except (ValueError, TypeError):
        return "invalid"


def _name_servers(servers: list[ServerSpec]) -> tuple[ServerSpec, ...]:
    """Give each server its alias prefix: its name, else its kind; clashes get ``@host:port``
    (and then ``#n``) so two servers never produce the same alias."""
    names = [s.name or s.kind for s in servers]
    out: list[ServerSpec] = []
    used: set[str] = set()
    for server, name in zip(servers, names, strict=True):
        if names.count(name) > 1:
            name = f"{name}@{_hostport(server.base_url)}"
        unique, n = name, 2
        while unique in used:
            unique, n = f"{name}#{n}", n + 1
        used.add(unique)
        out.append(replace(server, name=unique))
    return tuple(out)
