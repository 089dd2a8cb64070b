"""The sidecar's configuration: LiteLLM proxy config.yaml and the JSON alias map, every
startup error (named by file and entry), and the command's behaviour on a bad file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from exo_remote_engine.server import SidecarSettings, _parse_args, start_sidecar
from exo_remote_engine.sidecar.config.loader import (
    EMBEDDED_ALIAS,
    ConfigError,
    SidecarConfig,
    load_config,
)
from tests.support.unprivileged import call_unprivileged, reachable_dir

REPO = Path(__file__).resolve().parents[3]
KEY_ONE = "sk-one-SECRET-4f1c2a9e77d0"
KEY_TWO = "sk-ant-two-SECRET-0b9d3e15aa42"
PLANTED = "sk-planted-subprocess-SECRET-7e2f90c1d8"

PROXY_YAML = """\
# A LiteLLM proxy config, as LiteLLM's docs write it.
model_list:
  - model_name: gpt-fast
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:1/v1
      api_key: os.environ/CFG_TEST_KEY_ONE
      timeout: 30
      stream_timeout: 10
      max_retries: 2
      rpm: 100
      tpm: 100000
    model_info:
      id: gpt-fast-1
      mode: chat
      max_input_tokens: 128000
      max_output_tokens: 16384
      supports_function_calling: true
      supports_vision: false
      display_name: GPT fast
  - model_name: claude
    litellm_params:
      model: anthropic/claude-3-5-sonnet-20241022
      api_key: ${CFG_TEST_KEY_TWO}
    model_info:
      supports_function_calling: false
  - model_name: local
    litellm_params:
      model: ollama/llama3.2
      api_base: http://127.0.0.1:11434

litellm_settings:
  drop_params: true
  set_verbose: false
  num_retries: 3
  request_timeout: 600
router_settings:
  routing_strategy: simple-shuffle
  num_retries: 2
general_settings:
  master_key: sk-1234
  alerting: []
