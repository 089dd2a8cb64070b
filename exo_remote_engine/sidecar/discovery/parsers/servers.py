"""Listing parsers of local / OpenAI-compatible servers: any ``/v1/models``, LM Studio's
native listing and Ollama's ``/api/show``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from exo_remote_engine.sidecar.discovery.parsers.untrusted_json import (
    as_dict,
    as_str,
    as_strs,
    contains,
    items_of,
    positive_int,
)
from exo_remote_engine.sidecar.discovery.types import ListedModel


def parse_generic(page: Any) -> list[ListedModel]:
    """Any ``/v1/models``: ``{"data": [{"id", ...}]}``, plus the context fields the common
    servers add (vLLM ``max_model_len``, llama.cpp ``meta.n_ctx`` / ``meta.n_ctx_train``,
    others ``context_length`` / ``context_window``)."""
    out = []
    for m in items_of(page, "data"):
        meta = as_dict(m.get("meta"))
        context = (
            positive_int(m.get("max_model_len"))
            or positive_int(meta.get("n_ctx"))
            or positive_int(meta.get("n_ctx_train"))
            or positive_int(m.get("context_length"))
            or positive_int(m.get("context_window"))
        )
        inputs = as_strs(as_dict(m.get("architecture")).get("input_modalities"))
        out.append(ListedModel(id=as_str(m["id"]), context_window=context, supports_images=contains(inputs, "image")))
    return out


def parse_lmstudio(page: Any) -> list[ListedModel]:
    """LM Studio's native ``GET /api/v0/models``: ``{"object": "list", "data": [{"id",
    "type": "llm"|"vlm"|"embeddings", "publisher", "arch", "compatibility_type",
    "quantization", "state": "loaded"|"not-loaded", "max_context_length",
    "capabilities": ["tool_use"]}]}``."""
    out = []
    for m in items_of(page, "data"):
        kind = m.get("type")
        caps = as_strs(m.get("capabilities"))
        out.append(
            ListedModel(
                id=as_str(m["id"]),
                context_window=positive_int(m.get("max_context_length")),
                supports_tools=contains(caps, "tool_use"),
                supports_images={"vlm": True, "llm": False}.get(kind) if isinstance(kind, str) else None,
                chat={"llm": True, "vlm": True, "embeddings": False}.get(kind) if isinstance(kind, str) else None,
            )
        )
    return out


_NUM_CTX_RE: Final = re.compile(r"^\s*num_ctx\s+(\d+)\s*$", re.MULTILINE)


def parse_ollama_show(name: str, info: Any) -> ListedModel:
    if not isinstance(info, Mapping):
        return ListedModel(id=name)
    caps = as_strs(info.get("capabilities"))
    model_info = as_dict(info.get("model_info"))
    arch = as_str(model_info.get("general.architecture"))
    context = positive_int(model_info.get(f"{arch}.context_length")) if arch else None
    num_ctx = _NUM_CTX_RE.search(as_str(info.get("parameters")))
    if num_ctx:  # a Modelfile's num_ctx is what the server actually runs with
        context = int(num_ctx.group(1)) or context
    return ListedModel(
        id=name,
        context_window=context,
        supports_tools=contains(caps, "tools"),
        supports_images=contains(caps, "vision"),
        chat=contains(caps, "completion"),
    )
