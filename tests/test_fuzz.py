"""Hypothesis fuzzing of every RPC against ONE in-process sidecar.

The sidecar (module-scoped) runs on its own event loop in a background thread and serves
the embedded offline model (``embedded-echo``, no upstream needed) plus one alias,
``fuzz-up``, on a fake OpenAI upstream in echo mode whose key is the planted key. Calls
are made with a blocking gRPC channel from the test thread:

* structured ``GenerateRequest``s: random roles (invalid enum numbers included), unicode
  text without surrogates, image parts with random bytes / MIME types / URLs, tool
  definitions with random and invalid JSON-schema strings, tool choices (invalid modes
  included), sampling values including NaN, infinities and negatives, random model names
  (empty included), random request ids and metadata;
* ``ListModels`` and ``grpc.health.v1.Health/Check`` with random metadata / service names;
* raw bytes on the wire for every RPC (random bytes and mutated valid requests), through
  ``channel.unary_unary``/``unary_stream`` with identity serializers.

Property of every call: it ends within the call timeout (no hang, never DEADLINE_EXCEEDED),
with OK or a status from the README's error table (never UNKNOWN); a sidecar error carries
the ErrorInfo whose reason maps to that status; the details carry no traceback or Python
exception repr; no response, detail, trailer, log record (DEBUG) or metric contains the
planted key; an OK Generate ends with exactly one Finished event; the sidecar never fetches
a client-supplied image URL itself. INTERNAL and UNAVAILABLE never appear (the fake upstream
never fails). Bytes that do not decode as the request type get INVALID_ARGUMENT from the
sidecar's decode guard, not grpc's own UNKNOWN;
``test_undecodable_request_bytes_are_invalid_argument`` checks that part, strictly.

The case count defaults to 10,000 across the RPCs (1,000 structured and 1,500 raw Generate,
3,000 raw + 2,500 metadata ListModels, 2,000 Health); ``EXO_REMOTE_FUZZ_SCALE`` multiplies
it. A Generate that reaches LiteLLM costs 20-40 ms of sidecar time on a 2-core box, the
other cases 3-4 ms (mostly Hypothesis itself): that is what bounds the split.
Counts, status codes and wall time are printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo_remote_engine.contract.errors import STATUS_DETAILS_KEY, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from exo_remote_engine.generated.grpc_health import health_pb2, health_pb2_grpc
from exo_remote_engine.server import RunningSidecar, SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import EMBEDDED_ALIAS, embedded_entry, load_config
from tests.conftest import PLANTED_KEY
from tests.support.configs import KEY_ENV, write_config
from tests.support.harness import DOCUMENTED_CODES, EXCEPTION_REPR, SERVICE, chat_request, leaked_key, metrics_text_of
from tests.support.openai_upstream import OpenAIUpstream

SCALE = float(os.environ.get("EXO_REMOTE_FUZZ_SCALE", "1"))
CALL_TIMEOUT_S = 10.0
UPSTREAM_ALIAS = "fuzz-up"
GENERATE = f"/{SERVICE}/Generate"
LIST_MODELS = f"/{SERVICE}/ListModels"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_QUIET_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm", "httpx", "openai", "aiohttp")


def _examples(n: int) -> int:
    return max(10, int(n * SCALE))


def _fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=_examples(n),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class KeyLeakSink(logging.Handler):
    """Checks every log record (DEBUG and up, any thread) for the planted key."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records = 0
        self.leaks: list[str] = []
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        try:
            text = record.getMessage()
        except Exception:  # a record whose args do not format still must not leak
            text = f"{record.msg} {record.args}"
        if record.exc_info:
            text += self._formatter.formatException(record.exc_info)
        if leaked_key(text):
            self.leaks.append(f"{record.name}: {text[:300]}")


