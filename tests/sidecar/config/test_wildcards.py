"""LiteLLM's wildcard entries (``model_name: "*"``, ``openai/*``) are refused at start with a
clear error. LiteLLM's proxy routes any id to them; the sidecar serves only ids it can list,
check and bill, and used to take ``*`` as a model literally named ``*``, listed ready, that
failed every request with PROVIDER_UNAVAILABLE (the cause only in its log)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exo_remote_engine.sidecar.config.loader import ConfigError, load_config
from tests.support.processes import REPO

PLANTED = "sk-wildcard-planted-0123456789"


def _yaml(path: Path, model_name: str, model: str) -> Path:
    path.write_text(
        "model_list:\n"
        f'  - model_name: "{model_name}"\n'
        "    litellm_params:\n"
        f'      model: "{model}"\n'
        "      api_key: os.environ/WILDCARD_KEY\n"
        '  - model_name: "gpt-4o-mini"\n'
        "    litellm_params:\n"
        "      model: openai/gpt-4o-mini\n"
        "      api_key: os.environ/WILDCARD_KEY\n"
    )
    return path


@pytest.mark.parametrize(
    ("model_name", "model"),
    [("*", "*"), ("openai/*", "openai/*"), ("gpt-*", "openai/gpt-*"), ("everything", "openai/*")],
)
def test_a_wildcard_entry_is_refused_naming_the_entry_and_the_fix(tmp_path: Path, model_name: str, model: str) -> None:
    config = _yaml(tmp_path / "config.yaml", model_name, model)
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={"WILDCARD_KEY": PLANTED})
    message = str(caught.value)
    assert "model_list[0]" in message and "wildcard entries" in message and "not supported" in message
    assert "one entry per model" in message and "discovery" in message
    assert PLANTED not in message


def test_the_json_alias_map_refuses_a_wildcard_too(tmp_path: Path) -> None:
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"anything": {"model": "anthropic/*"}}))
    with pytest.raises(ConfigError, match="wildcard entries"):
        load_config(config, environ={})


def test_named_entries_are_untouched(tmp_path: Path) -> None:
    config = _yaml(tmp_path / "config.yaml", "gpt-4o", "openai/gpt-4o")
    assert [e.alias for e in load_config(config, environ={"WILDCARD_KEY": PLANTED}).models] == ["gpt-4o", "gpt-4o-mini"]


@pytest.mark.timeout(90)
def test_the_sidecar_refuses_to_start_and_says_why(tmp_path: Path) -> None:
    config = _yaml(tmp_path / "config.yaml", "*", "*")
    env = {k: v for k, v in os.environ.items() if k != "EXO_REMOTE_CONFIG"}
    env.update({"WILDCARD_KEY": PLANTED, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(REPO)})
    result = subprocess.run(
        [sys.executable, "-m", "exo_remote_engine.server", "--config", str(config), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=80, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "wildcard entries (model_name '*', model '*') are not supported" in result.stderr
    assert "listening" not in result.stdout and "Traceback" not in result.stderr
    assert PLANTED not in result.stderr + result.stdout
