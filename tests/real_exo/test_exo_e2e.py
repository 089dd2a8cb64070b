"""Real classic exo, started with the stock ``exo --inference-engine remote`` command, in
front of a real sidecar process and an OpenAI-compatible upstream on 127.0.0.1, driven by
the official openai SDK. Skipped with the reason when EXO_SRC is not set."""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from tests.conftest import PLANTED_KEY
from tests.support.configs import write_proxy_config
from tests.support.openai_upstream import OpenAIUpstream, Scenario, ToolCallSpec
from tests.support.processes import (
    PINS_VENV,
    REPO,
    ExoNode,
    SidecarProcess,
    exo_skip_reason,
    free_port,
    start_lone_exo_node,
    start_sidecar_process,
)

pytestmark = [pytest.mark.exo, pytest.mark.skipif(exo_skip_reason() is not None, reason=str(exo_skip_reason()))]

TORTURE = (
    "Zero-width joiners 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, skin tones 👋🏽, CJK 漢字かなカナ한국어, "
    "RTL שלום עולם مرحبا بالعالم, combining e\u0301 and n\u0303, Devanagari नमस्ते, "
    "code `def f(x):\n\treturn {x: [1, 2]}`  \n\n   whitespace   runs\t\ttabs, "
    "controls \x01\x02\x1f\x7f, astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and U+FFFF \uffff."
)
ALIASES = ["echo-model", "tools-model", "length-model", "rl-model", "slow-model", "gpt-4o-mini"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("exo-e2e")
    scenarios = {
        "tools-model": Scenario(
            chunks=[],
            tool_calls=[ToolCallSpec("call_42", "get_weather", '{"city": "Paris", "days": 2}')],
            finish_reason="tool_calls",
        ),
        "length-model": Scenario(chunks=["one ", "two ", "three"], finish_reason="length", usage=(17, 3)),
        "rl-model": Scenario(status=429, retry_after="3", error_message=f"Rate limit for key {PLANTED_KEY}"),
        "slow-model": Scenario(chunks=[f"t{i} " for i in range(2000)], interval_s=0.02),
    }
    with OpenAIUpstream.in_thread(scenarios=scenarios) as upstream:
        config = write_proxy_config(workdir / "config.yaml", upstream.url, ALIASES)
        sidecar = start_sidecar_process(config, workdir / "sidecar.log", env={"TEST_UPSTREAM_KEY": PLANTED_KEY})
        node: ExoNode | None = None
        try:
            node = start_lone_exo_node(
                workdir,
                "r",
                sidecar.address,
                wait_models=["echo-model"],
            )
            yield {"upstream": upstream, "sidecar": sidecar, "node": node, "workdir": workdir}
        finally:
            if node is not None:
                node.stop()
            sidecar.stop()


def _client(node: ExoNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.api}/v1", api_key="unused", max_retries=0, timeout=60)


def test_streamed_completion_through_exo_with_the_openai_sdk(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    stream = _client(node).chat.completions.create(
        model="echo-model",
        messages=[{"role": "user", "content": "stream this please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream this please"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 11  # the upstream's figure, not exo's count


def test_raw_stream_ends_with_done(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    body = json.dumps({"model": "echo-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(
        f"{node.api}/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read().decode()
    events = [line for line in raw.split("\n\n") if line.strip()]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[len("data: ") :])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_unicode_torture_round_trips_byte_for_byte(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    reply = _client(node).chat.completions.create(model="echo-model", messages=[{"role": "user", "content": TORTURE}])
    assert reply.choices[0].message.content == "echo: " + TORTURE
    streamed = _client(node).chat.completions.create(
        model="echo-model", messages=[{"role": "user", "content": TORTURE}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "echo: " + TORTURE
    sent = stack["upstream"].requests_for("echo-model")[-1].body
    assert sent["messages"][-1]["content"] == TORTURE, "the provider got the structured message as sent"


def test_tool_call_comes_back_structured(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    reply = _client(node).chat.completions.create(
        model="tools-model",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "call_42",
        "get_weather",
        {"city": "Paris", "days": 2},
    )
    sent = stack["upstream"].requests_for("tools-model")[-1].body
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    streamed = list(
        _client(node).chat.completions.create(
            model="tools-model",
            messages=[{"role": "user", "content": "again"}],
            tools=tools,
            stream=True,
        )
    )
    args = "".join(
        tc.function.arguments or "" for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or []
    )
    assert json.loads(args) == {"city": "Paris", "days": 2}


def test_max_tokens_stop_and_temperature_reach_the_provider(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    reply = _client(node).chat.completions.create(
        model="length-model",
        messages=[{"role": "user", "content": "count"}],
        max_tokens=3,
        stop=["four"],
        temperature=0.3,
        top_p=0.9,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "one two three"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (17, 3)
    sent = stack["upstream"].requests_for("length-model")[-1].body
    assert (sent["max_tokens"], sent["stop"], sent["temperature"], sent["top_p"]) == (3, ["four"], 0.3, 0.9)


def test_models_and_topology_show_the_remote_side(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    models = {m["id"]: m for m in node.get_json("/v1/models")["data"]}
    assert models["echo-model"]["ready"] is True
    assert models["echo-model"]["provider"] == "openai"
    assert models["gpt-4o-mini"]["ready"] is True, "served under the sidecar's own id"
    assert not any(m.startswith("remote-") for m in models)
    assert models["llama-3.2-1b"]["owned_by"] == "exo", "local cards are listed as exo lists them"
    topology = node.get_json("/v1/topology")
    description = topology["nodes"]["r"]
    assert description["model"] == "remote LLM", "short enough for exo's TUI"
    assert description["chip"].startswith(f"sidecar {stack['sidecar'].address}: ")
    assert "models ready" in description["chip"]
    initial = node.get_json("/initial_models")
    assert "echo-model" in initial and initial["echo-model"]["name"]


def test_gpt_ids_are_served_under_their_own_id_and_unknown_ones_are_404(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    upstream: OpenAIUpstream = stack["upstream"]
    reply = _client(node).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert reply.model == "gpt-4o-mini" and reply.choices[0].message.content == "echo: hi"
    assert upstream.requests_for("gpt-4o-mini")[-1].body["model"] == "gpt-4o-mini"
    streamed = _client(node).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "again"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "echo: again"
    asked_before = {alias: len(upstream.requests_for(alias)) for alias in ALIASES}
    for unknown in ("gpt-4o", "gpt-unknown-model"):
        with pytest.raises(openai.NotFoundError) as not_found:
            _client(node).chat.completions.create(model=unknown, messages=[{"role": "user", "content": "x"}])
        message = str(not_found.value)
        assert f"unknown model '{unknown}'" in message and "gpt-4o-mini" in message, message
    assert {alias: len(upstream.requests_for(alias)) for alias in ALIASES} == asked_before, "no default model asked"


def test_tinychat_endpoints_tell_the_truth_about_remote_models(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    initial = node.get_json("/initial_models")
    for alias in ALIASES:
        entry = initial[alias]
        assert entry["loading"] is False and entry["downloaded"] is True, (alias, entry)
        assert entry["download_percentage"] == "remote" and entry["name"], "neither downloadable nor deletable"
    request = urllib.request.Request(
        f"{node.api}/download", json.dumps({"model": "echo-model"}).encode(), {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    error = json.loads(caught.value.read())["error"]
    assert "remote model" in error and "Nothing to download" in error, error
    request = urllib.request.Request(f"{node.api}/models/gpt-4o-mini", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    detail = json.loads(caught.value.read())["detail"]
    assert stack["sidecar"].address in detail and "Nothing to delete" in detail, detail


def test_unknown_model_and_provider_errors_are_clear(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    with pytest.raises(openai.NotFoundError) as not_found:
        _client(node).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in str(not_found.value) and "echo-model" in str(not_found.value)
    with pytest.raises(openai.RateLimitError) as limited:
        _client(node).chat.completions.create(model="rl-model", messages=[{"role": "user", "content": "x"}])
    assert PLANTED_KEY not in str(limited.value)
    assert limited.value.response.headers.get("retry-after") == "3"


def test_client_disconnect_cancels_the_upstream(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    upstream: OpenAIUpstream = stack["upstream"]
    stream = _client(node).chat.completions.create(
        model="slow-model", messages=[{"role": "user", "content": "go"}], stream=True
    )
    for i, _chunk in enumerate(stream):
        if i == 5:
            break
    closed_at = time.monotonic()
    stream.close()
    record = upstream.wait_closed_sync("slow-model", timeout=10)
    assert record.client_disconnected and record.chunks_written < 2000
    assert record.ended_at - closed_at < 3.0


def test_non_streamed_client_disconnect_cancels_the_upstream_within_1s(stack: dict[str, Any]) -> None:
    """A client that gives up on a non-streamed reply (nothing is written until the end, so
    no failed write reveals it) must not leave the provider generating for nobody."""
    node: ExoNode = stack["node"]
    upstream: OpenAIUpstream = stack["upstream"]
    connection = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=2)
    body = json.dumps({"model": "slow-model", "messages": [{"role": "user", "content": "go"}]})
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        connection.getresponse()  # the reply would take 40 s; this client gives up after 2
    closed_at = time.monotonic()
    connection.close()
    record = upstream.wait_closed_sync("slow-model", timeout=10)
    assert record.client_disconnected and record.chunks_written < 2000, record
    latency = record.ended_at - closed_at
    print(f"non-streamed disconnect -> upstream cancelled after {latency * 1000:.0f} ms")
    assert latency < 1.0, f"the upstream kept generating {latency:.2f}s after the client left"


def test_no_connection_leaves_loopback_and_no_hugging_face(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    with urllib.request.urlopen(f"{node.api}/modelpool", timeout=10) as response:
        events = [e[len("data: ") :] for e in response.read().decode().split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]"
    pool = {k: v for e in events[:-1] for k, v in json.loads(e).items()}
    assert set(pool) == set(ALIASES)
    assert all(entry["downloaded"] for entry in pool.values()), "tinychat shows ready remote models"
    _client(node).chat.completions.create(model="echo-model", messages=[{"role": "user", "content": "x"}])
    remote_addresses = {
        c.raddr.ip
        for proc in [psutil.Process(node.process.pid), *psutil.Process(node.process.pid).children(recursive=True)]
        for c in proc.net_connections(kind="inet")
        if c.raddr
    }
    assert remote_addresses <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, remote_addresses
    log = node.log_text().lower()
    assert "huggingface" not in log, log[-3000:]
    assert "traceback" not in log, log[-3000:]


def test_a_node_whose_sidecar_never_answered_gives_a_clear_404(stack: dict[str, Any], tmp_path: Path) -> None:
    """A node started with no sidecar listening knows no remote model: asked for one, it
    answers OpenAI's 404 model_not_found saying it serves none and asking whether the
    sidecar runs (engine/exo_hooks/api.py), and the other node's sidecar is untouched."""
    node: ExoNode = stack["node"]
    sidecar: SidecarProcess = stack["sidecar"]
    assert node.process.poll() is None
    # A second node pointed at a port where no sidecar listens.
    dead = free_port()
    lonely = start_lone_exo_node(
        tmp_path,
        "lonely",
        f"127.0.0.1:{dead}",
    )
    try:
        request = urllib.request.Request(
            f"{lonely.api}/v1/chat/completions",
            json.dumps({"model": "echo-model", "messages": [{"role": "user", "content": "x"}]}).encode(),
            {"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == 404
        error = json.loads(caught.value.read().decode())["error"]
        assert error["code"] == "model_not_found", error
        assert "'echo-model'" in error["message"] and "none (is the sidecar running?)" in error["message"], error
    finally:
        lonely.stop()
    assert sidecar.process.poll() is None


def test_images_reach_the_provider_despite_exo_image_rewriting(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    data_url = "data:image/png;base64," + base64.b64encode(bytes(range(256))).decode()
    content = [
        {"type": "text", "text": "Compare these"},
        {"type": "image_url", "image_url": {"url": "https://images.example/cat.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": data_url}},
    ]
    _client(node).chat.completions.create(model="echo-model", messages=[{"role": "user", "content": content}])
    sent = stack["upstream"].requests_for("echo-model")[-1].body
    assert sent["messages"][-1]["content"] == content, "both images, as sent, in place"


def test_default_model_is_a_remote_one(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    body = json.dumps({"messages": [{"role": "user", "content": "who answers?"}]}).encode()
    request = urllib.request.Request(f"{node.api}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        reply = json.loads(response.read())
    assert reply["model"] == "echo-model"
    assert reply["choices"][0]["message"]["content"] == "echo: who answers?"


def test_tinychat_stream_has_no_done_terminator(stack: dict[str, Any]) -> None:
    node: ExoNode = stack["node"]
    body = json.dumps({"model": "length-model", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    headers = {"Content-Type": "application/json", "Referer": f"{node.api}/"}
    request = urllib.request.Request(f"{node.api}/v1/chat/completions", body.encode(), headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        events = [e for e in response.read().decode().split("\n\n") if e.strip()]
    parsed = [json.loads(e[len("data: ") :]) for e in events]  # every event is JSON for tinychat
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"


def test_remote_node_runs_without_tinygrad(stack: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "block" / "tinygrad"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'tinygrad'\")\n")
    node = start_lone_exo_node(
        tmp_path,
        "notiny",
        stack["sidecar"].address,
        env={"PYTHONPATH": str(blocker.parent)},
        wait_models=["echo-model"],
    )
    try:
        probe = subprocess.run(
            [str(PINS_VENV / "bin" / "python"), "-c", "import tinygrad"],
            capture_output=True,
            timeout=60,
            env={"PYTHONPATH": str(blocker.parent)},
        )
        assert b"No module named 'tinygrad'" in probe.stderr, "the blocker really hides tinygrad"
        reply = _client(node).chat.completions.create(model="echo-model", messages=[{"role": "user", "content": "x"}])
        assert reply.choices[0].message.content == "echo: x"
        assert "tinygrad" not in node.log_text()
    finally:
        node.stop()


def test_explicit_launcher_strips_its_own_flags(stack: dict[str, Any], tmp_path: Path) -> None:
    sidecar: SidecarProcess = stack["sidecar"]
    node = start_lone_exo_node(
        tmp_path,
        "launched",
        "127.0.0.1:1",
        engine="",
        executable="exo-remote-node",
        extra_args=["--sidecar", sidecar.address],
        wait_models=["echo-model"],
    )
    try:
        reply = _client(node).chat.completions.create(
            model="echo-model", messages=[{"role": "user", "content": "via launcher"}]
        )
        assert reply.choices[0].message.content == "echo: via launcher"
        assert "Using inference engine: RemoteLLMInferenceEngine" in node.log_text()
    finally:
        node.stop()


def test_discovered_models_appear_in_exo_without_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exo_remote_engine.sidecar.discovery import PROVIDERS

    for spec in PROVIDERS:  # never a real provider with a developer's own keys
        for name in (*spec.key_envs, spec.base_env):
            monkeypatch.delenv(name, raising=False)
    with OpenAIUpstream.in_thread(scenarios={"gpt-found-mini": Scenario(chunks=["discovered ", "reply"])}) as upstream:
        env_file = tmp_path / "keys.env"
        env_file.write_text(f"OPENAI_API_BASE={upstream.url}/v1\n")
        sidecar = start_sidecar_process(
            None,
            tmp_path / "sidecar.log",
            env={"OLLAMA_API_BASE": "http://127.0.0.1:9"},
            extra_args=["--env-file", str(env_file), "--refresh-s", "1"],
            discover=True,
        )
        node = start_lone_exo_node(
            tmp_path,
            "disc",
            sidecar.address,
            wait_models=["embedded-echo"],
        )
        try:
            models = {m["id"]: m for m in node.get_json("/v1/models")["data"]}
            unready = [m for m in models.values() if m.get("provider") == "openai" and not m["ready"]]
            assert unready and unready[0]["not_ready_reason"] == "set OPENAI_API_KEY on the sidecar"
            with pytest.raises(openai.APIStatusError) as caught:
                _client(node).chat.completions.create(
                    model=unready[0]["id"], messages=[{"role": "user", "content": "x"}]
                )
            assert caught.value.status_code == 503
            assert "set OPENAI_API_KEY on the sidecar" in str(caught.value), "the reason, not a substitution"
            assert unready[0]["id"] not in node.get_json("/initial_models"), "not downloadable: not in tinychat"
            download = urllib.request.Request(
                f"{node.api}/download",
                json.dumps({"model": unready[0]["id"]}).encode(),
                {"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(download, timeout=10)
            assert refused.value.code == 400
            assert "set OPENAI_API_KEY on the sidecar" in json.loads(refused.value.read())["error"]

            env_file.write_text(f"OPENAI_API_BASE={upstream.url}/v1\nOPENAI_API_KEY={PLANTED_KEY}\n")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                found = {m["id"]: m for m in node.get_json("/v1/models")["data"]}.get("openai/gpt-found-mini")
                if found and found["ready"]:
                    break
                time.sleep(0.5)
            assert found and found["ready"], "appeared in exo's /v1/models without restarting exo"
            reply = _client(node).chat.completions.create(
                model="openai/gpt-found-mini", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content == "discovered reply"
            assert PLANTED_KEY not in node.log_text()
        finally:
            node.stop()
            sidecar.stop()


PLAN_CHECK = """
import json, sys
from exo_remote_engine.engine import exo_hooks
report = {}
for remote in (True, False):
    plan = exo_hooks.build_plan(remote_node=remote)
    missing = plan.missing()
    before = [(p.target.describe(), id(p.target.resolve()), dict(p.target.resolve()) if p.dict_key else None)
              for p in plan.patches]
    plan.apply()
    applied = len(plan.applied)
    plan.revert()
    after = [(p.target.describe(), id(p.target.resolve()), dict(p.target.resolve()) if p.dict_key else None)
             for p in plan.patches]
    report["remote" if remote else "local"] = {
        "missing": missing, "patches": len(plan.patches), "applied": applied, "restored": before == after}
print(json.dumps(report))
"""


def test_real_exo_matches_the_pinned_signatures_the_fakes_are_checked_against(tmp_path: Path) -> None:
    """tests/support/exo_signatures.json, which CI holds tests/support/fake_exo.py to, is
    what this exo has at every target of the hooks (kinds, parameters, instance attributes)."""
    result = subprocess.run(
        [str(PINS_VENV / "bin" / "python"), "-m", "tests.support.exo_signatures", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    report = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    assert result.returncode == 0 and report.get("differences") == [], (report, result.stderr[-3000:])
    assert report["targets"] >= 40


def test_the_hook_plan_fits_real_exo_and_reverts_exactly(tmp_path: Path) -> None:
    """The fakes of tests/engine/test_exo_hooks.py are only as good as this: real exo has every
    target, parameter and attribute the plan needs, and a revert leaves it as shipped."""
    result = subprocess.run(
        [str(PINS_VENV / "bin" / "python"), "-c", PLAN_CHECK],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for role, found in report.items():
        assert found["missing"] == [], (role, found)
        assert found["applied"] == found["patches"] > 20, (role, found)
        assert found["restored"] is True, role


def test_stock_exo_answers_with_the_embedded_model_on_a_sidecar_without_config(tmp_path: Path) -> None:
    """A fresh machine: ``exo-remote-sidecar`` with no config and no keys serves the real
    embedded model (the [local] extra and the fetched SmolLM2 file), and stock
    ``exo --inference-engine remote`` lists it ready with llama.cpp's context window and
    answers "What is the capital of France?" (temperature 0, no max_tokens) with Paris,
    ended by the model's own stop token."""
    from exo_remote_engine.sidecar.embedded.model import DEFAULT_ALIAS, local_model_available

    if not local_model_available():
        pytest.skip("needs the [local] extra and the model file (scripts/bootstrap.sh fetches it)")
    sidecar = start_sidecar_process(
        None, tmp_path / "sidecar.log", embedded_model=True, extra_args=["--embedded-ctx", "2048"]
    )
    try:
        node = start_lone_exo_node(
            tmp_path,
            "local",
            sidecar.address,
            wait_models=[DEFAULT_ALIAS],
        )
        try:
            model = {m["id"]: m for m in node.get_json("/v1/models")["data"]}[DEFAULT_ALIAS]
            assert model["ready"] is True
            assert model["context_window"] == 2048, model
            stream = _client(node).chat.completions.create(
                model=DEFAULT_ALIAS,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, finish, usage = "", None, None
            for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    finish = choice.finish_reason or finish
                usage = chunk.usage or usage
            print(f"through exo: {text!r} finish={finish}")
            assert "Paris" in text and "Echo" not in text
            assert finish == "stop"
            assert usage is not None and 0 < usage.completion_tokens < 64 and usage.prompt_tokens > 0
        finally:
            node.stop()
    finally:
        sidecar.stop()
    assert "embedded model: stopped" in sidecar.log.read_text()
