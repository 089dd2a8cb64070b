"""Text <-> token-id codec that lets exo carry remote-LLM output (wire format "codec v1").

exo's token loop moves output between processes as int32 ids, one id per loop step
(~470 ids/s), and every peer and the HTTP API decodes ids with its *own* codec instance.
So this codec is pure arithmetic over module constants: no per-instance state, no
randomness, no hash seeds; every process maps ids to text identically. Each id packs
several characters (about 5.8 chars/id on English prose) so the loop is not the bottleneck.

Codec v1 id layout (ids are non-negative int32; half-open ranges, decimal values)::

    0                            never produced (decodes to "")
    1                            EOS_ID (exo needs a non-zero EOS; decodes to "")
    2                            CONTROL_END_ID: ends a control payload (decodes to "")
    3                            STEP_ID: the value of a :class:`Step` (see below); never on
                                 the wire, decodes to "" on its own
    4 .. 15                      reserved (decode to "")
    [16, 1114128)                one code point: chr(id - 16), any of U+0000..U+10FFFF
                                 (lone surrogates included)
    [1114128, 2097152)           reserved
    [2097152, 2097408)           control, 1 payload byte:  id - 2097152
    [2097408, 2162944)           control, 2 payload bytes: id - 2097408, big-endian
    [2162944, 18940160)          control, 3 payload bytes: id - 2162944, big-endian
    [18940160, 33554432)         reserved
    [33554432, 123005892)        ASCII pack, 1-4 chars over _ASCII_ALPHABET (97 symbols)
    [123005892, 134217728)       reserved
    [134217728, 2026549988)      LOWER pack, 1-6 chars over _LOWER_ALPHABET (35 symbols)
    [2026549988, 2**31 - 1)      reserved

A pack of n characters over an alphabet of k symbols lives in its own sub-range of
k**n ids, sub-ranges in order of n = 1, 2, ...; within it the value is the big-endian
base-k number whose digits are the characters' positions in the alphabet:

    _ASCII_ALPHABET = chr(0x20) .. chr(0x7E), then "\\n", "\\t"
        n=1 [33554432, 33554529)  n=2 [33554529, 33563938)
        n=3 [33563938, 34476611)  n=4 [34476611, 123005892)
    _LOWER_ALPHABET = " abcdefghijklmnopqrstuvwxyz.,'\\n-\\":`"
        n=1 [134217728, 134217763)  n=2 [134217763, 134218988)  n=3 [134218988, 134261863)
        n=4 [134261863, 135762488)  n=5 [135762488, 188284363)  n=6 [188284363, 2026549988)

Every id decodes on its own to a string of whole code points, so decoding a sequence is
the concatenation of per-id decodings, and encode_text(a) + encode_text(b) decodes to a + b.
Control ids carry bytes for a side channel (finish reason, usage, tool calls, errors as
JSON) that plain text decoding drops: they, EOS, CONTROL_END, reserved and out-of-range
ids (0, negative, above MAX_ID, non-integers) all decode to "" instead of raising, because
exo may hand any int to its tokenizer's decode.

Steps: exo's loop moves one int per turn and counts turns against --max-generate-tokens,
so one id per few characters let exo cut long non-Latin replies (one CJK character per
id) and capped streaming speed. The engine hands exo one :class:`Step` per turn instead:
an ``int`` (value STEP_ID, or EOS_ID for the last turn) that carries the ids of
everything the provider sent since the previous turn. Steps live only inside the engine's
process (exo keeps the object exo's ``sample`` returned: ``ndarray.item()`` of an object
array); before ids cross to a peer, :func:`expand` replaces each step by its ids, so the
wire carries plain codec ids and every other process decodes them statelessly. Decoding
here (decode_ids, StreamDecoder) expands steps itself.

Encoding is greedy: at each position take the class that consumes the most characters
(LOWER up to 6, ASCII up to 4, else one code point); ties go to LOWER. Any valid encoding
decodes correctly, so the greedy choice is a density policy, not part of the wire format.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from itertools import product
from typing import SupportsIndex

__all__ = [
    "CONTROL_END_ID",
    "EOS_ID",
    "MAX_ID",
    "STEP_ID",
    "Step",
    "StreamDecoder",
    "decode_id",
    "decode_ids",
    "encode_control",
    "encode_text",
    "expand",
]

EOS_ID = 1
"""End of sequence; exo treats 0 as no token, so EOS must be non-zero."""
CONTROL_END_ID = 2
"""Terminates a control payload (see encode_control)."""
STEP_ID = 3
"""The int value of a non-final :class:`Step`; "" when decoded without its ids."""

_CP_BASE = 16
_CP_END = _CP_BASE + 0x110000

_CTRL1_BASE = 0x200000
_CTRL2_BASE = _CTRL1_BASE + 0x100
_CTRL3_BASE = _CTRL2_BASE + 0x10000
_CTRL_END = _CTRL3_BASE + 0x1000000

_ASCII_ALPHABET = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n\t"
_LOWER_ALPHABET = " abcdefghijklmnopqrstuvwxyz.,'\n-\":`"


class _Pack:
    """One packing class: up to max_len chars of an alphabet, one sub-range per length."""

    def __init__(self, alphabet: str, max_len: int, table_len: int, base: int) -> None:
        self.radix = len(alphabet)
        self.max_len = max_len
        self.table_len = table_len
        self.tail_div: int = self.radix**table_len
        # tables[n]: every n-char string (n <= table_len) in value order, for O(1) decode.
        self.tables: list[list[str]] = [[""]] + [
            ["".join(p) for p in product(alphabet, repeat=n)] for n in range(1, table_len + 1)
        ]
        self.index: dict[str, int] = {s: v for table in self.tables[1:] for v, s in enumerate(table)}
        starts = [base]
        for n in range(1, max_len + 1):
            starts.append(starts[-1] + self.radix**n)
        self.starts = starts  # starts[n - 1] is where length n begins; starts[-1] is the end
        self.base = base
        self.end = starts[-1]
        # Longest first: long packs dominate, so decode usually tests once.
        self.by_len_desc = [(starts[n - 1], n) for n in range(max_len, 0, -1)]

    def decode(self, token_id: int) -> str:
        for start, n in self.by_len_desc:
            if token_id >= start:
                v = token_id - start
                if n <= self.table_len:
                    return self.tables[n][v]
                hi, lo = divmod(v, self.tail_div)
                return self.tables[n - self.table_len][hi] + self.tables[self.table_len][lo]
        return ""  # pragma: no cover - callers check token_id >= base

    def encode(self, chunk: str) -> int | None:
        """Id of chunk in this class, or None if chunk is not over this alphabet."""
        n = len(chunk)
        if n <= self.table_len:
            v = self.index.get(chunk)
            return None if v is None else self.starts[n - 1] + v
        hi = self.index.get(chunk[: n - self.table_len])
        lo = self.index.get(chunk[n - self.table_len :])
        if hi is None or lo is None:
            return None
        return self.starts[n - 1] + hi * self.tail_div + lo


_ASCII = _Pack(_ASCII_ALPHABET, 4, 2, 0x2000000)
_LOWER = _Pack(_LOWER_ALPHABET, 6, 3, 0x8000000)

MAX_ID = _LOWER.end - 1
"""Largest id codec v1 assigns a meaning to; ids up to 2**31 - 2 stay reserved."""

if not (_CTRL_END <= _ASCII.base and _ASCII.end <= _LOWER.base and MAX_ID < 2**31 - 1):
    raise RuntimeError("codec v1 id ranges overlap or overflow int32")  # pragma: no cover

# Greedy split: alternatives are tried in order, so the first one that matches is the
# longest chunk any class can take at this position (LOWER wins ties).
_L = "[" + re.escape(_LOWER_ALPHABET) + "]"
_A = "[" + re.escape(_ASCII_ALPHABET) + "]"
_SPLIT = re.compile(
    f"{_L}{{4,6}}|{_A}{{4}}|{_L}{{3}}|{_A}{{3}}|{_L}{{2}}|{_A}{{2}}|{_L}|{_A}|.",
    re.DOTALL,
)


def _chunk_id(chunk: str) -> int:
    token_id = _LOWER.encode(chunk)
    if token_id is None:
        token_id = _ASCII.encode(chunk)
        if token_id is None:
            return _CP_BASE + ord(chunk)  # the split only leaves single code points here
    return token_id


def encode_text(text: str) -> list[int]:
    """Pack text into ids, several chars per id, losslessly for any str (see module doc)."""
    return [_chunk_id(chunk) for chunk in _SPLIT.findall(text)]


class Step(int):
    """One turn of exo's token loop carrying any number of ids (a whole delta or more).

    Its int value is what exo compares and counts: EOS_ID when the ids end with EOS (so exo
    stops), else STEP_ID. Only the engine's process ever holds one (see the module doc).
    """

    ids: tuple[int, ...]

    def __new__(cls, ids: Iterable[int]) -> Step:
        carried = tuple(ids)
        step = super().__new__(cls, EOS_ID if carried and carried[-1] == EOS_ID else STEP_ID)
        step.ids = carried
        return step

    def __reduce__(self) -> tuple[type[Step], tuple[tuple[int, ...]]]:
        return (Step, (self.ids,))

    def __repr__(self) -> str:
        return f"Step({len(self.ids)} ids{', EOS' if self == EOS_ID else ''})"


def expand(tokens: Iterable[object]) -> list[int]:
    """The wire form of tokens: each Step replaced by the ids it carries, in order."""
    out: list[int] = []
    for token in tokens:
        if isinstance(token, Step):
            out.extend(token.ids)
        else:
            out.append(token if type(token) is int else _as_int(token))
    return out


def decode_id(token_id: int) -> str:
    """Text of one id: whole code points, "" for EOS, control, reserved or invalid ids."""
    if type(token_id) is not int:  # numpy ints from exo, or garbage
        token_id = _as_int(token_id)
    if token_id >= _LOWER.base:
        return _LOWER.decode(token_id) if token_id < _LOWER.end else ""
    if token_id >= _ASCII.base:
        return _ASCII.decode(token_id) if token_id < _ASCII.end else ""
    if _CP_BASE <= token_id < _CP_END:
        return chr(token_id - _CP_BASE)
    return ""


def decode_ids(ids: Iterable[int]) -> str:
    """Concatenated text of ids (steps expanded); control, EOS and unknown ids contribute nothing."""
    return "".join(map(decode_id, expand(ids)))


def encode_control(payload: bytes) -> list[int]:
    """Ids carrying payload out of band (3 bytes per id), terminated by CONTROL_END_ID."""
    ids = [
        _CTRL3_BASE + int.from_bytes(payload[i : i + 3], "big") for i in range(0, len(payload) - len(payload) % 3, 3)
    ]
    rest = payload[len(payload) - len(payload) % 3 :]
    if len(rest) == 1:
        ids.append(_CTRL1_BASE + rest[0])
    elif len(rest) == 2:
        ids.append(_CTRL2_BASE + int.from_bytes(rest, "big"))
    ids.append(CONTROL_END_ID)
    return ids


def _control_bytes(token_id: int) -> bytes | None:
    """Payload bytes of a control id, or None if token_id is not one."""
    if token_id >= _CTRL3_BASE:
        return (token_id - _CTRL3_BASE).to_bytes(3, "big") if token_id < _CTRL_END else None
    if token_id >= _CTRL2_BASE:
        return (token_id - _CTRL2_BASE).to_bytes(2, "big")
    if token_id >= _CTRL1_BASE:
        return bytes((token_id - _CTRL1_BASE,))
    return None


class StreamDecoder:
    """Splits an id stream into text (str) and complete control payloads (bytes), in order.

    The only state is the partially received control payload, so one decoder per stream.
    Text ids keep their place even if they arrive inside a payload (they never should);
    EOS and invalid ids are dropped: the caller watches for EOS_ID itself.
    """

    def __init__(self) -> None:
        self._payload: bytearray | None = None

    def feed(self, ids: Iterable[int]) -> list[str | bytes]:
        """Decode ids (steps expanded); adjacent text is merged, each payload is emitted at its CONTROL_END."""
        out: list[str | bytes] = []
        text: list[str] = []
        for token_id in expand(ids):
            if token_id == CONTROL_END_ID:
                if text:
                    out.append("".join(text))
                    text = []
                out.append(bytes(self._payload) if self._payload is not None else b"")
                self._payload = None
                continue
            if _CTRL1_BASE <= token_id < _CTRL_END:
                chunk = _control_bytes(token_id)
                if chunk is not None:
                    if self._payload is None:
                        self._payload = bytearray()
                    self._payload += chunk
                continue
            piece = decode_id(token_id)
            if piece:
                text.append(piece)
        if text:
            out.append("".join(text))
        return out


def _as_int(value: object) -> int:
    """value as an int (numpy ints from exo), or -1 (an invalid id) if it is not integral."""
    return operator.index(value) if isinstance(value, SupportsIndex) else -1