@dataclass
class Fuzz:
    sidecar: RunningSidecar
    upstream: OpenAIUpstream
    channel: grpc.Channel
    sink: KeyLeakSink
    stub: pb_grpc.RemoteInferenceServiceStub = field(init=False)
    health: health_pb2_grpc.HealthStub = field(init=False)
    raw_generate: Any = field(init=False)
    raw_list: Any = field(init=False)
    raw_health: Any = field(init=False)
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    timings: dict[str, tuple[int, float]] = field(default_factory=dict)
    slowest_s: float = 0.0

    def __post_init__(self) -> None:
        identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
        self.stub = pb_grpc.RemoteInferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.raw_generate = self.channel.unary_stream(
            GENERATE, request_serializer=identity, response_deserializer=identity
        )
        self.raw_list = self.channel.unary_unary(
            LIST_MODELS, request_serializer=identity, response_deserializer=identity
        )
        self.raw_health = self.channel.unary_unary(
            HEALTH_CHECK, request_serializer=identity, response_deserializer=identity
        )

    @property
    def calls(self) -> int:
        return sum(self.codes.values())


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    patch = pytest.MonkeyPatch()
    patch.setenv(KEY_ENV, PLANTED_KEY)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-sidecar", daemon=True)
    thread.start()

    def run(coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    root = logging.getLogger()
    sink = KeyLeakSink()
    saved = (root.level, {name: logging.getLogger(name).level for name in _QUIET_LOGGERS})
    root.setLevel(logging.DEBUG)
    root.addHandler(sink)
    # As the sidecar's CLI does: LiteLLM and HTTP client internals stay at WARNING, the
    # sidecar's own loggers log everything.
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    upstream = OpenAIUpstream()  # echo mode for every model
    run(upstream.start())
    path = write_config(tmp_path_factory.mktemp("fuzz") / "fuzz.yaml", upstream.url, [UPSTREAM_ALIAS])
    config = load_config(path)
    config = dataclasses.replace(config, models=(embedded_entry(), *config.models), default_model=EMBEDDED_ALIAS)
    sidecar = run(start_sidecar(SidecarSettings(listen="127.0.0.1:0"), config))
    channel = grpc.insecure_channel(sidecar.address)
    fz = Fuzz(sidecar, upstream, channel, sink)
    started = time.monotonic()
    try:
        yield fz
    finally:
        wall = time.monotonic() - started
        channel.close()
        run(sidecar.stop(grace_s=None))
        run(upstream.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        root.removeHandler(sink)
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)
        patch.undo()
        print(f"\n[fuzz] {fz.calls} calls in {wall:.1f}s; slowest call {fz.slowest_s * 1000:.0f} ms")
        print(f"[fuzz] log records checked for the key: {sink.records}")
        for name, (count, seconds) in fz.timings.items():
            print(f"[fuzz]   {name}: {count} calls, {seconds:.1f}s")
        for (rpc, code), count in sorted(fz.codes.items()):
            print(f"[fuzz]   {rpc:<22} {code:<20} {count}")


@pytest.fixture
def timed(fuzz: Fuzz, request: pytest.FixtureRequest) -> Iterator[None]:
    before, started = fuzz.calls, time.monotonic()
    yield
    fuzz.timings[request.node.name] = (fuzz.calls - before, time.monotonic() - started)
    fetched = [r for r in fuzz.upstream.requests if r.path == "/models"]
    assert not fetched, "the sidecar fetched a client-supplied image URL itself"


# ----------------------------------------------------------------------------- strategies

# Any Unicode scalar value except surrogates (which protobuf strings cannot carry).
TEXT = st.text(st.characters(codec="utf-8"), max_size=24)
SHORT = st.text(st.characters(codec="utf-8"), max_size=8)
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
KNOWN_MODELS = st.sampled_from([EMBEDDED_ALIAS, UPSTREAM_ALIAS])
# Mostly served models (so requests get past the lookup), sometimes near misses or noise.
NEAR_MISSES = ["", " ", "EMBEDDED-ECHO", f"{EMBEDDED_ALIAS} ", f"{UPSTREAM_ALIAS}\x00", "*", "openai/gpt-4o"]
MODEL = st.integers(0, 19).flatmap(
    lambda i: (
        st.just(EMBEDDED_ALIAS if i < 10 else UPSTREAM_ALIAS)
        if i < 16
        else (st.sampled_from(NEAR_MISSES) if i < 18 else SHORT)
    )
)
ROLE = st.one_of(st.sampled_from(list(pb.Role.values())), st.sampled_from(list(pb.Role.values())), INT32)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | SHORT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(SHORT, children, max_size=3),
    max_leaves=4,
)
SCHEMA = st.one_of(
    st.sampled_from(["", '{"type": "object"}', "{", "null", "[]", "5", "NaN", '{"type": "object"', "\x00"]),
    JSON_VALUE.map(json.dumps),
    st.dictionaries(SHORT, st.sampled_from([{"type": "string"}, {"type": 7}, {"enum": []}]), max_size=3).map(
        lambda props: json.dumps({"type": "object", "properties": props})
    ),
    TEXT,
)


