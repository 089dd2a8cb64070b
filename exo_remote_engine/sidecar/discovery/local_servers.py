"""Local and OpenAI-compatible servers (Ollama, llama.cpp, vLLM, LM Studio, generic
``/v1/models``): where each kind lists its models, what LiteLLM calls them, and the alias
prefix each server gets."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final

import aiohttp
from yarl import URL

from exo_remote_engine.sidecar.discovery.http_listing import ListingFailed, request_json
from exo_remote_engine.sidecar.discovery.parsers.servers import parse_generic, parse_lmstudio, parse_ollama_show
from exo_remote_engine.sidecar.discovery.parsers.untrusted_json import (
    Malformed,
    as_bool,
    as_dict,
    as_str,
    as_strs,
    items_of,
)
from exo_remote_engine.sidecar.discovery.types import ListedModel, ServerSpec

OLLAMA_SHOW_CONCURRENCY: Final = 8
# kind -> (LiteLLM model prefix, provider family shown to clients)
SERVER_LITELLM: Final = {
    "ollama": ("ollama_chat", "ollama"),
    "llamacpp": ("openai", "openai"),
    "vllm": ("hosted_vllm", "hosted_vllm"),
    "lmstudio": ("lm_studio", "lm_studio"),
    "openai": ("openai", "openai"),
}


def server_root(base_url: str) -> str:
    base = base_url.strip().rstrip("/")
    return base.removesuffix("/v1")


def server_api_base(server: ServerSpec) -> str:
    """What LiteLLM gets as ``api_base``: Ollama's root; ``.../v1`` for the others."""
    if server.kind == "ollama":
        return server_root(server.base_url)
    base = server.base_url.strip().rstrip("/")
    if server.kind == "lmstudio":
        return server_root(base) + "/v1"
    return base if re.search(r"/v\d+$", base) else base + "/v1"


async def list_server(session: aiohttp.ClientSession, server: ServerSpec) -> list[ListedModel]:
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    try:
        if server.kind == "ollama":
            return await list_ollama(session, server_root(server.base_url), headers)
        if server.kind == "lmstudio":
            page = await request_json(session, "GET", server_root(server.base_url) + "/api/v0/models", headers)
            return parse_lmstudio(page)
        page = await request_json(session, "GET", server_api_base(server) + "/models", headers)
        models = parse_generic(page)
        if server.kind == "llamacpp":
            models = await llamacpp_props(session, server_root(server.base_url), headers, page, models)
        return models
    except Malformed as exc:
        raise ListingFailed("malformed") from exc


async def llamacpp_props(
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
        as_str(m.get("name")) or as_str(m.get("model"))
        for m in (listed if isinstance(listed, list) else [])
        if isinstance(m, Mapping)
        and (caps := as_strs(m.get("capabilities"))) is not None
        and "embedding" in caps
        and "completion" not in caps
    }
    models = [replace(m, chat=False) if m.id in embedding_only else m for m in models]
    try:
        props = await request_json(session, "GET", root + "/props", headers)
    except ListingFailed:
        return models
    if not isinstance(props, Mapping):
        return models
    target = as_str(props.get("model_alias"))
    if not target and len(models) == 1:
        target = models[0].id
    tools = as_bool(as_dict(props.get("chat_template_caps")).get("supports_tools"))
    vision = as_bool(as_dict(props.get("modalities")).get("vision"))
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


async def list_ollama(session: aiohttp.ClientSession, root: str, headers: Mapping[str, str]) -> list[ListedModel]:
    """``GET /api/tags``: ``{"models": [{"name": "llama3.2:latest", "model", "modified_at",
    "size", "digest", "details": {"family", "parameter_size", "quantization_level"}}]}``;
    then ``POST /api/show {"model": name}`` per model: ``{"capabilities": ["completion",
    "tools", "vision", "embedding", ...], "model_info": {"general.architecture": "llama",
    "llama.context_length": 131072, ...}, "parameters": "num_ctx 8192\\n...", ...}``."""
    tags = await request_json(session, "GET", root + "/api/tags", headers)
    names = [as_str(m["name"]) for m in items_of(tags, "models")]
    limiter = asyncio.Semaphore(OLLAMA_SHOW_CONCURRENCY)

    async def show(name: str) -> ListedModel:
        async with limiter:
            try:
                info = await request_json(session, "POST", root + "/api/show", headers, body={"model": name})
            except ListingFailed as exc:
                if exc.kind == "auth":
                    raise
                return ListedModel(id=name)  # listed, details unknown
        return parse_ollama_show(name, info)

    return list(await asyncio.gather(*(show(n) for n in names)))


def hostport(url: str) -> str:
    try:
        parsed = URL(url.strip())
        return f"{parsed.host}:{parsed.port}" if parsed.host else "invalid"
    except (ValueError, TypeError):
        return "invalid"


def name_servers(servers: list[ServerSpec]) -> tuple[ServerSpec, ...]:
    """Give each server its alias prefix: its name, else its kind; clashes get ``@host:port``
    (and then ``#n``) so two servers never produce the same alias."""
    names = [s.name or s.kind for s in servers]
    out: list[ServerSpec] = []
    used: set[str] = set()
    for server, name in zip(servers, names, strict=True):
        if names.count(name) > 1:
            name = f"{name}@{hostport(server.base_url)}"
        unique, n = name, 2
        while unique in used:
            unique, n = f"{name}#{n}", n + 1
        used.add(unique)
        out.append(replace(server, name=unique))
    return tuple(out)
