"""Which remote models this node offers, under which exo model ids.

exo silently replaces any model id starting with ``gpt-`` by its default model, so such
aliases get a ``remote-`` prefix as their exo id. The catalog is the one place that maps
exo ids to sidecar aliases and keeps the sidecar's metadata (ready flag, reason,
context window, tool and image support) for exo's model list.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from exo_remote_engine.generated import remote_inference_pb2 as pb

REPO_PREFIX = "exo-remote/"
_PROVIDER_NAMES = {
    "openai": "OpenAI",
    "anthropic": "Anthropic",
    "gemini": "Gemini",
    "vertex_ai": "Vertex AI",
    "mistral": "Mistral",
    "groq": "Groq",
    "openrouter": "OpenRouter",
    "together_ai": "Together",
    "deepseek": "DeepSeek",
    "xai": "xAI",
    "ollama": "Ollama",
    "ollama_chat": "Ollama",
    "hosted_vllm": "vLLM",
    "embedded": "Embedded",
    "llama.cpp": "llama.cpp",
}


def card_id_for(alias: str) -> str:
    """The exo model id for a sidecar alias (never starting with ``gpt-``)."""
    return f"remote-{alias}" if alias.startswith("gpt-") else alias


def repo_for(alias: str) -> str:
    """The pseudo repository exo's model card names; resolve_tokenizer recognises it."""
    return REPO_PREFIX + alias


def pretty_name(model: pb.Model) -> str:
    base = model.display_name if model.display_name and model.display_name != model.alias else (_titled(model.alias))
    provider = _PROVIDER_NAMES.get(model.provider, model.provider.title() or "Remote")
    return base if provider.lower() in base.lower() else f"{base} ({provider})"


def _titled(alias: str) -> str:
    words = re.split(r"[-_/:]+", alias)
    return " ".join(w.upper() if w.lower() in {"gpt", "llm", "ai"} else w.capitalize() for w in words if w)


@dataclass
class RemoteCatalog:
    models: dict[str, pb.Model] = field(default_factory=dict)  # exo id -> model
    default_id: str | None = None
    fetched_at: float = 0.0

    def update(self, response: pb.ListModelsResponse) -> None:
        self.models = {card_id_for(m.alias): m for m in response.models}
        self.default_id = card_id_for(response.default_model) if response.default_model else None
        if self.default_id not in self.models:
            ready = [k for k, m in self.models.items() if m.ready]
            self.default_id = ready[0] if ready else None
        self.fetched_at = time.monotonic()

    def alias(self, exo_id: str) -> str:
        model = self.models.get(exo_id)
        if model is not None:
            return model.alias
        return exo_id[len("remote-") :] if exo_id.startswith("remote-gpt-") else exo_id

    def get(self, exo_id: str) -> pb.Model | None:
        return self.models.get(exo_id)

    def age_s(self) -> float:
        return time.monotonic() - self.fetched_at if self.fetched_at else float("inf")