def _image_urls(upstream_url: str) -> st.SearchStrategy[str]:
    # Only loopback http(s) (or not a URL at all): a GET to {upstream}/models would mean the
    # sidecar fetched a client-supplied URL itself.
    return st.one_of(
        st.just(f"{upstream_url}/models"),
        st.just("http://127.0.0.1:9/none.png"),
        st.sampled_from(["", "data:image/png;base64,AAAA", "file:///etc/passwd", "ftp://127.0.0.1/x"]),
        SHORT,
    )


def _part(image_url: st.SearchStrategy[str]) -> st.SearchStrategy[pb.ContentPart]:
    return st.one_of(
        TEXT.map(lambda t: pb.ContentPart(text=t)),
        TEXT.map(lambda t: pb.ContentPart(text=t)),
        st.builds(lambda u, d: pb.ContentPart(image_url=pb.ImageUrl(url=u, detail=d)), image_url, SHORT),
        st.builds(
            lambda data, mime, d: pb.ContentPart(image_data=pb.ImageData(data=data, mime_type=mime, detail=d)),
            st.binary(max_size=48),
            st.one_of(st.sampled_from(["image/png", "image/jpeg", "", "text/plain;base64,"]), SHORT),
            SHORT,
        ),
    )


TOOL_CALL = st.builds(lambda i, n, a: pb.ToolCall(id=i, name=n, arguments_json=a), SHORT, SHORT, SCHEMA)


def _message(image_url: st.SearchStrategy[str]) -> st.SearchStrategy[pb.Message]:
    return st.builds(
        lambda role, content, calls, call_id, name: pb.Message(
            role=role, content=content, tool_calls=calls, tool_call_id=call_id, name=name
        ),
        ROLE,
        st.lists(_part(image_url), max_size=2),
        st.lists(TOOL_CALL, max_size=2),
        st.one_of(st.just(""), SHORT),
        st.one_of(st.just(""), SHORT),
    )


def _tool(name: str, description: str, schema: str, strict: bool | None) -> pb.ToolDefinition:
    tool = pb.ToolDefinition(name=name, description=description, parameters_json_schema=schema)
    if strict is not None:
        tool.strict = strict
    return tool


TOOL = st.builds(_tool, SHORT, SHORT, SCHEMA, st.none() | st.booleans())
TOOL_CHOICE = st.one_of(
    st.none(),
    st.one_of(st.sampled_from(list(pb.ToolChoiceMode.values())), INT32).map(lambda m: pb.ToolChoice(mode=m)),
    SHORT.map(lambda name: pb.ToolChoice(function_name=name)),
)


def _sampling_params(values: dict[str, Any]) -> pb.SamplingParams:
    out = pb.SamplingParams(stop=values.pop("stop", ()))
    for name, value in values.items():
        setattr(out, name, value)
    return out


# Unset differs from zero: each knob is present or not; NaN, infinities and negatives included.
SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "temperature": ANY_FLOAT,
        "top_p": ANY_FLOAT,
        "presence_penalty": ANY_FLOAT,
        "frequency_penalty": ANY_FLOAT,
        "max_tokens": INT32,
        "seed": INT64,
        "parallel_tool_calls": st.booleans(),
        "stop": st.lists(SHORT, max_size=3),
    },
).map(_sampling_params)


