"""The wire contract: buf lint/format/build, generated stubs identical to a fresh
regeneration, stubs that import under classic exo's pins and under the newest runtime, and
no field anywhere that could carry a key, a base URL or provider config."""

from __future__ import annotations

import filecmp
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

import exo_remote_engine.generated as generated_pkg
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from exo_remote_engine.generated.grpc_health import health_pb2, health_pb2_grpc
from tests.support.real_parts import missing as missing_part

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "exo_remote_engine" / "generated"
SERVICE = "exo.remote.v1.RemoteInferenceService"
PINS_PYTHON = os.environ.get("EXO_REMOTE_PINS_PYTHON") or str(REPO / ".venvs" / "exo-pins" / "bin" / "python")


def _buf() -> str:
    candidates = [Path(sys.executable).parent / "buf", REPO / ".venv" / "bin" / "buf"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("buf")
    assert found, "buf is not installed (pip install buf-bin, part of the test extra)"
    return found


# --- buf --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["lint"], ["format", "-d", "--exit-code"], ["build", "-o", os.devnull]],
    ids=["lint", "format", "build"],
)
def test_buf(args: list[str]) -> None:
    result = subprocess.run([_buf(), *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"buf {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"


# --- regenerate and diff ----------------------------------------------------------------


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_generated_stubs_match_a_fresh_regeneration(tmp_path: Path) -> None:
    # scripts/gen_protos.sh writes protoc's output relative to the repo (virtual proto paths
    # map onto exo_remote_engine/generated), so it runs in a copy of what it reads.
    if not (REPO / ".venvs" / "codegen" / "bin" / "python").is_file():
        missing_part("no .venvs/codegen (grpcio-tools): run scripts/bootstrap.sh (the test regenerates offline)")
    work = tmp_path / "repo"
    shutil.copytree(REPO / "protos", work / "protos")
    shutil.copytree(REPO / "scripts", work / "scripts")
    # Reuse the repo's pinned codegen venv (scripts/bootstrap.sh builds it).
    (work / ".venvs").symlink_to(REPO / ".venvs", target_is_directory=True)
    result = subprocess.run(
        ["bash", "scripts/gen_protos.sh"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"gen_protos.sh failed:\n{result.stdout}\n{result.stderr}"
    fresh = _files(work / "exo_remote_engine" / "generated")
    committed = _files(GENERATED)
    assert fresh, "the script generated nothing"
    assert {"remote_inference_pb2.py", "grpc_health/health_pb2_grpc.py"} <= set(fresh)
    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    differ = sorted(
        name for name in set(fresh) & set(committed) if not filecmp.cmp(fresh[name], committed[name], shallow=False)
    )
    assert not (missing or extra or differ), (
        "exo_remote_engine/generated/ is not what scripts/gen_protos.sh produces from protos/; "
        f"run it and commit. differing: {differ}; not committed: {missing}; "
        f"not generated: {extra}"
    )


# --- classic exo's pins -----------------------------------------------------------------

PINS_PROBE = r"""
import importlib.util, json, sys, warnings
warnings.simplefilter("error")
import grpc
import google.protobuf
import exo_remote_engine
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from exo_remote_engine.generated.grpc_health import health_pb2_grpc
request = pb.GenerateRequest(
    request_id="r-1",
    model="gpt",
    messages=[
        pb.Message(role=pb.ROLE_SYSTEM, content=[pb.ContentPart(text="be brief")]),
        pb.Message(
            role=pb.ROLE_USER,
            content=[
                pb.ContentPart(text="héllo 👋"),
                pb.ContentPart(image_url=pb.ImageUrl(url="https://x.test/a.png", detail="low")),
                pb.ContentPart(image_data=pb.ImageData(data=b"\x89PNG\x00", mime_type="image/png")),
            ],
        ),
        pb.Message(
            role=pb.ROLE_ASSISTANT,
            tool_calls=[pb.ToolCall(id="c1", name="f", arguments_json='{"a": 1}')],
        ),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="c1", content=[pb.ContentPart(text="2")]),
    ],
    tools=[pb.ToolDefinition(name="f", parameters_json_schema='{"type": "object"}', strict=True)],
    tool_choice=pb.ToolChoice(function_name="f"),
    sampling=pb.SamplingParams(temperature=0.0, max_tokens=7, stop=["END"], seed=3),
)
data = request.SerializeToString()
back = pb.GenerateRequest.FromString(data)
print(json.dumps({
    "grpc": grpc.__version__,
    "protobuf": google.protobuf.__version__,
    "package_file": exo_remote_engine.__file__,
    "roundtrip_equal": back == request,
    "temperature_set": back.sampling.HasField("temperature"),
    "top_p_set": back.sampling.HasField("top_p"),
    "image_bytes": back.messages[1].content[2].image_data.data.hex(),
    "wire": data.hex(),
    "stub": hasattr(pb_grpc, "RemoteInferenceServiceStub"),
    "health_stub": hasattr(health_pb2_grpc, "HealthStub"),
    "litellm_importable": importlib.util.find_spec("litellm") is not None,
    "litellm_loaded": "litellm" in sys.modules,
    "exo_modules": sorted(m for m in sys.modules if m.split(".")[0] == "exo"),
}))
"""


@pytest.fixture(scope="module")
def pins_probe() -> dict[str, Any]:
    if not Path(PINS_PYTHON).is_file():
        missing_part(
            f"no classic-exo pins interpreter at {PINS_PYTHON}: run scripts/bootstrap.sh or set EXO_REMOTE_PINS_PYTHON"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run(
        [PINS_PYTHON, "-c", PINS_PROBE],
        cwd="/tmp",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"stubs do not import under the pins:\n{result.stderr}"
    probe: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return probe


def test_pins_interpreter_has_classic_exo_versions(pins_probe: dict[str, Any]) -> None:
    assert pins_probe["grpc"] == "1.70.0"
    assert pins_probe["protobuf"] == "5.28.1"


def test_stubs_import_from_the_installed_package_under_pins(pins_probe: dict[str, Any]) -> None:
    assert pins_probe["stub"] and pins_probe["health_stub"]
    installed = Path(pins_probe["package_file"]).resolve()
    assert not installed.is_relative_to(REPO.resolve()) or ".venvs" in installed.parts, (
        f"the pins interpreter imported the repo checkout ({installed}), not the installed package"
    )


def test_generate_request_round_trips_under_pins(pins_probe: dict[str, Any]) -> None:
    assert pins_probe["roundtrip_equal"] is True
    assert pins_probe["temperature_set"] is True, "an explicit 0.0 survives as set"
    assert pins_probe["top_p_set"] is False, "unset stays unset"
    assert pins_probe["image_bytes"] == b"\x89PNG\x00".hex()
    # Bytes written by the pinned runtime parse identically under the newest runtime.
    request = pb.GenerateRequest.FromString(bytes.fromhex(pins_probe["wire"]))
    assert request.model == "gpt" and request.request_id == "r-1"
    assert [m.role for m in request.messages] == [
        pb.ROLE_SYSTEM,
        pb.ROLE_USER,
        pb.ROLE_ASSISTANT,
        pb.ROLE_TOOL,
    ]
    assert request.messages[1].content[0].text == "héllo 👋"
    assert request.messages[1].content[1].image_url.url == "https://x.test/a.png"
    assert request.messages[2].tool_calls[0].arguments_json == '{"a": 1}'
    assert request.tool_choice.function_name == "f"
    assert request.tools[0].strict is True
    assert list(request.sampling.stop) == ["END"] and request.sampling.max_tokens == 7


def test_engine_side_never_pulls_litellm(pins_probe: dict[str, Any]) -> None:
    assert pins_probe["litellm_importable"] is False, "LiteLLM is installed in the pins env"
    assert pins_probe["litellm_loaded"] is False


def test_stubs_do_not_import_classic_exo_under_pins(pins_probe: dict[str, Any]) -> None:
    assert pins_probe["exo_modules"] == []


# --- the newest runtime -----------------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_newest_runtime_is_newer_than_the_pins() -> None:
    import google.protobuf
    import grpc

    assert _version(grpc.__version__) > (1, 70, 0)
    assert _version(google.protobuf.__version__) > (5, 28, 1)


def test_service_descriptor_under_the_newest_runtime() -> None:
    service = pb.DESCRIPTOR.services_by_name["RemoteInferenceService"]
    assert service.full_name == SERVICE
    assert pb.DESCRIPTOR.package == "exo.remote.v1"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"ListModels", "Generate", "Session", "ListWorkers", "GetUsage"}
    session = methods["Session"]
    assert session.input_type.full_name == "exo.remote.v1.SessionRequest"
    assert session.output_type.full_name == "exo.remote.v1.SessionResponse"
    assert (session.client_streaming, session.server_streaming) == (True, True)
    get_usage = methods["GetUsage"]
    assert get_usage.output_type.full_name == "exo.remote.v1.GetUsageResponse"
    assert (get_usage.client_streaming, get_usage.server_streaming) == (False, False)
    list_workers = methods["ListWorkers"]
    assert list_workers.output_type.full_name == "exo.remote.v1.ListWorkersResponse"
    assert (list_workers.client_streaming, list_workers.server_streaming) == (False, False)
    list_models, generate = methods["ListModels"], methods["Generate"]
    assert list_models.input_type.full_name == "exo.remote.v1.ListModelsRequest"
    assert list_models.output_type.full_name == "exo.remote.v1.ListModelsResponse"
    assert (list_models.client_streaming, list_models.server_streaming) == (False, False)
    assert generate.input_type.full_name == "exo.remote.v1.GenerateRequest"
    assert generate.output_type.full_name == "exo.remote.v1.GenerateResponse"
    assert (generate.client_streaming, generate.server_streaming) == (False, True)
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    assert health.full_name == "grpc.health.v1.Health"


class _RecordingChannel:
    """Records how the generated stub wires each method (no network)."""

    def __init__(self) -> None:
        self.calls: dict[str, str] = {}

    def __getattr__(self, kind: str) -> Any:
        def register(path: str, *args: Any, **kwargs: Any) -> object:
            self.calls[path] = kind
            return object()

        return register


def test_generated_stub_uses_the_right_call_shapes() -> None:
    channel = _RecordingChannel()
    pb_grpc.RemoteInferenceServiceStub(channel)
    assert channel.calls == {
        f"/{SERVICE}/ListModels": "unary_unary",
        f"/{SERVICE}/Generate": "unary_stream",
        f"/{SERVICE}/Session": "stream_stream",
        f"/{SERVICE}/ListWorkers": "unary_unary",
        f"/{SERVICE}/GetUsage": "unary_unary",
    }


def _generated_modules() -> Iterator[str]:
    prefix = generated_pkg.__name__ + "."
    for info in pkgutil.walk_packages(generated_pkg.__path__, prefix):
        yield info.name


def test_generated_modules_live_inside_our_package_never_under_exo() -> None:
    names = sorted(_generated_modules())
    assert "exo_remote_engine.generated.remote_inference_pb2_grpc" in names
    assert "exo_remote_engine.generated.grpc_health.health_pb2" in names
    for name in names:
        module = importlib.import_module(name)
        assert Path(module.__file__ or "").resolve().is_relative_to(GENERATED.resolve()), name
    assert not [m for m in sys.modules if m.split(".")[0] == "exo"], "a stub imported `exo`"
    assert not (GENERATED / "exo").exists()
    assert pb.DESCRIPTOR.name == "exo_remote_engine/generated/remote_inference.proto"
    assert health_pb2.DESCRIPTOR.name == "exo_remote_engine/generated/grpc_health/health.proto"
    top_level_exo = re.compile(r"^\s*(from|import)\s+exo(\.|\s|$)", re.MULTILINE)
    for path in GENERATED.rglob("*.py*"):
        if path.suffix in (".py", ".pyi"):
            assert not top_level_exo.search(path.read_text(encoding="utf-8")), path
    # The compiled-in health service is grpc.health.v1.Health with its two methods.
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    assert health.full_name == "grpc.health.v1.Health"
    assert sorted(m.name for m in health.methods) == ["Check", "Watch"]
    assert health_pb2_grpc.HealthStub.__module__ == "exo_remote_engine.generated.grpc_health.health_pb2_grpc"


# --- no field can carry a key, a base URL or provider config ----------------------------

FORBIDDEN = (
    "key",
    "secret",
    "token",
    "password",
    "credential",
    "base_url",
    "api_base",
    "url",
    "endpoint",
    "provider_config",
    "header",
)
TOKEN_COUNTERS = re.compile(
    r"^(prompt|completion|cached_prompt|cache_creation_prompt|reasoning|max)_tokens$|^max_output_tokens$"
)
# The only fields allowed to hold a URL: an image's URL, and the content part that holds it.
URL_ALLOWED = {
    "exo.remote.v1.ImageUrl.url": None,
    "exo.remote.v1.ContentPart.image_url": "exo.remote.v1.ImageUrl",
}


def _violations(field: FieldDescriptor) -> list[str]:
    name = field.name.lower()
    hits = [word for word in FORBIDDEN if word in name]
    if "token" in hits and TOKEN_COUNTERS.match(name):
        hits.remove("token")
    if "url" in hits and field.full_name in URL_ALLOWED:
        expected_type = URL_ALLOWED[field.full_name]
        actual_type = field.message_type.full_name if field.message_type else None
        if expected_type == actual_type:
            hits.remove("url")
    return hits


def _all_fields(messages: Any) -> Iterator[FieldDescriptor]:
    for message in messages:
        assert isinstance(message, Descriptor)
        yield from message.fields
        yield from _all_fields(message.nested_types)


def test_the_field_check_catches_what_it_must() -> None:
    class Fake:
        def __init__(self, name: str, full_name: str = "", message_type: Any = None) -> None:
            self.name, self.full_name, self.message_type = name, full_name or name, message_type

    def flagged(name: str, full_name: str = "") -> bool:
        return bool(_violations(Fake(name, full_name)))  # type: ignore[arg-type]

    for bad in (
        "api_key",
        "secret",
        "access_token",
        "tokens",
        "refresh_token",
        "password",
        "credentials",
        "base_url",
        "api_base",
        "url",
        "endpoint",
        "provider_config",
        "extra_headers",
        "max_tokens_key",
        "prompt_tokens_url",
    ):
        assert flagged(bad), bad
    for ok in (
        "prompt_tokens",
        "completion_tokens",
        "cached_prompt_tokens",
        "reasoning_tokens",
        "max_tokens",
        "max_output_tokens",
        "model",
        "alias",
    ):
        assert not flagged(ok), ok
    assert not flagged("url", "exo.remote.v1.ImageUrl.url")
    assert flagged("url", "exo.remote.v1.Model.url")
    assert flagged("image_url", "exo.remote.v1.ContentPart.image_url"), "only with ImageUrl type"


def test_no_field_can_carry_a_key_base_url_or_provider_config() -> None:
    fields = list(_all_fields(pb.DESCRIPTOR.message_types_by_name.values()))
    seen = {f.full_name for f in fields}
    # The walk reaches every message, including the counters and the one URL it allows.
    assert {
        "exo.remote.v1.ImageUrl.url",
        "exo.remote.v1.Usage.prompt_tokens",
        "exo.remote.v1.SamplingParams.max_tokens",
        "exo.remote.v1.Model.max_output_tokens",
        "exo.remote.v1.ToolCallDelta.arguments_fragment",
    } <= seen
    assert len(fields) > 40
    bad = {f.full_name: _violations(f) for f in fields if _violations(f)}
    assert bad == {}, f"fields that could carry credentials or provider config: {bad}"


# --- the compiled-in health service beside the standard grpc_health package -------------

STANDARD_HEALTH_PB2 = """
from google.protobuf import descriptor_pool
from google.protobuf.internal import builder
DESCRIPTOR = descriptor_pool.Default().AddSerializedFile({serialized!r})
builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())
builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, "grpc_health.v1.health_pb2", globals())
"""

HEALTH_BESIDE_STANDARD = r"""
import sys
OURS = "exo_remote_engine.generated.grpc_health.health_pb2"
if sys.argv[1] == "standard-first":
    import grpc_health.v1.health_pb2 as standard
    from exo_remote_engine.engine.connection.client import health_pb2
else:
    from exo_remote_engine.engine.connection.client import health_pb2
    import grpc_health.v1.health_pb2 as standard
assert health_pb2 is standard, health_pb2
assert OURS not in sys.modules, "our copy was loaded beside the standard one"
try:  # what importing our copy directly does beside the standard one
    __import__(OURS)
except TypeError as exc:
    print("collision:", exc)
"""


@pytest.fixture
def standard_grpc_health(tmp_path: Path) -> Path:
    """A stand-in for the grpcio-health-checking package (``grpc_health.v1``): the same
    messages as ours, under the file name the real package registers."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc_health/v1/health.proto"
    package = tmp_path / "grpc_health" / "v1"
    package.mkdir(parents=True)
    (tmp_path / "grpc_health" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "health_pb2.py").write_text(STANDARD_HEALTH_PB2.format(serialized=proto.SerializeToString()))
    ours_grpc = (GENERATED / "grpc_health" / "health_pb2_grpc.py").read_text()
    standard_grpc = ours_grpc.replace(
        "from exo_remote_engine.generated.grpc_health import health_pb2", "from grpc_health.v1 import health_pb2"
    )
    assert standard_grpc != ours_grpc
    (package / "health_pb2_grpc.py").write_text(standard_grpc)
    return tmp_path


@pytest.mark.parametrize("order", ["standard-first", "ours-first"])
def test_the_standard_grpc_health_package_is_used_when_present_and_never_collides(
    standard_grpc_health: Path, order: str
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(standard_grpc_health), str(REPO)])}
    result = subprocess.run(
        [sys.executable, "-c", HEALTH_BESIDE_STANDARD, order],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Loading both copies would fail: the reason exo_remote_engine.contract.health_stubs exists.
    assert "duplicate symbol 'grpc.health.v1." in result.stdout or "Conflict register" in result.stdout, result.stdout
