"""Which model ids are chat models: every rule of the filter in one place."""

from __future__ import annotations

import re
from typing import Final

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