# Requests the sidecar's validation accepts (known roles, tool calls only on assistant turns,
# named tools with finite JSON-object schemas, finite sampling, max_tokens >= 1), so that half
# of the structured cases reach LiteLLM and the provider instead of stopping at validation.
KNOWN_ROLE = st.sampled_from([r for r in pb.Role.values() if r != pb.ROLE_UNSPECIFIED])
FINITE = st.floats(allow_nan=False, allow_infinity=False)
VALID_SCHEMA = st.one_of(
    st.just('{"type": "object"}'),
    st.dictionaries(SHORT, JSON_VALUE, max_size=3).map(json.dumps),
)
VALID_TOOL = st.builds(_tool, SHORT.filter(bool), SHORT, VALID_SCHEMA, st.none() | st.booleans())
VALID_SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "temperature": FINITE,
        "top_p": FINITE,
        "presence_penalty": FINITE,
        "frequency_penalty": FINITE,
        "max_tokens": st.integers(1, 2**31 - 1),
        "seed": INT64,
        "parallel_tool_calls": st.booleans(),
        "stop": st.lists(SHORT, max_size=3),
    },
).map(_sampling_params)


def _valid_message(image_url: st.SearchStrategy[str]) -> st.SearchStrategy[pb.Message]:
    return st.builds(
        lambda role, content, calls, call_id, name: pb.Message(
            role=role,
            content=content,
            tool_calls=calls if role == pb.ROLE_ASSISTANT else [],
            tool_call_id=call_id,
            name=name,
        ),
        KNOWN_ROLE,
        st.lists(_part(image_url), max_size=2),
        st.lists(TOOL_CALL, max_size=2),
        st.one_of(st.just(""), SHORT),
        st.one_of(st.just(""), SHORT),
    )


@st.composite
def generate_requests(draw: st.DrawFn, upstream_url: str) -> pb.GenerateRequest:
    """Half anything the schema allows, half what validation accepts."""
    image_urls = _image_urls(upstream_url)
    valid = draw(st.booleans())
    message = _valid_message(image_urls) if valid else _message(image_urls)
    request = pb.GenerateRequest(
        request_id=draw(st.one_of(st.just(""), SHORT)),
        model=draw(MODEL),
        messages=draw(st.lists(message, min_size=draw(st.sampled_from([0, 1, 1, 1])), max_size=2)),
        tools=draw(st.lists(VALID_TOOL if valid else TOOL, max_size=2)),
        sampling=draw(VALID_SAMPLING if valid else SAMPLING),
    )
    choice = draw(TOOL_CHOICE)
    if choice is not None:
        request.tool_choice.CopyFrom(choice)
    return request


_RESERVED = {"te", "content-type", "connection", "host", "keep-alive", "transfer-encoding", "upgrade", "user-agent"}
METADATA_KEY = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12).filter(
    lambda k: k not in _RESERVED and not k.startswith(("grpc-", "-", "_", ".")) and not k.endswith("-bin")
)
METADATA_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
METADATA = st.lists(
    st.one_of(
        st.tuples(METADATA_KEY, METADATA_VALUE),
        st.tuples(st.sampled_from(["authorization", "x-request-id"]), METADATA_VALUE),
    ),
    max_size=3,
)


def _seeds() -> list[bytes]:
    user = pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hello")])
    image = pb.ContentPart(image_data=pb.ImageData(data=b"\x89PNG\r\n", mime_type="image/png"))
    full = pb.GenerateRequest(
        request_id="seed",
        model=EMBEDDED_ALIAS,
        messages=[user, pb.Message(role=pb.ROLE_USER, content=[image])],
        tools=[pb.ToolDefinition(name="f", parameters_json_schema='{"type": "object"}')],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO),
        sampling=pb.SamplingParams(temperature=0.5, max_tokens=5, stop=["x"]),
    )
    return [
        pb.GenerateRequest(model=EMBEDDED_ALIAS, messages=[user]).SerializeToString(),
        pb.GenerateRequest(model=UPSTREAM_ALIAS, messages=[user]).SerializeToString(),
        full.SerializeToString(),
        pb.ListModelsRequest(refresh=True).SerializeToString(),
        health_pb2.HealthCheckRequest(service=SERVICE).SerializeToString(),
    ]


