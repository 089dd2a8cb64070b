"""Tokens the sidecar counts itself: an estimate for charging what the provider did not
report, a bound for reserving a request's maximum cost, and the sanity check of what a
provider reports.

No tokenizer of every provider is at hand, so both are derived from the text:

* :func:`estimate_text_tokens` (what is charged, marked ``estimated``): 4 ASCII characters
  a token, as LiteLLM's and OpenAI's rule of thumb, but other text at 2 of its UTF-8 bytes
  a token (a Cyrillic or Greek letter 1 token, a CJK character 1.5) and a character beyond
  U+FFFF (emoji, rare CJK) at 4, its byte count (cl100k spends up to 3 on one), since CJK,
  Thai or Cyrillic text costs about a token per character or more in common tokenizers
  (cl100k: 1 to 1.3 per Chinese character); 4 characters a token would undercharge it
  about fourfold.
* :func:`prompt_bound` (what is reserved): the UTF-8 bytes of every text the provider
  reads, plus a template allowance per message and a fixed bound per image. Byte-level
  BPE and byte-fallback SentencePiece never make more tokens than bytes, so no provider
  counts more for the same text; the bound is loose for English (about 4x) and is given
  back when the request ends.
"""

from __future__ import annotations

from exo_remote_engine.generated import remote_inference_pb2 as pb

ASCII_CHARS_PER_TOKEN = 4
NON_ASCII_BYTES_PER_TOKEN = 2  # a Cyrillic letter 1 token, a CJK character 1.5
ASTRAL_TOKENS = 4  # an emoji or a rare CJK character (4 UTF-8 bytes): up to a token per byte
# The chat template's own tokens: what OpenAI documents (3 per conversation, 4 per message)
# for the estimate, twice as much and more for the bound (other templates are longer).
TEMPLATE_TOKENS, MESSAGE_TOKENS = 3, 4
TEMPLATE_TOKENS_BOUND, MESSAGE_TOKENS_BOUND = 16, 8
IMAGE_TOKENS = 3000  # an upper bound of what one image costs (OpenAI's high detail, Anthropic's, Gemini's are below)
# Beyond any context window (the largest are ~2M tokens): a count this large is not usage.
MAX_PLAUSIBLE_TOKENS = 100_000_000


def estimate_text_tokens(text: str) -> int:
    """Tokens ``text`` is charged as when the provider reports none (see the module doc)."""
    if not text:
        return 0
    if text.isascii():
        return -(-len(text) // ASCII_CHARS_PER_TOKEN)
    ascii_chars = len(text.encode("ascii", "ignore"))
    astral = len(text.encode("utf-16-le", "surrogatepass")) // 2 - len(text)  # characters past U+FFFF
    other_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars - 4 * astral
    return (
        -(-ascii_chars // ASCII_CHARS_PER_TOKEN) + -(-other_bytes // NON_ASCII_BYTES_PER_TOKEN) + astral * ASTRAL_TOKENS
    )


def delta_tokens(delta: pb.Delta) -> int:
    """The estimate of one delta written to the client (text, reasoning, tool arguments)."""
    tokens = estimate_text_tokens(delta.text) + estimate_text_tokens(delta.reasoning_text)
    for call in delta.tool_calls:
        tokens += estimate_text_tokens(call.name) + estimate_text_tokens(call.arguments_fragment)
    return tokens


def _prompt_texts(request: pb.GenerateRequest) -> tuple[list[str], int, int]:
    """Every text the provider reads, the number of images, and of messages and tools."""
    texts: list[str] = []
    images = 0
    pieces = len(request.messages) + len(request.tools)
    for message in request.messages:
        texts.append(message.name)
        texts.append(message.tool_call_id)
        for part in message.content:
            which = part.WhichOneof("part")
            if which == "text":
                texts.append(part.text)
            elif which in ("image_url", "image_data"):
                images += 1
        for call in message.tool_calls:
            pieces += 1
            texts.extend((call.id, call.name, call.arguments_json))
    for tool in request.tools:
        texts.extend((tool.name, tool.description, tool.parameters_json_schema))
    return texts, images, pieces


def prompt_estimate(request: pb.GenerateRequest) -> int:
    """The prompt's tokens as charged when the provider reports none (estimated)."""
    texts, images, pieces = _prompt_texts(request)
    return (
        sum(estimate_text_tokens(t) for t in texts) + images * IMAGE_TOKENS + pieces * MESSAGE_TOKENS + TEMPLATE_TOKENS
    )


def prompt_bound(request: pb.GenerateRequest) -> int:
    """At least as many tokens as any provider counts for this prompt (what is reserved)."""
    texts, images, pieces = _prompt_texts(request)
    return (
        sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        + images * IMAGE_TOKENS
        + pieces * MESSAGE_TOKENS_BOUND
        + TEMPLATE_TOKENS_BOUND
    )


def implausible_usage(usage: pb.Usage) -> str | None:
    """What is wrong with a provider's usage (negative or absurd counts), or None."""
    for name in ("prompt_tokens", "completion_tokens", "cached_prompt_tokens", "reasoning_tokens"):
        value = getattr(usage, name)
        if value < 0:
            return f"{name} is negative ({value})"
        if value > MAX_PLAUSIBLE_TOKENS:
            return f"{name} is absurd ({value}, above {MAX_PLAUSIBLE_TOKENS})"
    return None
