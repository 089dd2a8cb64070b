"""Config that means something else than written stops the sidecar (issue 11, item 12).

Seen on main: ``allowed_modles`` was ignored (the node unrestricted), ``.inf`` in
``model_info`` crashed with a traceback and exit 1, any ``api_base`` scheme was accepted,
and ``stream_timeout`` was ignored on the LiteLLM path. Unknown keys now name the closest
valid key, numbers are checked, ``api_base`` is http(s) only, and ``stream_timeout``
bounds a stalled stream on both transports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.server import SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import ConfigError, load_config
from tests.support.harness import chat_request, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import REPO

KEY = "sk-config-strictness-0123456789abcdef"
ENV = {"CFG_KEY": KEY}


def _config(tmp_path: Path, params: str = "", info: str = "", settings: str = "") -> Path:
    text = (
        "model_list:\n"
        "  - model_name: m\n"
        "    litellm_params:\n"
        "      model: openai/m\n"
        "      api_base: http://127.0.0.1:9/v1\n"
        "      api_key: os.environ/CFG_KEY\n"
        f"{params}"
        f"{'    model_info:' + chr(10) + info if info else ''}"
        f"{'exo_remote_settings:' + chr(10) + settings if settings else ''}"
    )
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, ENV)
    message = str(caught.value)
    assert str(path) in message and KEY not in message, message
    return message


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            "  nodes:\n    node-a: {allowed_modles: ['open-*']}\n",
            "unknown key 'allowed_modles'; did you mean 'allowed_models'?",
        ),
        ("  nodes:\n    node-a: {max_concurent_streams: 2}\n", "did you mean 'max_concurrent_streams'?"),
        ("  default_modle: m\n", "unknown key 'default_modle'; did you mean 'default_model'?"),
        ("  node:\n    node-a: {allowed_models: ['m']}\n", "did you mean 'nodes'?"),
        ("  zzz: 1\n", "valid keys: default_model, nodes, fallbacks, num_retries"),
    ],
)
def test_unknown_settings_and_node_rule_keys_name_the_closest_valid_key(
    tmp_path: Path, settings: str, expected: str
) -> None:
    assert expected in _error(_config(tmp_path, settings=settings))


def test_spend_rule_keys_are_known_and_checked(tmp_path: Path) -> None:
    good = "  nodes:\n    node-a: {rpm: 60, tpm: 100000, max_budget: 12.5, budget_duration: 30d}\n"
    assert "node-a" in load_config(_config(tmp_path, settings=good), ENV).node_policies
    for bad, field in [
        ("{rpm: -1}", "rpm"),
        ("{tpm: .inf}", "tpm"),
        ("{max_budget: .nan}", "max_budget"),
        ("{max_budget: ten}", "max_budget"),
        ("{budget_duration: 30x}", "budget_duration"),
        ("{budget_duration: 0d}", "budget_duration"),
    ]:
        assert field in _error(_config(tmp_path, settings=f"  nodes:\n    node-a: {bad}\n")), bad


@pytest.mark.parametrize(
    ("info", "field"),
    [
        ("      max_input_tokens: .inf\n", "max_input_tokens"),
        ("      max_output_tokens: .nan\n", "max_output_tokens"),
        ("      max_tokens: -4096\n", "max_tokens"),
        ("      max_input_tokens: 0\n", "max_input_tokens"),
        ("      max_input_tokens: 8192.5\n", "max_input_tokens"),
        ("      input_cost_per_token: -.inf\n", "input_cost_per_token"),
        ("      supports_vision: maybe\n", "supports_vision"),
    ],
)
def test_model_info_numbers_are_checked(tmp_path: Path, info: str, field: str) -> None:
    assert f"model_info.{field}" in _error(_config(tmp_path, info=info))


@pytest.mark.parametrize(
    "api_base",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/v1",
        "gopher://127.0.0.1:70/",
        "unix:///tmp/s.sock",
        "http:///v1",
        "127.0.0.1:8080/v1",
    ],
)
def test_api_base_is_http_or_https_only(tmp_path: Path, api_base: str) -> None:
    path = _config(tmp_path)
    path.write_text(path.read_text().replace("http://127.0.0.1:9/v1", api_base))
    assert "api_base must be an http:// or https:// URL" in _error(path)
    alias_map = tmp_path / "map.json"
    alias_map.write_text(json.dumps({"m": {"model": "openai/m", "api_base": api_base}}))
    assert "api_base must be" in _error(alias_map)


@pytest.mark.parametrize("value", ["0", "-1", ".inf", ".nan", "soon"])
def test_timeouts_are_positive_numbers(tmp_path: Path, value: str) -> None:
    for key in ("timeout", "stream_timeout"):
        assert f"litellm_params.{key}" in _error(_config(tmp_path, params=f"      {key}: {value}\n"))


def test_settings_beside_a_json_alias_map_are_read_not_ignored(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(
        json.dumps(
            {
                "open-m": {"model": "openai/m", "api_base": "http://127.0.0.1:9/v1"},
                "closed-m": {"model": "openai/m", "api_base": "http://127.0.0.1:9/v1"},
                "exo_remote_settings": {"nodes": {"node-a": {"allowed_models": ["open-*"]}}},
            }
        )
    )
    policy = load_config(path, ENV).node_policies["node-a"]
    assert policy.allows("open-m") and not policy.allows("closed-m")
    path.write_text(
        json.dumps({"m": {"model": "openai/m"}, "exo_remote_settings": {"nodes": {"a": {"allowed_modles": []}}}})
    )
    assert "did you mean 'allowed_models'" in _error(path)


@pytest.mark.timeout(90)
def test_the_command_exits_2_on_inf_without_a_traceback(tmp_path: Path) -> None:
    path = _config(tmp_path, info="      max_input_tokens: .inf\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "exo_remote_engine.server",
            "--config",
            str(path),
            "--listen",
            "127.0.0.1:0",
            "--no-discover",
        ],
        cwd=REPO,
        env={**os.environ, **ENV, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "configuration error" in result.stderr and "model_info.max_input_tokens" in result.stderr
    assert "Traceback" not in result.stderr and KEY not in result.stderr


STALL_S = 4.0
STREAM_TIMEOUT_S = 0.5


@pytest.mark.timeout(60)
async def test_stream_timeout_ends_a_stalled_stream_on_both_transports(
    upstream: OpenAIUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    monkeypatch.setenv("CFG_KEY", KEY)
    upstream.scenarios["m"] = Scenario(chunks=["first", " second", " third"], interval_s=STALL_S)
    path = _config(tmp_path, params=f"      stream_timeout: {STREAM_TIMEOUT_S}\n")
    path.write_text(path.read_text().replace("http://127.0.0.1:9/v1", f"{upstream.url}/v1"))
    sidecar = await start_sidecar(SidecarSettings(listen="127.0.0.1:0", config_path=path))
    client = sidecar_client(sidecar.address, deadline_s=30)
    text: list[str] = []
    started = time.monotonic()
    try:
        with pytest.raises(RemoteError) as caught:
            async for event in client.generate(chat_request("m")):
                text.append(event.delta.text)
        elapsed = time.monotonic() - started
    finally:
        await client.close()
        await sidecar.stop(grace_s=None)
    assert caught.value.reason is Reason.PROVIDER_TIMEOUT, caught.value
    assert "".join(text) == "first", "what arrived before the stall was delivered"
    assert elapsed < STALL_S - 1, f"the stall ended after {elapsed:.1f}s, not after stream_timeout"