SEEDS = _seeds()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def _well_formed_field(draw: st.DrawFn) -> bytes:
    """One field in valid wire format: a random field number with a varint, fixed or
    length-delimited (UTF-8 text, or another request) payload."""
    number = draw(st.one_of(st.integers(1, 8), st.integers(9, 2**29 - 1)))
    kind = draw(st.sampled_from(["varint", "fixed64", "fixed32", "text", "nested"]))
    if kind == "varint":
        return _varint(number << 3) + _varint(draw(st.integers(0, 2**64 - 1)))
    if kind == "fixed64":
        return _varint(number << 3 | 1) + draw(st.binary(min_size=8, max_size=8))
    if kind == "fixed32":
        return _varint(number << 3 | 5) + draw(st.binary(min_size=4, max_size=4))
    payload = SHORT.map(str.encode) if kind == "text" else st.sampled_from(SEEDS)
    data = draw(payload)
    return _varint(number << 3 | 2) + _varint(len(data)) + data


@st.composite
def wire_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or valid requests of some RPC spliced together and edited: well-formed
    fields appended (which often still decode, into known or unknown fields) or raw damage
    (bit flips, truncation, random insertions, which mostly do not)."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=160))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 3]))):
        op = draw(st.sampled_from(["field", "field", "splice", "flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "field":
            data += draw(_well_formed_field())
        elif op == "splice":  # concatenated messages merge: still a valid message
            data += draw(st.sampled_from(SEEDS))
        elif op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 4))]
    return bytes(data)


# ----------------------------------------------------------------------------- the property


@dataclass
class Call:
    rpc: str
    code: grpc.StatusCode
    details: str
    trailers: Sequence[tuple[str, str | bytes]]
    responses: list[Any]
    elapsed_s: float


def _call(fz: Fuzz, rpc: str, invoke: Callable[[], Any], streaming: bool) -> Call:
    started = time.monotonic()
    responses: list[Any] = []
    try:
        if streaming:
            for response in invoke():
                responses.append(response)
        else:
            responses.append(invoke())
        code, details, trailers = grpc.StatusCode.OK, "", ()
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        details = exc.details() or ""  # type: ignore[attr-defined]
        trailers = tuple(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
    elapsed = time.monotonic() - started
    fz.slowest_s = max(fz.slowest_s, elapsed)
    fz.codes[(rpc, code.name)] += 1
    return Call(rpc, code, details, trailers, responses, elapsed)


def _parsed_schema(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text or "{}")
    except (ValueError, RecursionError):
        return False, None


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def _check(fz: Fuzz, call: Call, *, decodable: bool = True, request: Any = None, sidecar_errors: bool = True) -> None:
    where = f"{call.rpc}: {call.code.name} {call.details!r} for {request!r:.600}"
    assert call.elapsed_s < CALL_TIMEOUT_S - 1, f"hang: {call.elapsed_s:.1f}s: {where}"
    assert call.code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"hang: {where}"
    assert leaked_key(call.details, *(k for k, _ in call.trailers), *(v for _, v in call.trailers)) is None, where
    assert leaked_key(*call.responses) is None, where
    assert not fz.sink.leaks, fz.sink.leaks[:3]
    assert "Traceback" not in call.details, where
    if not decodable:
        assert call.code is grpc.StatusCode.INVALID_ARGUMENT, where
        return
    assert not EXCEPTION_REPR.search(call.details), where
    assert call.code is not grpc.StatusCode.UNKNOWN, where
    assert call.code in DOCUMENTED_CODES, where
    assert call.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE), f"unexplained: {where}"
    if call.code is not grpc.StatusCode.OK and sidecar_errors:
        details = [v for k, v in call.trailers if k == STATUS_DETAILS_KEY]
        assert details, f"no google.rpc.Status in the trailers: {where}"
        error = RemoteError.from_status(call.code, call.details, call.trailers)
        assert error.grpc_code is call.code, f"ErrorInfo {error.reason} does not map to {call.code}: {where}"
    if call.rpc.startswith("Generate") and call.code is grpc.StatusCode.OK:
        events = [pb.GenerateResponse.FromString(r) if isinstance(r, bytes) else r for r in call.responses]
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds and kinds[-1] == "finished" and kinds.count("finished") == 1, f"{kinds}: {where}"


