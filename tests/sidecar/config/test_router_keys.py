"""The keys of issue #24 in a config: first-token guard, queueing, cache prices. Each is
read where LiteLLM (or our settings) puts it, and every bad value is a startup error that
names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from exo_remote_engine.sidecar.config.loader import ConfigError, load_config

BASE = """\
model_list:
  - model_name: g
    litellm_params: {model: openai/a, api_base: http://127.0.0.1:9/v1, api_key: k, ttft_timeout: 1.5}
  - model_name: g
    litellm_params: {model: openai/b, api_base: http://127.0.0.1:9/v1, api_key: k,
                     cache_read_input_token_cost: 0.0000001}
    model_info: {cache_creation_input_token_cost: 0.000002}
"""


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path)


def test_the_keys_are_read_and_kept_out_of_the_provider_call(tmp_path: Path) -> None:
    text = BASE + "router_settings: {ttft_timeout: 2, hedge_after: 0.5}\n"
    text += "exo_remote_settings:\n  queue_timeout: 90\n  nodes:\n    n1: {queue_timeout: 10, priority: 3}\n"
    config = _load(tmp_path, text)
    a, b = config.groups["g"]  # type: ignore[attr-defined]
    assert (config.router.ttft_timeout_s, config.router.hedge_after_s) == (2.0, 0.5)  # type: ignore[attr-defined]
    assert a.ttft_timeout_s == 1.5 and "ttft_timeout" not in a.params
    assert b.cache_read_input_token_cost == 1e-7 and b.cache_creation_input_token_cost == 2e-6
    assert "cache_read_input_token_cost" not in b.params
    assert config.queue_timeout_s == 90.0  # type: ignore[attr-defined]
    rules = config.node_policies["n1"]  # type: ignore[attr-defined]
    assert (rules.queue_timeout_s, rules.priority) == (10.0, 3)
    assert not [w for w in config.not_acted_on if "ttft" in w or "hedge" in w]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("router_settings: {ttft_timeout: 0}\n", "router_settings.ttft_timeout must be a positive number"),
        ("router_settings: {hedge_after: -1}\n", "router_settings.hedge_after must be a positive number"),
        ("router_settings: {ttft_timeout: .inf}\n", "router_settings.ttft_timeout must be a positive number"),
        ("exo_remote_settings: {queue_timeout: x}\n", "queue_timeout must be a non-negative number"),
        ("exo_remote_settings: {nodes: {n1: {priority: 1.5}}}\n", "priority must be an integer"),
        ("exo_remote_settings: {nodes: {n1: {queue_timeout: -2}}}\n", "n1.queue_timeout must be a non-negative"),
    ],
)
def test_bad_values_stop_startup_naming_the_key(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _load(tmp_path, BASE + extra)


def test_a_bad_deployment_guard_names_its_entry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"litellm_params\.ttft_timeout must be a positive number"):
        _load(tmp_path, BASE.replace("ttft_timeout: 1.5", "ttft_timeout: soon"))
