"""Listing parsers of the hosted providers, one per documented response shape (the shapes
are reproduced by tests/support/provider_listings.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from exo_remote_engine.sidecar.discovery.parsers.untrusted_json import (
    Malformed,
    as_bool,
    as_dict,
    as_str,
    as_strs,
    contains,
    items_of,
    positive_int,
    price,
)
from exo_remote_engine.sidecar.discovery.types import ListedModel


def parse_ids(page: Any) -> list[ListedModel]:
    """OpenAI / DeepSeek / xAI: ``{"object": "list", "data": [{"id", "object", "created",
    "owned_by"}]}`` -- ids only."""
    return [ListedModel(id=as_str(m["id"])) for m in items_of(page, "data")]


def parse_anthropic(page: Any) -> list[ListedModel]:
    """``{"data": [{"type": "model", "id", "display_name", "created_at", "max_input_tokens",
    "max_tokens", "capabilities": {"image_input": {"supported": bool}, ...}}], "has_more",
    "first_id", "last_id"}``. Tool use is not reported (LiteLLM's map fills it)."""
    out = []
    for m in items_of(page, "data"):
        caps = as_dict(m.get("capabilities"))
        out.append(
            ListedModel(
                id=as_str(m["id"]),
                display_name=as_str(m.get("display_name")),
                context_window=positive_int(m.get("max_input_tokens")),
                max_output_tokens=positive_int(m.get("max_tokens")),
                supports_images=as_bool(as_dict(caps.get("image_input")).get("supported")),
            )
        )
    return out


def parse_gemini(page: Any) -> list[ListedModel]:
    """``{"models": [{"name": "models/<id>", "displayName", "inputTokenLimit",
    "outputTokenLimit", "supportedGenerationMethods": [...]}], "nextPageToken"}``. Chat
    models support ``generateContent``; embeddings ``embedContent``, Imagen ``predict``."""
    out = []
    for m in items_of(page, "models", optional=True):
        methods = as_strs(m.get("supportedGenerationMethods"))
        out.append(
            ListedModel(
                id=as_str(m["name"]).removeprefix("models/"),
                display_name=as_str(m.get("displayName")),
                context_window=positive_int(m.get("inputTokenLimit")),
                max_output_tokens=positive_int(m.get("outputTokenLimit")),
                chat=contains(methods, "generateContent"),
            )
        )
    return out


def parse_mistral(page: Any) -> list[ListedModel]:
    """``{"object": "list", "data": [{"id", "type": "base"|"fine-tuned", "name",
    "max_context_length", "aliases", "capabilities": {"completion_chat", "completion_fim",
    "function_calling", "vision", "classification", "moderation", "ocr", ...}}]}``."""
    out = []
    for m in items_of(page, "data"):
        caps = as_dict(m.get("capabilities"))
        out.append(
            ListedModel(
                id=as_str(m["id"]),
                context_window=positive_int(m.get("max_context_length")),
                supports_tools=as_bool(caps.get("function_calling")),
                supports_images=as_bool(caps.get("vision")),
                chat=as_bool(caps.get("completion_chat")),
            )
        )
    return out


def parse_groq(page: Any) -> list[ListedModel]:
    """``{"object": "list", "data": [{"id", "owned_by", "active", "context_window",
    "max_completion_tokens", "public_apps"}]}``. Whisper / TTS / guard models are only
    told apart by id."""
    return [
        ListedModel(
            id=as_str(m["id"]),
            context_window=positive_int(m.get("context_window")),
            max_output_tokens=positive_int(m.get("max_completion_tokens")),
            chat=False if m.get("active") is False else None,
        )
        for m in items_of(page, "data")
    ]


def parse_openrouter(page: Any) -> list[ListedModel]:
    """``{"data": [{"id", "name", "context_length", "architecture": {"modality",
    "input_modalities", "output_modalities"}, "pricing": {"prompt", "completion"} (USD per
    token, strings), "top_provider": {"context_length", "max_completion_tokens"},
    "supported_parameters": [...]}]}``."""
    out = []
    for m in items_of(page, "data"):
        arch = as_dict(m.get("architecture"))
        outputs = as_strs(arch.get("output_modalities"))
        pricing = as_dict(m.get("pricing"))
        out.append(
            ListedModel(
                id=as_str(m["id"]),
                display_name=as_str(m.get("name")),
                context_window=positive_int(m.get("context_length")),
                max_output_tokens=positive_int(as_dict(m.get("top_provider")).get("max_completion_tokens")),
                supports_tools=contains(as_strs(m.get("supported_parameters")), "tools"),
                supports_images=contains(as_strs(arch.get("input_modalities")), "image"),
                chat=False if outputs is not None and "text" not in outputs else None,
                input_cost_per_token=price(pricing.get("prompt")),
                output_cost_per_token=price(pricing.get("completion")),
            )
        )
    return out


def parse_together(page: Any) -> list[ListedModel]:
    """A top-level JSON array: ``[{"id", "object": "model", "type": "chat"|"language"|
    "code"|"image"|"embedding"|"moderation"|"rerank"|"audio"|"transcribe", "display_name",
    "context_length", "pricing": {"input", "output"} (USD per million tokens)}]``."""
    if isinstance(page, Mapping) and isinstance(page.get("data"), list):
        page = page["data"]  # tolerate an OpenAI-style wrapper
    if not isinstance(page, list):
        raise Malformed
    out = []
    for m in page:
        if not isinstance(m, Mapping) or not as_str(m.get("id")):
            continue
        kind = m.get("type")
        pricing = as_dict(m.get("pricing"))
        per_m_in, per_m_out = price(pricing.get("input")), price(pricing.get("output"))
        out.append(
            ListedModel(
                id=as_str(m["id"]),
                display_name=as_str(m.get("display_name")),
                context_window=positive_int(m.get("context_length")),
                chat=(kind == "chat") if isinstance(kind, str) else None,
                input_cost_per_token=None if per_m_in is None else per_m_in / 1e6,
                output_cost_per_token=None if per_m_out is None else per_m_out / 1e6,
            )
        )
    return out