"""


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path, environ: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ if environ is not None else {})
    message = str(info.value)
    assert str(path) in message, f"the message must name the file: {message}"
    return message


def _model_list(*entries: str) -> str:
    return "model_list:\n" + "".join(entries)


def _yaml_entry(alias: str, model: str | None, **params: str) -> str:
    lines = [f"  - model_name: {alias}\n", "    litellm_params:\n"]
    if model is not None:
        lines.append(f"      model: {model}\n")
    lines += [f"      {k}: {v}\n" for k, v in params.items()]
    return "".join(lines)


# --- LiteLLM proxy config.yaml ----------------------------------------------------------


def test_litellm_proxy_config_works_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CFG_TEST_KEY_ONE", KEY_ONE)
    monkeypatch.setenv("CFG_TEST_KEY_TWO", KEY_TWO)
    path = _write(tmp_path, "config.yaml", PROXY_YAML)
    config = load_config(path)  # the process environment, as the command uses it

    assert config.path == path
    assert [m.alias for m in config.models] == ["gpt-fast", "claude", "local"]
    assert config.default_model == "gpt-fast", "no default_model: the first entry"
    gpt, claude, local = config.models
    assert (gpt.litellm_model, gpt.provider) == ("openai/gpt-4o-mini", "openai")
    assert gpt.params["api_base"] == "http://127.0.0.1:1/v1"
    assert gpt.params["api_key"] == KEY_ONE
    assert gpt.params["timeout"] == 30
    assert (claude.litellm_model, claude.provider) == (
        "anthropic/claude-3-5-sonnet-20241022",
        "anthropic",
    )
    assert claude.params["api_key"] == KEY_TWO
    assert "api_base" not in claude.params
    assert (local.litellm_model, local.provider) == ("ollama/llama3.2", "ollama")
    assert local.params["api_base"] == "http://127.0.0.1:11434"
    assert "model" not in gpt.params, "the model is litellm_model, not a leftover param"
    assert all(m.source == "config" for m in config.models)

    # model_info is read where it has a meaning for clients.
    assert gpt.context_window == 128000
    assert gpt.max_output_tokens == 16384
    assert gpt.supports_tools is True
    assert gpt.supports_images is False
    assert gpt.display_name == "GPT fast"
    assert claude.supports_tools is False
    assert claude.context_window is None, "unknown stays unknown"
    assert local.supports_tools is None

    assert {KEY_ONE, KEY_TWO} <= config.secrets
    assert "http://127.0.0.1:1/v1" not in config.secrets, "a base URL is not a secret"

    # Router keys are the router's, not the provider call's; the master key is a token.
    assert (gpt.rpm, gpt.tpm, gpt.deployment) == (100, 100000, "gpt-fast-1")
    assert "rpm" not in gpt.params and "tpm" not in gpt.params
    assert config.router.routing_strategy == "simple-shuffle"
    assert config.num_retries == 2
    assert config.master_key == "sk-1234" and "sk-1234" in config.secrets
    # Every key nothing acts on is named (one startup warning lists them).
    assert config.not_acted_on == (
        "litellm_settings.drop_params",
        "litellm_settings.set_verbose",
        "litellm_settings.request_timeout",
        "general_settings.alerting",
    )


def test_secrets_never_appear_in_reprs(tmp_path: Path) -> None:
    env = {"CFG_TEST_KEY_ONE": KEY_ONE, "CFG_TEST_KEY_TWO": KEY_TWO}
    config = load_config(_write(tmp_path, "config.yaml", PROXY_YAML), env)
    assert config.secrets >= {KEY_ONE, KEY_TWO}
    renderings = [repr(config), str(config), *(repr(m) for m in config.models)]
    renderings += [str(m) for m in config.models]
    for text in renderings:
        for secret in (KEY_ONE, KEY_TWO):
            assert secret not in text, f"secret leaked into {text}"
    assert "gpt-fast" in repr(config), "the repr still describes the config"


def test_default_model_in_proxy_config(tmp_path: Path) -> None:
    text = "exo_remote_settings:\n  default_model: second\n" + _model_list(
        _yaml_entry("first", "openai/a"), _yaml_entry("second", "openai/b")
    )
    config = load_config(_write(tmp_path, "c.yaml", text), {})
    assert config.default_model == "second"
    entry = config.get("second")
    assert entry is not None and entry.litellm_model == "openai/b"
    assert config.get("nope") is None


def test_json_alias_map(tmp_path: Path) -> None:
    spec = {
        "fast": {"model": "openai/x", "api_base": "http://127.0.0.1:1/v1", "api_key": "${CFG_V}"},
        "short": "anthropic/claude-3-haiku-20240307",
    }
    config = load_config(_write(tmp_path, "models.json", json.dumps(spec)), {"CFG_V": KEY_ONE})
    assert [m.alias for m in config.models] == ["fast", "short"]
    assert config.default_model == "fast"
    fast, short = config.models
    assert (fast.litellm_model, fast.provider) == ("openai/x", "openai")
    assert fast.params["api_base"] == "http://127.0.0.1:1/v1"
    assert fast.params["api_key"] == KEY_ONE
    assert short.litellm_model == "anthropic/claude-3-haiku-20240307"
    assert short.provider == "anthropic"
    assert KEY_ONE in config.secrets
    assert KEY_ONE not in repr(config) and KEY_ONE not in repr(fast)


def test_json_wrapped_form_honours_default_model(tmp_path: Path) -> None:
    spec = {
        "models": {
            "a": {"model": "openai/x", "api_base": "http://127.0.0.1:1/v1"},
            "b": {"model": "openai/y", "api_key": "os.environ/CFG_B"},
        },
        "exo_remote_settings": {"default_model": "b"},
    }
    config = load_config(_write(tmp_path, "models.json", json.dumps(spec)), {"CFG_B": KEY_TWO})
    assert [m.alias for m in config.models] == ["a", "b"]
    assert config.default_model == "b"
    assert config.models[1].params["api_key"] == KEY_TWO
    assert KEY_TWO in config.secrets


def test_bad_default_model_is_an_error(tmp_path: Path) -> None:
    spec = {"models": {"a": {"model": "openai/x"}}, "exo_remote_settings": {"default_model": "zz"}}
    message = _error(_write(tmp_path, "models.json", json.dumps(spec)))
    assert "'zz'" in message and "default_model" in message


def test_bad_default_model_in_yaml_is_an_error(tmp_path: Path) -> None:
    text = "exo_remote_settings:\n  default_model: ghost\n"
    text += _model_list(_yaml_entry("a", "openai/a"))
    message = _error(_write(tmp_path, "c.yaml", text))
    assert "'ghost'" in message


# --- errors: each names the file and the entry ------------------------------------------


@pytest.mark.parametrize(
    ("value", "syntax_hint"),
    [("os.environ/CFG_MISSING_VAR", "os.environ"), ("${CFG_MISSING_VAR}", "dollar")],
)
def test_missing_env_var_in_yaml(tmp_path: Path, value: str, syntax_hint: str) -> None:
    text = _model_list(
        _yaml_entry("ok", "openai/a", api_key="os.environ/CFG_PRESENT"),
        _yaml_entry("needs-key", "openai/b", api_key=value),
    )
    message = _error(_write(tmp_path, f"{syntax_hint}.yaml", text), {"CFG_PRESENT": PLANTED})
    assert "model_list[1]" in message and "'needs-key'" in message
    assert "CFG_MISSING_VAR" in message and "api_key" in message
    assert PLANTED not in message


@pytest.mark.parametrize("value", ["os.environ/CFG_MISSING_VAR", "${CFG_MISSING_VAR}"])
def test_missing_env_var_in_json(tmp_path: Path, value: str) -> None:
    spec = {"needs-key": {"model": "openai/x", "api_key": value}}
    message = _error(_write(tmp_path, "models.json", json.dumps(spec)))
    assert "'needs-key'" in message and "CFG_MISSING_VAR" in message


def test_env_var_set_but_empty_is_not_missing(tmp_path: Path) -> None:
    text = _model_list(_yaml_entry("a", "openai/a", api_key="os.environ/CFG_EMPTY"))
    config = load_config(_write(tmp_path, "c.yaml", text), {"CFG_EMPTY": ""})
    assert config.models[0].params["api_key"] == ""
    assert "" not in config.secrets, "an empty string would redact everything"


@pytest.mark.parametrize("model", ["notaprovider/foo", "totally-unknown-model-xyz"])
def test_unknown_provider_in_yaml(tmp_path: Path, model: str) -> None:
    text = _model_list(_yaml_entry("good", "openai/a"), _yaml_entry("mystery", model))
    message = _error(_write(tmp_path, "c.yaml", text))
    assert "model_list[1]" in message and "'mystery'" in message
    assert model in message and "provider" in message


@pytest.mark.parametrize("model", ["notaprovider/foo", "totally-unknown-model-xyz"])
def test_unknown_provider_in_json(tmp_path: Path, model: str) -> None:
    message = _error(_write(tmp_path, "m.json", json.dumps({"mystery": {"model": model}})))
    assert "'mystery'" in message and model in message


def test_malformed_yaml(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, "c.yaml", "model_list: [\n  - oops\n"))
    assert "YAML" in message
    assert "line 2" in message, f"the message points at the line: {message}"


def test_malformed_json(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, "m.json", '{\n  "a": {"model": "openai/x",}\n}'))
    assert "JSON" in message and "line 2" in message


def test_duplicate_model_name_forms_a_deployment_group(tmp_path: Path) -> None:
    text = _model_list(
        _yaml_entry("twin", "openai/a", api_base="http://127.0.0.1:1/v1", rpm="3", weight="2"),
        _yaml_entry("other", "openai/c"),
        _yaml_entry("twin", "openai/b", api_base="http://127.0.0.1:2/v1"),
    )
    config = load_config(_write(tmp_path, "c.yaml", text), {})
    assert [m.alias for m in config.models] == ["twin", "other"], "one alias per group"
    twin = config.models[0]
    members = config.deployments(twin)
    assert [(d.deployment, d.litellm_model, d.rpm, d.weight) for d in members] == [
        ("twin#1", "openai/a", 3, 2.0),
        ("twin#2", "openai/b", None, None),
    ]
    assert config.deployments(config.models[1]) == (config.models[1],)


def test_deployment_ids_must_be_unique(tmp_path: Path) -> None:
    text = (
        _model_list(_yaml_entry("a", "openai/a"), _yaml_entry("a", "openai/b"))
        .replace("      model: openai/a\n", "      model: openai/a\n    model_info:\n      id: same\n")
        .replace("      model: openai/b\n", "      model: openai/b\n    model_info:\n      id: same\n")
    )
    assert "'same' names two deployments" in _error(_write(tmp_path, "c.yaml", text))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("router_settings:\n  routing_strategy: cost-based-routing\n", "routing_strategy 'cost-based-routing'"),
        ("router_settings:\n  allowed_fails: -1\n", "allowed_fails"),
        ("router_settings:\n  cooldown_time: soon\n", "cooldown_time"),
        ("general_settings:\n  master_key: ''\n", "master_key"),
        ("exo_remote_settings:\n  nodes:\n    n1: {rpm: 0}\n", "nodes.n1: rpm"),
        ("exo_remote_settings:\n  nodes:\n    n1: {max_budget: -2}\n", "max_budget"),
        ("exo_remote_settings:\n  nodes:\n    n1: {max_budget: 1, budget_duration: 3x}\n", "budget_duration"),
        ("exo_remote_settings:\n  nodes:\n    n1: {budget_duration: 1d}\n", "needs max_budget"),
        ("exo_remote_settings:\n  nodes:\n    n1: {allow_unpriced: true}\n", "allow_unpriced needs max_budget"),
        ("exo_remote_settings:\n  nodes:\n    n1: {max_budget: 1, allow_unpriced: yes please}\n", "true or false"),
    ],
)
def test_bad_traffic_settings_are_errors(tmp_path: Path, extra: str, expected: str) -> None:
    text = _model_list(_yaml_entry("a", "openai/a")) + extra
    assert expected in _error(_write(tmp_path, "c.yaml", text))


def test_node_quotas_and_durations(tmp_path: Path) -> None:
    text = _model_list(_yaml_entry("a", "openai/a")) + (
        "exo_remote_settings:\n  nodes:\n    n1: {rpm: 3, tpm: 100, max_budget: 0.5, budget_duration: 30d}\n"
    )
    quota = load_config(_write(tmp_path, "c.yaml", text), {}).node_quotas["n1"]
    assert (quota.rpm, quota.tpm, quota.max_budget, quota.budget_duration_s) == (3, 100, 0.5, 30 * 86400)
    assert quota.allow_unpriced is False, "unpriced models are refused to a budget unless allowed"
    allowed = text.replace("budget_duration: 30d}", "budget_duration: 30d, allow_unpriced: true}")
    assert load_config(_write(tmp_path, "d.yaml", allowed), {}).node_quotas["n1"].allow_unpriced is True


def test_duplicate_key_in_yaml_mapping(tmp_path: Path) -> None:
    text = "model_list:\n  - model_name: a\n    model_name: b\n    litellm_params:\n      model: openai/a\n"
    message = _error(_write(tmp_path, "c.yaml", text))
    assert "duplicate key 'model_name'" in message and "line 3" in message


def test_duplicate_key_in_json(tmp_path: Path) -> None:
    text = '{"twin": {"model": "openai/x"}, "twin": {"model": "openai/y"}}'
    message = _error(_write(tmp_path, "m.json", text))
    assert "duplicate" in message and "'twin'" in message


def test_missing_litellm_params_model(tmp_path: Path) -> None:
    text = _model_list(
        _yaml_entry("good", "openai/a"),
        _yaml_entry("modelless", None, api_base="http://127.0.0.1:1"),
    )
    message = _error(_write(tmp_path, "c.yaml", text))
    assert "model_list[1]" in message and "'modelless'" in message
    assert "litellm_params.model" in message


def test_missing_litellm_params_entirely(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, "c.yaml", "model_list:\n  - model_name: bare\n"))
    assert "model_list[0]" in message and "'bare'" in message


def test_missing_model_name(tmp_path: Path) -> None:
    text = _model_list(_yaml_entry("good", "openai/a"))
    text += "  - litellm_params:\n      model: openai/b\n"
    message = _error(_write(tmp_path, "c.yaml", text))
    assert "model_list[1]" in message and "model_name" in message


def test_json_entry_without_model(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, "m.json", json.dumps({"nomodel": {"api_base": "http://x"}})))
    assert "'nomodel'" in message and "model" in message


@pytest.mark.parametrize(
    ("text", "expected"), [("model_list: []\n", "no models configured"), ("model_list:\n", "model_list must be a list")]
)
def test_empty_model_list(tmp_path: Path, text: str, expected: str) -> None:
    message = _error(_write(tmp_path, "c.yaml", text))
    assert message.endswith(f"c.yaml: {expected}"), message


def test_empty_json_alias_map(tmp_path: Path) -> None:
    assert "no models" in _error(_write(tmp_path, "m.json", "{}"))


def test_not_a_mapping(tmp_path: Path) -> None:
    assert "mapping" in _error(_write(tmp_path, "c.yaml", "- just\n- a list\n"))


def test_model_info_must_be_a_mapping(tmp_path: Path) -> None:
    text = _model_list(_yaml_entry("a", "openai/a")) + "    model_info: 5\n"
    message = _error(_write(tmp_path, "c.yaml", text))
    assert "model_list[0]" in message and "model_info" in message


def test_settings_must_be_a_mapping(tmp_path: Path) -> None:
    text = "exo_remote_settings: [x]\n" + _model_list(_yaml_entry("a", "openai/a"))
    assert "exo_remote_settings" in _error(_write(tmp_path, "c.yaml", text))


def test_missing_file(tmp_path: Path) -> None:
    message = _error(tmp_path / "does-not-exist.yaml")
    assert "cannot read" in message


def test_unreadable_file_a_directory(tmp_path: Path) -> None:
    directory = tmp_path / "config.yaml"
    directory.mkdir()
    assert "cannot read" in _error(directory)


def test_unreadable_file_not_utf8(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.yaml", b"model_list:\n  - model_name: \xff\xfe\n")
    assert "UTF-8" in _error(path)


def test_unreadable_file_permissions() -> None:
    """Root reads any file, so the reader is ``nobody`` when the suite runs as root (as CI
    does): first the readable file loads, then mode 000 gives a clear error naming it."""

    def load(path: Path) -> str:
        try:
            return f"loaded {[m.alias for m in load_config(path, {}).models]}"
        except ConfigError as error:
            return f"ConfigError: {error}"

    with reachable_dir() as directory:
        path = _write(directory, "c.yaml", _model_list(_yaml_entry("a", "openai/a")))
        path.chmod(0o644)
        assert load(path) == "loaded ['a']"  # here first: the child cannot import from root's home
        assert call_unprivileged(lambda: load(path)) == "loaded ['a']"
        path.chmod(0)
        message = call_unprivileged(lambda: load(path))
    assert message.startswith("ConfigError: ") and "cannot read" in message and str(path) in message, message


# --- the command ------------------------------------------------------------------------


def _run_sidecar(config: Path, extra_env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFG_")}
    env.pop("EXO_REMOTE_CONFIG", None)
    env.update(extra_env)
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "exo_remote_engine.server",
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("name", "entries", "expected"),
    [
        (
            "missing-env.yaml",
            [
                _yaml_entry("holder", "openai/a", api_key="os.environ/CFG_PLANTED"),
                _yaml_entry("orphan", "openai/b", api_key="os.environ/CFG_NOT_SET_ANYWHERE"),
            ],
            ["model_list[1]", "'orphan'", "CFG_NOT_SET_ANYWHERE"],
        ),
    ],
)
def test_command_exits_2_naming_file_and_entry_without_secrets(
    tmp_path: Path, name: str, entries: list[str], expected: list[str]
) -> None:
    config = _write(tmp_path, name, _model_list(*entries))
    result = _run_sidecar(config, {"CFG_PLANTED": PLANTED})
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "configuration error" in result.stderr
    assert str(config) in result.stderr
    for fragment in expected:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert PLANTED not in result.stderr
    assert PLANTED not in result.stdout
    assert "listening" not in result.stdout


# --- no config --------------------------------------------------------------------------


def test_no_config_is_the_embedded_model_alone() -> None:
    config = load_config(None, {"OPENAI_API_KEY": PLANTED})
    assert isinstance(config, SidecarConfig)
    assert [m.alias for m in config.models] == [EMBEDDED_ALIAS] == ["embedded-echo"]
    assert config.default_model == "embedded-echo"
    (entry,) = config.models
    assert entry.source == "embedded" and entry.provider == "embedded"
    assert dict(entry.params) == {}
    assert config.secrets == frozenset()
    assert config.path is None


async def test_no_config_serves_only_the_embedded_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXO_REMOTE_CONFIG", raising=False)
    assert _parse_args(["--listen", "127.0.0.1:0"]).config is None
    running = await start_sidecar(SidecarSettings(listen="127.0.0.1:0"))
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub: Any = pb_grpc.RemoteInferenceServiceStub(channel)
            reply = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
    finally:
        await running.stop(grace_s=None)
    assert [m.alias for m in reply.models] == ["embedded-echo"]
    assert reply.default_model == "embedded-echo"
    assert reply.models[0].source == pb.MODEL_SOURCE_EMBEDDED
    assert reply.models[0].ready
