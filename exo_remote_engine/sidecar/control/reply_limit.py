"""Holding a reply to its reserved output tokens: the part of a delta that still fits.

A budgeted request reserves its output tokens before the provider is called and asks the
provider for no more (``max_tokens``); a provider that ignores it would still spend past
the reservation, so the sidecar counts what it writes (the estimate of
:mod:`~exo_remote_engine.sidecar.ledger.token_estimates`) and ends the reply where the
reservation ends, finish ``length``, as a provider honouring ``max_tokens`` would.
"""

from __future__ import annotations

from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.ledger.token_estimates import estimate_text_tokens


def _fitting_prefix(text: str, room: int) -> str:
    """The longest prefix of ``text`` whose estimate is at most ``room`` (the estimate
    grows with the prefix, so a binary search finds it)."""
    if estimate_text_tokens(text) <= room:
        return text
    low, high = 0, len(text)  # estimate(text[:low]) <= room < estimate(text[:high])
    while high - low > 1:
        middle = (low + high) // 2
        if estimate_text_tokens(text[:middle]) <= room:
            low = middle
        else:
            high = middle
    return text[:low]


def clip_delta(delta: pb.Delta, room: int) -> pb.Delta:
    """What of ``delta`` fits in ``room`` estimated tokens: text first, then reasoning, then
    tool-call fragments (a call whose name does not fit is dropped)."""
    room = max(0, room)
    text = _fitting_prefix(delta.text, room)
    room -= estimate_text_tokens(text)
    reasoning = _fitting_prefix(delta.reasoning_text, room)
    room -= estimate_text_tokens(reasoning)
    clipped = pb.Delta(text=text, reasoning_text=reasoning)
    for call in delta.tool_calls:
        name_cost = estimate_text_tokens(call.name)
        if name_cost > room:
            break
        room -= name_cost
        arguments = _fitting_prefix(call.arguments_fragment, room)
        room -= estimate_text_tokens(arguments)
        clipped.tool_calls.append(
            pb.ToolCallDelta(index=call.index, id=call.id, name=call.name, arguments_fragment=arguments)
        )
    return clipped