def _decodes(message_type: Any, data: bytes) -> Any:
    try:
        return message_type.FromString(data)
    except DecodeError:
        return None


# ----------------------------------------------------------------------------- the tests


@pytest.mark.timeout(600)
def test_generate_structured_requests(fuzz: Fuzz, timed: None) -> None:
    @_fuzz_settings(1000)
    @given(request=generate_requests(fuzz.upstream.url), metadata=METADATA)
    def run(request: pb.GenerateRequest, metadata: list[tuple[str, str]]) -> None:
        call = _call(
            fuzz,
            "Generate",
            lambda: fuzz.stub.Generate(request, timeout=CALL_TIMEOUT_S, metadata=metadata),
            streaming=True,
        )
        _check(fuzz, call, request=request)

    run()


@pytest.mark.timeout(600)
def test_generate_wire_bytes(fuzz: Fuzz, timed: None) -> None:
    @_fuzz_settings(1500)
    @given(data=wire_bytes())
    def run(data: bytes) -> None:
        request = _decodes(pb.GenerateRequest, data)
        call = _call(fuzz, "Generate(bytes)", lambda: fuzz.raw_generate(data, timeout=CALL_TIMEOUT_S), streaming=True)
        _check(fuzz, call, decodable=request is not None, request=request)

    run()


@pytest.mark.timeout(600)
def test_list_models_wire_bytes(fuzz: Fuzz, timed: None) -> None:
    @_fuzz_settings(3000)
    @given(data=wire_bytes())
    def run(data: bytes) -> None:
        request = _decodes(pb.ListModelsRequest, data)
        call = _call(fuzz, "ListModels(bytes)", lambda: fuzz.raw_list(data, timeout=CALL_TIMEOUT_S), streaming=False)
        _check(fuzz, call, decodable=request is not None, request=request)
        if request is not None:
            assert call.code is grpc.StatusCode.OK, call
            listing = pb.ListModelsResponse.FromString(call.responses[0])
            assert {m.alias for m in listing.models} == {EMBEDDED_ALIAS, UPSTREAM_ALIAS}

    run()


@pytest.mark.timeout(600)
def test_list_models_with_random_metadata(fuzz: Fuzz, timed: None) -> None:
    @_fuzz_settings(2500)
    @given(refresh=st.booleans(), metadata=METADATA)
    def run(refresh: bool, metadata: list[tuple[str, str]]) -> None:
        request = pb.ListModelsRequest(refresh=refresh)
        call = _call(
            fuzz,
            "ListModels",
            lambda: fuzz.stub.ListModels(request, timeout=CALL_TIMEOUT_S, metadata=metadata),
            streaming=False,
        )
        _check(fuzz, call, request=(request, metadata))
        assert call.code is grpc.StatusCode.OK, call

    run()


@pytest.mark.timeout(600)
def test_health_check_services_and_bytes(fuzz: Fuzz, timed: None) -> None:
    @_fuzz_settings(2000)
    @given(service=st.one_of(st.sampled_from(["", SERVICE]), TEXT), data=st.none() | wire_bytes())
    def run(service: str, data: bytes | None) -> None:
        if data is None:
            request: Any = health_pb2.HealthCheckRequest(service=service)
            call = _call(fuzz, "Health", lambda: fuzz.health.Check(request, timeout=CALL_TIMEOUT_S), streaming=False)
        else:
            request = _decodes(health_pb2.HealthCheckRequest, data)
            call = _call(fuzz, "Health(bytes)", lambda: fuzz.raw_health(data, timeout=CALL_TIMEOUT_S), streaming=False)
        # Health answers plain statuses (no ErrorInfo): OK, or NOT_FOUND for unknown services.
        _check(fuzz, call, decodable=request is not None, request=request, sidecar_errors=False)
        if request is not None:
            known = request.service in ("", SERVICE)
            assert call.code is (grpc.StatusCode.OK if known else grpc.StatusCode.NOT_FOUND), call

    run()


