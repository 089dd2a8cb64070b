"""Codec v1: lossless text packing, per-id decodability, density, control side channel."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_remote_engine.engine import codec
from exo_remote_engine.engine.codec import (
    CONTROL_END_ID,
    EOS_ID,
    MAX_ID,
    StreamDecoder,
    decode_id,
    decode_ids,
    encode_control,
    encode_text,
)

INT32_LIMIT = 2**31 - 1

PROSE = """\
The old lighthouse stood at the edge of the cliff for more than a century, watching ships \
pass through the narrow channel below. Its keeper, a quiet man named Thomas, climbed the \
spiral stairs every evening to light the lamp, and he kept a careful record of the weather, \
the tides, and every vessel that came within sight of the rocks.

When the storms arrived in late autumn, the sea turned grey and angry. Waves struck the base \
of the tower with such force that the windows rattled, and spray reached the gallery high \
above the water. Thomas never left his post on those nights. He believed that a single hour \
of darkness could cost the lives of sailors who were depending on the light to guide them home.

In the spring, visitors began to appear on the coastal path. Some of them were painters who \
wanted to capture the contrast between the white stone and the deep blue water; others were \
simply curious about the man who lived alone at the end of the world. He answered their \
questions politely, although he rarely offered more than a few words about himself.

Years later, after the lamp had been replaced by an automatic beacon, people still talked \
about the keeper and his journals. The pages were full of small observations: the first \
swallows of the year, the colour of the sky before a gale, and the names of the fishing boats \
that returned safely to the harbour. It was, as one historian wrote, a quiet record of a life \
spent in service to strangers. Nobody knows what became of the last journal, but it's said \
that a copy still sits on a shelf in the village library, waiting for someone to read it.
"""

MARKDOWN_ANSWER = """\
Sure! Here's a quick overview of how to read a file in Python:

1. **Open the file** with `open()`, ideally inside a `with` block so it's closed for you.
2. **Read** the contents using `.read()`, `.readline()`, or by iterating over the lines.

```python
with open("notes.txt", encoding="utf-8") as f:
    for line in f:
        print(line.rstrip())
```

- If the file is large, iterating line by line keeps memory usage low.
- Use `errors="replace"` when the encoding isn't known in advance.

