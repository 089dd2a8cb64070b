"""The tokenizer exo's API and nodes use for remote models.

exo hands the engine one opaque string, the output of ``apply_chat_template``. For a
remote model that string is an *envelope*: the structured conversation, tools and
request parameters as JSON behind a marker, so the provider receives real messages and
never a flattened template. Ids are the stateless :mod:`codec`'s, so any process decodes
any other's output; ``decode`` also expands the engine's :class:`~codec.Step` turns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from exo_remote_engine.engine import codec

ENVELOPE_MARKER = "\x1eexo-remote/v1\x1e"


@dataclass
class PromptEnvelope:
    """What travels from exo's API to the engine inside the prompt string."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def dumps(self) -> str:
        body: dict[str, Any] = {"messages": self.messages, "params": self.params}
        if self.tools:
            body["tools"] = self.tools
        return ENVELOPE_MARKER + json.dumps(body, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def loads(cls, prompt: str) -> PromptEnvelope:
        """Parse an envelope; a plain string (exo's ``run`` command) becomes one user turn."""
        if not prompt.startswith(ENVELOPE_MARKER):
            return cls(messages=[{"role": "user", "content": prompt}])
        body = json.loads(prompt[len(ENVELOPE_MARKER) :])
        return cls(
            messages=list(body.get("messages") or []),
            tools=body.get("tools") or None,
            params=dict(body.get("params") or {}),
        )

    def last_user_text(self) -> str:
        """The last user message as a person reads it (exo's TUI prompt panel): its text,
        text parts joined, other parts named."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return _readable(message.get("content"))
        return ""

    def chat_body(self) -> dict[str, Any]:
        """The envelope as an OpenAI chat-completions body (for openai_wire)."""
        body: dict[str, Any] = dict(self.params)
        body["messages"] = self.messages
        if self.tools:
            body["tools"] = self.tools
        return body


class RemoteTokenizer:
    """Duck-types the parts of a Hugging Face tokenizer that exo touches."""

    eos_token_id: int = codec.EOS_ID
    vocab_size: int = codec.MAX_ID + 1

    def encode(self, text: str, **_: Any) -> list[int]:
        return codec.encode_text(text)

    def decode(self, tokens: Iterable[int] | Any, **_: Any) -> str:
        return codec.decode_ids(_flatten(tokens))

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]] | None = None,
        tokenize: bool = False,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        params: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> str | list[int]:
        envelope = PromptEnvelope(
            messages=[_plain(m) for m in conversation or ()],
            tools=tools,
            params=dict(params or {}),
        )
        text = envelope.dumps()
        return self.encode(text) if tokenize else text


def _readable(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return "" if content is None else str(content)
    parts = []
    for part in content:
        if isinstance(part, Mapping) and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif isinstance(part, Mapping):
            parts.append(f"[{str(part.get('type') or 'part').replace('_url', '')}]")
    return " ".join(parts)


def _plain(message: Any) -> dict[str, Any]:
    if isinstance(message, Mapping):
        return {k: v for k, v in message.items() if v is not None}
    to_dict = getattr(message, "to_dict", None)  # exo's Message objects
    return dict(to_dict()) if to_dict else {"role": "user", "content": str(message)}


def _flatten(tokens: Any) -> Iterable[Any]:
    if hasattr(tokens, "reshape"):
        return list(tokens.reshape(-1))
    return tokens if isinstance(tokens, Iterable) else [tokens]