def test_no_key_in_logs_or_metrics_after_fuzzing(fuzz: Fuzz) -> None:
    # A request of its own reaches the upstream with the key, so the checks below bite even
    # when this test runs alone (after the fuzzers, they cover what those sent too).
    own = chat_request(UPSTREAM_ALIAS, request_id="fuzz-own-request")
    events = list(fuzz.stub.Generate(own, timeout=CALL_TIMEOUT_S))
    assert events, "the sidecar answered the request"
    sent = {r.headers.get("authorization") for r in fuzz.upstream.requests if r.path.endswith("/chat/completions")}
    assert sent == {f"Bearer {PLANTED_KEY}"}, "the key is really planted, and only the key is sent"
    assert fuzz.sink.records > 0, "the log sink saw the sidecar's records"
    assert not fuzz.sink.leaks, fuzz.sink.leaks[:3]
    text = metrics_text_of(fuzz.sidecar)
    assert f'model="{UPSTREAM_ALIAS}"' in text and "exo_remote_requests_total" in text, text[:2000]
    assert leaked_key(text) is None


# ----------------------------------------------------------------------------- known bugs, strict


@pytest.mark.parametrize(
    ("method", "data"),
    [
        (GENERATE, b"\xff\xff\xff"),  # truncated varint tag
        (GENERATE, b"\x12\x02\xc3\x28"),  # model: invalid UTF-8
        (GENERATE, b"\x1a\x05\x08"),  # messages: length past the end
        (LIST_MODELS, b"\x08"),  # refresh: missing value
        (HEALTH_CHECK, b"\n\x01\xff"),  # service: invalid UTF-8
    ],
)
def test_undecodable_request_bytes_are_invalid_argument(fuzz: Fuzz, method: str, data: bytes) -> None:
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    if method == GENERATE:
        invoke: Any = lambda: list(  # noqa: E731
            fuzz.channel.unary_stream(method, request_serializer=identity, response_deserializer=identity)(
                data, timeout=CALL_TIMEOUT_S
            )
        )
    else:
        invoke = lambda: fuzz.channel.unary_unary(  # noqa: E731
            method, request_serializer=identity, response_deserializer=identity
        )(data, timeout=CALL_TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as caught:
        invoke()
    code, details = caught.value.code(), caught.value.details() or ""  # type: ignore[attr-defined]
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert not EXCEPTION_REPR.search(details), details


def test_invalid_tool_schema_is_invalid_argument(fuzz: Fuzz) -> None:
    request = pb.GenerateRequest(
        model=EMBEDDED_ALIAS,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])],
        tools=[pb.ToolDefinition(name="f", parameters_json_schema="{not json")],
    )
    error = _generate_error(fuzz, request)
    assert error.grpc_code is grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.violations and "tools[0]" in error.violations[0].field, error


def _generate_error(fuzz: Fuzz, request: pb.GenerateRequest) -> RemoteError:
    with pytest.raises(grpc.RpcError) as caught:
        list(fuzz.stub.Generate(request, timeout=CALL_TIMEOUT_S))
    return RemoteError.from_status(
        caught.value.code(),  # type: ignore[attr-defined]
        caught.value.details(),  # type: ignore[attr-defined]
        caught.value.trailing_metadata(),  # type: ignore[attr-defined]
    )


def test_non_finite_sampling_is_invalid_argument(fuzz: Fuzz) -> None:
    request = pb.GenerateRequest(
        model=UPSTREAM_ALIAS,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])],
        sampling=pb.SamplingParams(temperature=math.nan),
    )
    error = _generate_error(fuzz, request)
    assert error.grpc_code is grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.violations and error.violations[0].field.endswith("temperature"), error


def test_developer_message_with_tool_calls_and_no_content_is_invalid_argument(fuzz: Fuzz) -> None:
    request = pb.GenerateRequest(
        model=EMBEDDED_ALIAS,
        messages=[
            pb.Message(role=pb.ROLE_DEVELOPER, tool_calls=[pb.ToolCall(id="c", name="f", arguments_json="{}")]),
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")]),
        ],
    )
    error = _generate_error(fuzz, request)
    assert error.grpc_code is grpc.StatusCode.INVALID_ARGUMENT, error
