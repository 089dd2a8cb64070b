"""Which remote models this node offers, under which exo model ids.

A remote model's exo id is its sidecar alias, exactly (``gpt-4o-mini`` too: exo's own
handler would replace any ``gpt-*`` id by its default model, but the add-on's handler
serves remote models before exo's rule applies). The catalog keeps the sidecar's metadata
(ready flag, reason, context window, tool and image support) for exo's model list.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from exo_remote_engine.generated import remote_inference_pb2 as pb

REPO_PREFIX = "exo-remote/"
PROVIDER_NAMES = {
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


def repo_for(alias: str) -> str:
    """The pseudo repository exo's model card names; resolve_tokenizer recognises it."""
    return REPO_PREFIX + alias


def pretty_name(model: pb.Model) -> str:
    base = base_name(model.alias, model.display_name)
    provider = PROVIDER_NAMES.get(model.provider, model.provider.title() or "Remote")
    return base if provider.lower() in base.lower() else f"{base} ({provider})"


def base_name(alias: str, display_name: str | None) -> str:
    """A readable name without the provider: the sidecar's display name, or the alias titled."""
    return display_name if display_name and display_name != alias else _titled(alias)


def _titled(alias: str) -> str:
    words = re.split(r"[-_/:]+", alias)
    return " ".join(w.upper() if w.lower() in {"gpt", "llm", "ai"} else w.capitalize() for w in words if w)


@dataclass
class RemoteCatalog:
    models: dict[str, pb.Model] = field(default_factory=dict)  # exo id (= alias) -> model
    default_id: str | None = None
    fetched_at: float = 0.0

    def update(self, response: pb.ListModelsResponse) -> None:
        self.models = {m.alias: m for m in response.models}
        self.default_id = response.default_model or None
        if self.default_id not in self.models:
            ready = [k for k, m in self.models.items() if m.ready]
            self.default_id = ready[0] if ready else None
        self.fetched_at = time.monotonic()

    def alias(self, exo_id: str) -> str:
        model = self.models.get(exo_id)
        return model.alias if model is not None else exo_id

    def get(self, exo_id: str) -> pb.Model | None:
        return self.models.get(exo_id)

    def age_s(self) -> float:
        return time.monotonic() - self.fetched_at if self.fetched_at else float("inf")

    def summary(self, address: str) -> str:
        """One short start-up line: the ready models by name, the rest counted by what
        would make them ready (a sidecar with discovery on may list ~70 hosted models)."""
        ready = [alias for alias, m in self.models.items() if m.ready]
        waiting: dict[str, int] = {}
        for m in self.models.values():
            if not m.ready:
                reason = m.not_ready_reason or "not ready"
                waiting[reason] = waiting.get(reason, 0) + 1
        shown = ", ".join(a + (" (default)" if a == self.default_id else "") for a in ready[:SUMMARY_NAMES])
        if len(ready) > SUMMARY_NAMES:
            shown += f", and {len(ready) - SUMMARY_NAMES} more"
        line = f"sidecar {address} serves {_count(len(ready), 'ready model')}" + (f": {shown}" if ready else "")
        if waiting:
            top = sorted(waiting.items(), key=lambda item: -item[1])
            reasons = "; ".join(f"{_clip(reason)}: {n}" for reason, n in top[:SUMMARY_REASONS])
            if len(top) > SUMMARY_REASONS:
                reasons += f"; {len(top) - SUMMARY_REASONS} other reasons"
            line += f"; {sum(waiting.values())} more not ready ({reasons}; `exo-remote models` lists them)"
        return line


SUMMARY_NAMES = 8
SUMMARY_REASONS = 3


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