Let me know if you'd like an example that writes to a file as well.
"""

TORTURE = {
    "empty": "",
    "zwj_family": "👨‍👩‍👧‍👦",
    "flag": "🇫🇷",
    "skin_tones": "👍🏻👍🏼👍🏽👍🏾👍🏿 👋🏽",
    "cjk": "漢字かなカナ한국어",
    "arabic_marks": "بِسْمِ ٱللَّٰهِ ٱلرَّحْمَٰنِ",
    "hebrew_marks": "בְּרֵאשִׁית בָּרָא",
    "rtl_mixed": "abc \u202eשלום\u202c def مرحبا 123",
    "combining": "e\u0301 cafe\u0301 n\u0303",
    "devanagari": "नमस्ते दुनिया क्षत्रिय",
    "zero_width": "a\u200bb\u200cc\u200dd\u2060e\ufeff",
    "whitespace": "\t\t  \n\r\n",
    "code": 'def f(x: int) -> str:\n\tif x > 0:\n\t\treturn f"{x!r}"\r\n    return "\\n"  # done\n',
    "c0_controls": "".join(chr(c) for c in range(1, 0x20)),
    "del": "\x7f",
    "nul": "a\x00b\x00",
    "bmp_edge": "\uffff\ufffe\ufffd",
    "astral_edge": "\U0010ffff\U00010000\U0001f600",
    "lone_surrogates": "x\ud800y\udfffz\udc00",
    "c1_and_nbsp": "\x80\x85\x9f\xa0\xad",
    "long_lower": "the quick brown fox jumps over the lazy dog " * 8,
    "all_ascii": "".join(chr(c) for c in range(0x20, 0x7F)) + "\n\t",
}


def check_ids(ids: list[int]) -> None:
    """Every id is a produced-range int32 and decodes alone to whole code points."""
    for token_id in ids:
        assert type(token_id) is int
        assert 0 < token_id <= MAX_ID < INT32_LIMIT
        piece = decode_id(token_id)
        assert isinstance(piece, str)
        piece.encode("utf-8", "surrogatepass")


def check_round_trip(text: str) -> list[int]:
    ids = encode_text(text)
    check_ids(ids)
    assert "".join(decode_id(i) for i in ids) == text
    assert decode_ids(ids) == text
    assert decode_ids(iter(ids)) == text
    return ids


# --- text round trip -------------------------------------------------------------------

# Biased toward the packed alphabets so pack boundaries and class switches get exercised.
PACKY = st.text(
    st.one_of(
        st.sampled_from(" abcdefghijklmnopqrstuvwxyz.,'\n-\":`"),
        st.sampled_from("".join(chr(c) for c in range(0x20, 0x7F)) + "\n\t\r"),
        st.characters(),
    ),
    max_size=60,
)


@settings(max_examples=2000, deadline=None)
@given(st.text())
def test_round_trip_any_text(text: str) -> None:
    check_round_trip(text)


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(min_codepoint=1)))
def test_round_trip_non_nul_characters(text: str) -> None:
    check_round_trip(text)


@settings(max_examples=1000, deadline=None)
@given(PACKY)
def test_round_trip_packable_text(text: str) -> None:
    check_round_trip(text)


@settings(max_examples=300, deadline=None)
@given(st.text(st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs"]))))
def test_round_trip_with_lone_surrogates(text: str) -> None:
    check_round_trip(text)


@settings(max_examples=300, deadline=None)
@given(PACKY, PACKY)
def test_encoding_chunks_separately_still_concatenates(a: str, b: str) -> None:
    assert decode_ids(encode_text(a) + encode_text(b)) == a + b


@pytest.mark.parametrize("name", sorted(TORTURE))
def test_torture_strings(name: str) -> None:
    check_round_trip(TORTURE[name])


def test_encoding_is_deterministic_and_greedy() -> None:
    # Ids cross exo's nodes, so the same text has the same ids on every node, run and
    # version: pinned (a change of the scheme breaks mixed clusters and must show here).
    assert encode_text("Hello, world") == [71640200, 1018158706, 134218187]
    assert encode_text("Hi there é") == [71670472, 148004088, 249]
    assert encode_text("") == []
    # Longest chunk any class can take: LOWER up to 6 chars, ASCII up to 4, else 1 code point.
    assert [decode_id(i) for i in encode_text("abcdefghijkl")] == ["abcdef", "ghijkl"]
    assert [decode_id(i) for i in encode_text("ABCDEFGH")] == ["ABCD", "EFGH"]
    assert [decode_id(i) for i in encode_text("Hello, world")] == ["Hell", "o, wor", "ld"]
    assert [decode_id(i) for i in encode_text("Hi there")] == ["Hi t", "here"]
    assert [decode_id(i) for i in encode_text("é")] == ["é"]


# --- per-id decoding --------------------------------------------------------------------


def test_every_code_point_id_decodes_to_its_code_point() -> None:
    all_code_points = "".join(map(chr, range(0x110000)))
    assert decode_ids(range(16, 16 + 0x110000)) == all_code_points
    assert encode_text("\x00") == [16]


# Every sub-range edge of the codec v1 layout (see the codec module docstring).
LAYOUT_EDGES = [
    0, 1, 2, 3, 15, 16, 16 + 0x110000,
    0x200000, 0x200100, 0x210100, 0x1210100,
    33554432, 33554529, 33563938, 34476611, 123005892,
    134217728, 134217763, 134218988, 134261863, 135762488, 188284363, 2026549988,
    INT32_LIMIT,
]  # fmt: skip
SWEEP = sorted(
    {e + d for e in LAYOUT_EDGES for d in (-2, -1, 0, 1)} | set(range(-(2**20), INT32_LIMIT + 2**20, 10_007))
)


def test_any_integer_decodes_to_whole_code_points() -> None:
    assert MAX_ID == 2026549988 - 1
    for token_id in SWEEP:
        piece = decode_id(token_id)
        assert isinstance(piece, str)
        assert len(piece) <= 6
        piece.encode("utf-8", "surrogatepass")
        if not 0 < token_id <= MAX_ID:
            assert piece == "", token_id


def test_packed_ids_are_canonical() -> None:
    """Re-encoding a decoded id gives the same text; a 6-char pack gives itself back."""
    for token_id in SWEEP[::5]:
        piece = decode_id(token_id)
        ids = encode_text(piece)
        assert decode_ids(ids) == piece
        if len(piece) == 6:
            assert ids == [token_id]


def test_invalid_and_special_ids_decode_to_empty() -> None:
    invalid = [
        0,
        -1,
        -(2**31),
        MAX_ID + 1,
        INT32_LIMIT - 1,
        INT32_LIMIT,
        2**31,
        2**63,
        *range(3, 16),
    ]
    assert [decode_id(i) for i in invalid] == [""] * len(invalid)
    assert decode_id(EOS_ID) == ""
    assert decode_id(CONTROL_END_ID) == ""
    assert decode_ids(invalid) == ""
    # Gaps between classes are reserved.
    assert decode_id(16 + 0x110000) == ""
    assert decode_id(0x2000000 - 1) == ""
    assert decode_id(0x8000000 - 1) == ""
    # Garbage exo might pass does not raise.
    assert decode_id(1.5) == ""  # type: ignore[arg-type]
    assert decode_id(None) == ""  # type: ignore[arg-type]


def test_numpy_ints_decode_like_ints() -> None:
    ids = encode_text(PROSE)
    as_np = np.array(ids, dtype=np.int32)
    assert decode_ids(as_np.tolist()) == PROSE
    assert decode_ids(list(as_np)) == PROSE
    assert StreamDecoder().feed(list(as_np)) == [PROSE]


# --- density ----------------------------------------------------------------------------


def test_prose_density() -> None:
    ids = check_round_trip(PROSE)
    chars_per_id = len(PROSE) / len(ids)
    print(f"\nprose: {len(PROSE)} chars -> {len(ids)} ids = {chars_per_id:.3f} chars/id")
    assert len(PROSE) >= 1500
    assert chars_per_id >= 3.0  # the floor exo's ~470 ids/s needs
    assert chars_per_id >= 5.5  # what codec v1 achieves (5.87)


def test_markdown_density() -> None:
    ids = check_round_trip(MARKDOWN_ANSWER)
    chars_per_id = len(MARKDOWN_ANSWER) / len(ids)
    print(f"\nmarkdown: {len(MARKDOWN_ANSWER)} chars -> {len(ids)} ids = {chars_per_id:.3f} chars/id")
    assert chars_per_id >= 5.0  # codec v1 achieves 5.45


# --- statelessness across processes -----------------------------------------------------

CHILD = """
import json, sys
from exo_remote_engine.engine.codec import decode_ids, encode_text
job = json.load(sys.stdin)
json.dump(
    {"decoded": [decode_ids(ids) for ids in job["ids"]],
     "encoded": [encode_text(t) for t in job["texts"]]},
    sys.stdout,
)
"""


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_separate_process_agrees(hash_seed: str) -> None:
    texts = [PROSE, MARKDOWN_ANSWER, *TORTURE.values()]
    ids = [encode_text(t) for t in texts]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps({"ids": ids, "texts": texts}),  # surrogates travel as \\u escapes
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    result = json.loads(proc.stdout)
    assert result["decoded"] == texts
    assert result["encoded"] == ids


# --- control side channel ---------------------------------------------------------------


@pytest.mark.parametrize("length", range(11))
def test_control_payload_lengths(length: int) -> None:
    payload = bytes((7 * i + 250) % 256 for i in range(length))
    ids = encode_control(payload)
    assert ids[-1] == CONTROL_END_ID
    assert CONTROL_END_ID not in ids[:-1]
    assert len(ids) == (length + 2) // 3 + 1
    check_ids(ids)
    assert decode_ids(ids) == ""
    assert StreamDecoder().feed(ids) == [payload]


def test_empty_payload_is_just_control_end() -> None:
    assert encode_control(b"") == [CONTROL_END_ID]
    assert StreamDecoder().feed([CONTROL_END_ID]) == [b""]


def test_interleaved_text_and_control() -> None:
    usage = json.dumps({"finish_reason": "stop", "usage": {"prompt_tokens": 3}}).encode()
    ids = [
        *encode_text("Hello 👋, "),
        *encode_text("world."),
        *encode_control(usage),
        *encode_control(b""),
        *encode_text("\nmore text"),
        *encode_control(b"\x00\xff\x01"),
        EOS_ID,
    ]
    assert decode_ids(ids) == "Hello 👋, world.\nmore text"
    expected: list[str | bytes] = ["Hello 👋, world.", usage, b"", "\nmore text", b"\x00\xff\x01"]
    assert StreamDecoder().feed(ids) == expected
    one_at_a_time: list[str | bytes] = []
    decoder = StreamDecoder()
    for token_id in ids:
        one_at_a_time.extend(decoder.feed([token_id]))
    assert merge_text(one_at_a_time) == expected


def merge_text(items: list[str | bytes]) -> list[str | bytes]:
    out: list[str | bytes] = []
    for item in items:
        if isinstance(item, str) and out and isinstance(out[-1], str):
            out[-1] += item
        else:
            out.append(item)
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(PACKY.filter(bool), st.binary(max_size=40)), max_size=8),
    st.integers(min_value=1, max_value=7),
)
def test_stream_round_trip(items: list[str | bytes], step: int) -> None:
    ids: list[int] = []
    for item in items:
        ids += encode_text(item) if isinstance(item, str) else encode_control(item)
        if isinstance(item, bytes):
            check_ids(ids[-1:])
    ids.append(EOS_ID)
    check_ids(ids)
    assert decode_ids(ids) == "".join(i for i in items if isinstance(i, str))
    decoder = StreamDecoder()
    got: list[str | bytes] = []
    for start in range(0, len(ids), step):  # arbitrary feed boundaries, even mid-payload
        got += decoder.feed(ids[start : start + step])
    assert merge_text(got) == merge_text(items)


def test_stream_decoder_ignores_eos_and_invalid_ids() -> None:
    ids = [EOS_ID, 0, -5, MAX_ID + 1, *encode_text("ok"), EOS_ID]
    assert StreamDecoder().feed(ids) == ["ok"]
    assert StreamDecoder().feed([]) == []


def test_a_step_is_one_int_for_exo_and_all_its_ids_for_decoders() -> None:
    text = "一个完整的增量 with ASCII, עברית and 🦊"
    step = codec.Step(codec.encode_text(text))
    last = codec.Step([*codec.encode_control(b'{"type":"finished"}'), codec.EOS_ID])
    assert step == codec.STEP_ID and last == codec.EOS_ID, "exo compares the int value with EOS"
    assert codec.decode_id(step) == "", "without its ids a step is no text"
    assert codec.decode_ids([step, last]) == text
    wire = codec.expand([step, 7 + 16, last])
    assert all(type(i) is int for i in wire) and wire[-1] == codec.EOS_ID
    assert codec.decode_ids(wire) == text + chr(7)
    pieces = codec.StreamDecoder().feed([step, last])
    assert pieces == [text, b'{"type":"finished"}']

    import numpy as np

    held = np.empty((1, 1), dtype=object)
    held[0, 0] = step
    assert held.reshape(-1)[-1:].item() is step, "exo's token.item() keeps the object"
    assert copy.deepcopy(step).ids == step.ids and copy.deepcopy(step) == step
