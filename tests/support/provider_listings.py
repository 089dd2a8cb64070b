"""Real HTTP servers on 127.0.0.1 answering model listings in each provider's own shape.

:class:`ListingServer` serves one provider (or local server kind) with the path, auth
header and pagination the real service uses, so discovery is exercised over real HTTP.
``mode`` switches its behaviour between requests: ``ok``, ``401``, ``403``, ``500``,
``hang`` (never answers), ``malformed`` (truncated JSON) or ``badshape`` (valid JSON, not
a model list).

Where the shapes come from (field names only; values are illustrative):

* OpenAI ``GET /v1/models`` -- API reference "List models" / openai-python ``Model``:
  ``{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}``.
  DeepSeek ``GET /models`` and xAI ``GET /v1/models`` answer the same shape.
* Anthropic ``GET /v1/models?limit&after_id`` with ``x-api-key`` + ``anthropic-version`` --
  anthropic-sdk-python ``types/model_info.py``, ``model_capabilities.py``,
  ``model_list_params.py``: ``{"data": [{"type": "model", "id", "display_name",
  "created_at", "max_input_tokens", "max_tokens", "capabilities": {"image_input":
  {"supported"}, "pdf_input", "thinking", ...}}], "has_more", "first_id", "last_id"}``.
* Gemini ``GET /v1beta/models?pageSize&pageToken`` with ``x-goog-api-key`` -- Gemini API
  reference "models.list": ``{"models": [{"name": "models/<id>", "baseModelId",
  "version", "displayName", "description", "inputTokenLimit", "outputTokenLimit",
  "supportedGenerationMethods"}], "nextPageToken"}``.
* Mistral ``GET /v1/models`` -- Mistral API reference "List Models" (BaseModelCard,
  ModelCapabilities): ``{"object": "list", "data": [{"id", "object", "created", "owned_by",
  "capabilities": {"completion_chat", "completion_fim", "function_calling", "fine_tuning",
  "vision", "classification", "moderation", "ocr"}, "name", "description",
  "max_context_length", "aliases", "deprecation", "default_model_temperature", "type"}]}``.
* Groq ``GET /openai/v1/models`` -- Groq API reference "List models": ``{"object": "list",
  "data": [{"id", "object", "created", "owned_by", "active", "context_window",
  "public_apps", "max_completion_tokens"}]}``.
* OpenRouter ``GET /api/v1/models`` -- OpenRouter API reference "List available models":
  ``{"data": [{"id", "canonical_slug", "name", "created", "description", "context_length",
  "architecture": {"modality", "input_modalities", "output_modalities", "tokenizer",
  "instruct_type"}, "pricing": {"prompt", "completion", ...} (strings, USD per token),
  "top_provider": {"context_length", "max_completion_tokens", "is_moderated"},
  "per_request_limits", "supported_parameters"}]}``.
* Together ``GET /v1/models`` -- Together API reference "List all models": a top-level
  array ``[{"id", "object": "model", "created", "type", "display_name", "organization",
  "link", "license", "context_length", "config", "pricing": {"hourly", "input", "output",
  "base", "finetune"} (USD per million tokens)}]``.
* Ollama ``GET /api/tags`` and ``POST /api/show`` -- Ollama API docs: ``{"models":
  [{"name", "model", "modified_at", "size", "digest", "details": {...}}]}`` and ``{"modelfile",
  "parameters", "template", "details", "model_info": {"general.architecture",
  "<arch>.context_length", ...}, "capabilities": ["completion", "tools", "vision",
  "embedding", ...]}``.
* llama.cpp ``GET /v1/models`` and ``GET /props`` -- captured from the real llama.cpp server
  this repo runs (xllamacpp, tests/support/gemma_server.py): ``{"models": [{"name",
  "model", "capabilities", ...}], "object": "list", "data": [{"id", "aliases", "object",
  "architecture": {"input_modalities", "output_modalities"}, "owned_by": "llamacpp",
  "meta": {"vocab_type", "n_vocab", "n_ctx", "n_ctx_train", "n_embd", "n_params", "size",
  "ftype"}}]}``; ``/props``: ``{"model_alias", "modalities": {"vision", ...},
  "chat_template_caps": {"supports_tools", ...}, ...}``.
* vLLM ``GET /v1/models`` -- vLLM's OpenAI server ``ModelCard``: ``{"object": "list",
  "data": [{"id", "object", "created", "owned_by": "vllm", "root", "parent",
  "max_model_len", "permission"}]}``.
* LM Studio ``GET /api/v0/models`` -- LM Studio REST API (v0) docs: ``{"object": "list",
  "data": [{"id", "object", "type": "llm"|"vlm"|"embeddings", "publisher", "arch",
  "compatibility_type", "quantization", "state", "max_context_length", "capabilities"}]}``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from aiohttp import web

__all__ = ["DEFAULT_LISTINGS", "ListingServer", "env_base"]

# ---- default listings: one chat model at least, plus non-chat ones where the shape allows --

_OPENAI = [
    {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"},
    {"id": "gpt-zz-unmapped", "object": "model", "created": 1721172741, "owned_by": "system"},
    {"id": "text-embedding-3-small", "object": "model", "created": 1705948997, "owned_by": "system"},
    {"id": "whisper-1", "object": "model", "created": 1677532384, "owned_by": "openai-internal"},
    {"id": "tts-1", "object": "model", "created": 1681940951, "owned_by": "openai-internal"},
    {"id": "dall-e-3", "object": "model", "created": 1698785189, "owned_by": "system"},
    {"id": "gpt-image-1", "object": "model", "created": 1745517030, "owned_by": "system"},
    {"id": "omni-moderation-latest", "object": "model", "created": 1731689265, "owned_by": "system"},
    {"id": "gpt-4o-realtime-preview", "object": "model", "created": 1727659998, "owned_by": "system"},
    {"id": "davinci-002", "object": "model", "created": 1692634301, "owned_by": "system"},
]


def _claude(model_id: str, name: str, max_in: int | None, max_out: int | None, images: bool | None) -> dict[str, Any]:
    model: dict[str, Any] = {
        "type": "model",
        "id": model_id,
        "display_name": name,
        "created_at": "2025-10-01T00:00:00Z",
    }
    if max_in is not None:
        model["max_input_tokens"] = max_in
        model["max_tokens"] = max_out
    if images is not None:
        model["capabilities"] = {
            "batch": {"supported": True},
            "citations": {"supported": True},
            "image_input": {"supported": images},
            "pdf_input": {"supported": images},
            "structured_outputs": {"supported": True},
        }
    return model


_ANTHROPIC = [
    _claude("claude-haiku-4-5", "Claude Haiku 4.5", 200000, 64000, True),
    _claude("claude-sonnet-4-5", "Claude Sonnet 4.5", 1000000, 64000, True),
    # an older answer without limits or capabilities: LiteLLM's map fills what it knows
    _claude("claude-opus-4-5", "Claude Opus 4.5", None, None, None),
    _claude("claude-zz-unmapped", "Claude ZZ", None, None, None),
    _claude("claude-zz-text-only", "Claude ZZ text", 100000, 8000, False),
]


def _gemini(model_id: str, name: str, limits: tuple[int, int], methods: list[str]) -> dict[str, Any]:
    return {
        "name": f"models/{model_id}",
        "baseModelId": model_id,
        "version": "001",
        "displayName": name,
        "description": name,
        "inputTokenLimit": limits[0],
        "outputTokenLimit": limits[1],
        "supportedGenerationMethods": methods,
        "temperature": 1,
        "topP": 0.95,
    }


_GEMINI = [
    _gemini("gemini-2.5-flash", "Gemini 2.5 Flash", (1048576, 65536), ["generateContent", "countTokens"]),
    _gemini("gemini-zz-unmapped", "Gemini ZZ", (32768, 8192), ["generateContent", "countTokens"]),
    _gemini("text-embedding-004", "Text Embedding 004", (2048, 1), ["embedContent"]),
    _gemini("imagen-4.0-generate-001", "Imagen 4", (480, 8192), ["predict"]),
    _gemini("gemini-2.5-flash-preview-tts", "Gemini 2.5 Flash TTS", (8192, 16384), ["generateContent"]),
    _gemini("aqa", "Model that performs Attributed Question Answering.", (7168, 1024), ["generateAnswer"]),
    _gemini("gemini-2.5-pro", "Gemini 2.5 Pro", (1048576, 65536), ["generateContent", "countTokens"]),
]


def _mistral(model_id: str, ctx: int, **caps: bool) -> dict[str, Any]:
    capabilities = {
        "completion_chat": False,
        "completion_fim": False,
        "function_calling": False,
        "fine_tuning": False,
        "vision": False,
        "classification": False,
    } | caps
    return {
        "id": model_id,
        "object": "model",
        "created": 1750000000,
        "owned_by": "mistralai",
        "capabilities": capabilities,
        "name": model_id,
        "description": model_id,
        "max_context_length": ctx,
        "aliases": [],
        "deprecation": None,
        "default_model_temperature": 0.3,
        "type": "base",
    }


_MISTRAL = [
    _mistral("mistral-small-latest", 131072, completion_chat=True, function_calling=True, vision=True),
    _mistral("open-zz-unmapped", 32768, completion_chat=True),
    _mistral("mistral-embed", 8192),
    _mistral("mistral-moderation-latest", 8192, classification=True),
    _mistral("mistral-ocr-latest", 16384, vision=True),
]


def _groq(model_id: str, ctx: int, max_out: int, owner: str, active: bool = True) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 1693721698,
        "owned_by": owner,
        "active": active,
        "context_window": ctx,
        "public_apps": None,
        "max_completion_tokens": max_out,
    }


_GROQ = [
    _groq("openai/gpt-oss-20b", 131072, 65536, "OpenAI"),
    _groq("zz-unmapped-70b", 8192, 4096, "Someone"),
    _groq("whisper-large-v3", 448, 448, "OpenAI"),
    _groq("playai-tts", 8192, 8192, "PlayAI"),
    _groq("meta-llama/llama-guard-4-12b", 131072, 1024, "Meta"),
    _groq("retired-chat-model", 8192, 8192, "Someone", active=False),
]


def _router(
    model_id: str,
    name: str,
    ctx: int,
    inputs: list[str],
    outputs: list[str],
    params: list[str],
    prices: tuple[str, str],
    max_out: int | None,
) -> dict[str, Any]:
    return {
        "id": model_id,
        "canonical_slug": model_id,
        "name": name,
        "created": 1721260800,
        "description": name,
        "context_length": ctx,
        "architecture": {
            "modality": "+".join(inputs) + "->" + "+".join(outputs),
            "input_modalities": inputs,
            "output_modalities": outputs,
            "tokenizer": "Other",
            "instruct_type": None,
        },
        "pricing": {"prompt": prices[0], "completion": prices[1], "request": "0", "image": "0"},
        "top_provider": {"context_length": ctx, "max_completion_tokens": max_out, "is_moderated": False},
        "per_request_limits": None,
        "supported_parameters": params,
    }


_OPENROUTER = [
    _router(
        "openai/gpt-4o-mini",
        "OpenAI: GPT-4o-mini",
        128000,
        ["text", "image", "file"],
        ["text"],
        ["max_tokens", "temperature", "tools", "tool_choice", "response_format"],
        ("0.00000015", "0.0000006"),
        16384,
    ),
    _router(
        "zz/unmapped-7b-instruct",
        "ZZ: Unmapped 7B",
        32768,
        ["text"],
        ["text"],
        ["max_tokens", "temperature", "top_p"],
        ("0.00000003", "0.00000005"),
        None,
    ),
    _router(
        "google/gemini-2.5-flash-image",
        "Google: Nano Banana",
        32768,
        ["image", "text"],
        ["image", "text"],
        ["max_tokens", "temperature"],
        ("0.0000003", "0.0000025"),
        8192,
    ),
    _router(
        "zz/speech-only",
        "ZZ: speech",
        4096,
        ["text"],
        ["audio"],
        ["max_tokens"],
        ("0.000001", "0.00001"),
        4096,
    ),
]


def _together(model_id: str, kind: str, ctx: int | None, prices: tuple[float, float]) -> dict[str, Any]:
    model: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": 1733461108,
        "type": kind,
        "running": False,
        "display_name": model_id.split("/")[-1].replace("-", " "),
        "organization": model_id.split("/")[0],
        "link": f"https://huggingface.co/{model_id}",
        "license": "other",
        "config": {"chat_template": None, "stop": [], "bos_token": None, "eos_token": None},
        "pricing": {"hourly": 0, "input": prices[0], "output": prices[1], "base": 0, "finetune": 0},
    }
    if ctx is not None:
        model["context_length"] = ctx
    return model


_TOGETHER = [
    _together("meta-llama/Llama-3.3-70B-Instruct-Turbo", "chat", 131072, (0.88, 0.88)),
    _together("zz-org/Unmapped-Chat-8B", "chat", None, (0.1, 0.2)),
    _together("BAAI/bge-large-en-v1.5", "embedding", 512, (0.02, 0)),
    _together("black-forest-labs/FLUX.1-schnell", "image", None, (0, 0)),
    _together("openai/whisper-large-v3", "transcribe", None, (0, 0)),
    _together("Salesforce/Llama-Rank-V1", "rerank", 8192, (0.1, 0.1)),
    _together("meta-llama/Meta-Llama-Guard-3-8B", "moderation", 8192, (0.2, 0.2)),
    _together("meta-llama/Llama-2-70b-hf", "language", 4096, (0.9, 0.9)),
]

_DEEPSEEK = [
    {"id": "deepseek-chat", "object": "model", "owned_by": "deepseek"},
    {"id": "deepseek-reasoner", "object": "model", "owned_by": "deepseek"},
]

_XAI = [
    {"id": "grok-4.3", "object": "model", "created": 1752019200, "owned_by": "xai"},
    {"id": "grok-2-image-1212", "object": "model", "created": 1736726400, "owned_by": "xai"},
    {"id": "grok-zz-unmapped", "object": "model", "created": 1752019200, "owned_by": "xai"},
]

# Ollama: /api/tags entries, with what /api/show answers for each.
_OLLAMA = [
    {
        "tag": {"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 2019393189},
        "show": {
            "capabilities": ["completion", "tools"],
            "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
            "parameters": 'stop "<|eot_id|>"',
        },
    },
    {
        "tag": {"name": "llava:7b", "model": "llava:7b", "size": 4733363377},
        "show": {
            "capabilities": ["completion", "vision"],
            "model_info": {"general.architecture": "llama", "llama.context_length": 32768},
            "parameters": 'num_ctx 8192\nstop "</s>"',
        },
    },
    {
        "tag": {"name": "nomic-embed-text:latest", "model": "nomic-embed-text:latest", "size": 274302450},
        "show": {
            "capabilities": ["embedding"],
            "model_info": {"general.architecture": "nomic-bert", "nomic-bert.context_length": 2048},
            "parameters": "num_ctx 8192",
        },
    },
    {
        "tag": {"name": "all-minilm:22m", "model": "all-minilm:22m", "size": 45960996},
        "show": {
            "capabilities": ["embedding"],
            "model_info": {"general.architecture": "bert", "bert.context_length": 512},
        },
    },
]

_LLAMACPP = [
    {
        "id": "gemma-3-270m",
        "aliases": ["gemma-3-270m"],
        "tags": [],
        "object": "model",
        "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
        "created": 1795318400,
        "owned_by": "llamacpp",
        "meta": {
            "vocab_type": 1,
            "n_vocab": 262144,
            "n_ctx": 4096,
            "n_ctx_train": 32768,
            "n_embd": 640,
            "n_params": 268098176,
            "size": 246587904,
            "ftype": "Q4_K - Medium",
        },
    },
    {
        "id": "nomic-embed-text-v1.5.Q8_0.gguf",
        "object": "model",
        "created": 1795318400,
        "owned_by": "llamacpp",
        "meta": {"vocab_type": 2, "n_vocab": 30522, "n_ctx_train": 2048, "n_embd": 768},
    },
]

_VLLM = [
    {
        "id": "meta-llama/Llama-3.1-8B-Instruct",
        "object": "model",
        "created": 1733000000,
        "owned_by": "vllm",
        "root": "meta-llama/Llama-3.1-8B-Instruct",
        "parent": None,
        "max_model_len": 8192,
        "permission": [{"id": "modelperm-1", "object": "model_permission", "allow_sampling": True}],
    },
    {
        "id": "BAAI/bge-m3",
        "object": "model",
        "created": 1733000000,
        "owned_by": "vllm",
        "root": "BAAI/bge-m3",
        "parent": None,
        "max_model_len": 8192,
        "permission": [],
    },
]

_LMSTUDIO = [
    {
        "id": "qwen2.5-7b-instruct",
        "object": "model",
        "type": "llm",
        "publisher": "lmstudio-community",
        "arch": "qwen2",
        "compatibility_type": "gguf",
        "quantization": "Q4_K_M",
        "state": "loaded",
        "max_context_length": 32768,
        "capabilities": ["tool_use"],
    },
    {
        "id": "qwen2-vl-2b-instruct",
        "object": "model",
        "type": "vlm",
        "publisher": "mlx-community",
        "arch": "qwen2_vl",
        "compatibility_type": "mlx",
        "quantization": "4bit",
        "state": "not-loaded",
        "max_context_length": 32768,
    },
    {
        "id": "text-embedding-nomic-embed-text-v1.5",
        "object": "model",
        "type": "embeddings",
        "publisher": "nomic-ai",
        "arch": "nomic-bert",
        "compatibility_type": "gguf",
        "quantization": "Q4_0",
        "state": "not-loaded",
        "max_context_length": 2048,
    },
]

_GENERIC = [
    {"id": "house-chat-v2", "object": "model", "created": 1733000000, "owned_by": "acme"},
    {"id": "house-embedding-small", "object": "model", "created": 1733000000, "owned_by": "acme"},
]

DEFAULT_LISTINGS: dict[str, list[dict[str, Any]]] = {
    "openai": _OPENAI,
    "anthropic": _ANTHROPIC,
    "gemini": _GEMINI,
    "mistral": _MISTRAL,
    "groq": _GROQ,
    "openrouter": _OPENROUTER,
    "together_ai": _TOGETHER,
    "deepseek": _DEEPSEEK,
    "xai": _XAI,
    "ollama": _OLLAMA,
    "llamacpp": _LLAMACPP,
    "vllm": _VLLM,
    "lmstudio": _LMSTUDIO,
    "openai_compatible": _GENERIC,
}

# Where each kind's listing lives; the value of its <PROVIDER>_API_BASE is url + prefix.
_PREFIX = {
    "openai": "/v1",
    "anthropic": "",
    "gemini": "/v1beta",
    "mistral": "/v1",
    "groq": "/openai/v1",
    "openrouter": "/api/v1",
    "together_ai": "/v1",
    "deepseek": "",
    "xai": "/v1",
    "ollama": "",
    "llamacpp": "",
    "vllm": "",
    "lmstudio": "",
    "openai_compatible": "",
}


def env_base(server: ListingServer) -> str:
    """The ``<PROVIDER>_API_BASE`` / server base URL a user would configure for it."""
    return server.url + _PREFIX[server.kind]


class ListingServer:
    """One provider's model-listing endpoint on ``127.0.0.1`` (ephemeral or given port)."""

    def __init__(
        self,
        kind: str,
        *,
        key: str | None = None,
        models: list[dict[str, Any]] | None = None,
        page_size: int = 2,
        port: int = 0,
    ) -> None:
        self.kind = kind
        self.key = key
        self.models = copy.deepcopy(DEFAULT_LISTINGS[kind] if models is None else models)
        self.page_size = page_size
        self.mode = "ok"
        self.hits = 0  # listing requests (first pages and follow-ups)
        self.first_hit_at: float | None = None  # time.monotonic() of the first one
        self._port = port
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def start(self) -> Self:
        app = web.Application()
        routes: dict[str, Callable[[web.Request], Any]] = {
            "openai": self._openai_style,
            "deepseek": self._openai_style,
            "xai": self._openai_style,
            "mistral": self._openai_style,
            "groq": self._openai_style,
            "openrouter": self._openai_style,
            "together_ai": self._together,
            "vllm": self._openai_style,
            "llamacpp": self._llamacpp,
            "openai_compatible": self._openai_style,
            "anthropic": self._anthropic,
            "gemini": self._gemini,
        }
        if self.kind == "ollama":
            app.router.add_get("/api/tags", self._ollama_tags)
            app.router.add_post("/api/show", self._ollama_show)
        elif self.kind == "lmstudio":
            app.router.add_get("/api/v0/models", self._openai_style)
        else:
            local = self.kind in ("vllm", "llamacpp", "openai_compatible")
            path = _PREFIX[self.kind] + ("/v1" if local or self.kind == "anthropic" else "") + "/models"
            app.router.add_get(path, routes[self.kind])
            if self.kind == "llamacpp":
                app.router.add_get("/props", self._llamacpp_props)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port, reuse_address=True)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- shared behaviour -----------------------------------------------------------------

    def _presented_key(self, request: web.Request) -> str | None:
        if self.kind == "anthropic":
            if request.headers.get("anthropic-version") is None:
                return None
            return request.headers.get("x-api-key")
        if self.kind == "gemini":
            return request.headers.get("x-goog-api-key")
        auth = request.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None

    async def _gate(self, request: web.Request) -> web.Response | None:
        """Auth and failure modes; None means: answer normally."""
        self.hits += 1
        if self.first_hit_at is None:
            self.first_hit_at = time.monotonic()
        if self.mode == "hang":
            await self._release.wait()  # until the server stops: longer than any test timeout
            return web.Response(status=503)
        if self.mode in ("401", "403"):
            return self._error(int(self.mode))
        if self.mode == "500":
            return self._error(500)
        if self.key is not None and self._presented_key(request) != self.key:
            return self._error(401)
        if self.mode == "malformed":
            return web.Response(body=b'{"data": [{"id": "gpt-4o-mi', content_type="application/json")
        if self.mode == "badshape":
            return web.json_response({"data": "not a list", "models": 7})
        return None

    def _error(self, status: int) -> web.Response:
        """Each provider's error body (discovery must never echo it)."""
        message = {401: "invalid x-api-key", 403: "forbidden", 500: "internal error"}[status]
        if self.kind == "anthropic":
            body: Any = {"type": "error", "error": {"type": "authentication_error", "message": message}}
        elif self.kind == "gemini":
            body = {"error": {"code": status, "message": message, "status": "UNAUTHENTICATED"}}
        else:
            body = {"error": {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}}
        return web.json_response(body, status=status)

    # -- listing handlers -------------------------------------------------------------------

    async def _openai_style(self, request: web.Request) -> web.Response:
        if (gated := await self._gate(request)) is not None:
            return gated
        return web.json_response({"object": "list", "data": self.models})

    async def _together(self, request: web.Request) -> web.Response:
        if (gated := await self._gate(request)) is not None:
            return gated
        return web.json_response(self.models)  # a top-level array, as Together answers

    async def _llamacpp(self, request: web.Request) -> web.Response:
        if (gated := await self._gate(request)) is not None:
            return gated
        ollama_style = [
            {"name": m["id"], "model": m["id"], "type": "model", "capabilities": ["completion"]} for m in self.models
        ]
        return web.json_response({"models": ollama_style, "object": "list", "data": self.models})

    async def _llamacpp_props(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "total_slots": 1,
                "model_alias": self.models[0]["id"] if self.models else "",
                "modalities": {"vision": False, "video": False, "audio": False},
                "chat_template_caps": {"supports_tools": True, "supports_system_role": True},
                "build_info": "b0-test",
            }
        )

    async def _anthropic(self, request: web.Request) -> web.Response:
        if (gated := await self._gate(request)) is not None:
            return gated
        limit = min(int(request.query.get("limit", "20")), self.page_size)
        start = 0
        if after := request.query.get("after_id"):
            start = next(i for i, m in enumerate(self.models) if m["id"] == after) + 1
        page = self.models[start : start + limit]
        return web.json_response(
            {
                "data": page,
                "has_more": start + limit < len(self.models),
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            }
        )

    async def _gemini(self, request: web.Request) -> web.Response:
        if (gated := await self._gate(request)) is not None:
            return gated
        size = min(int(request.query.get("pageSize", "50")), self.page_size)
        start = int(request.query.get("pageToken", "0") or 0)
        body: dict[str, Any] = {"models": self.models[start : start + size]}
        if start + size < len(self.models):
            body["nextPageToken"] = str(start + size)
        return web.json_response(body)

    async def _ollama_tags(self, request: web.Request) -> web.Response:
        if (gated := await self._gate(request)) is not None:
            return gated
        tags = [
            m["tag"] | {"modified_at": "2025-01-01T00:00:00Z", "digest": "0" * 64, "details": {"format": "gguf"}}
            for m in self.models
        ]
        return web.json_response({"models": tags})

    async def _ollama_show(self, request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        name = body.get("model") or body.get("name")
        for m in self.models:
            if m["tag"]["name"] == name:
                return web.json_response({"modelfile": "", "template": "", "details": {"format": "gguf"}} | m["show"])
        return web.json_response({"error": f"model '{name}' not found"}, status=404)
