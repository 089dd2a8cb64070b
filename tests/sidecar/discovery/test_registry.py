"""Discovery inside a running sidecar: a provider key added to the sidecar's env file
makes that provider's models ready within one refresh period, without a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.server import SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.discovery import PROVIDERS
from exo_remote_engine.sidecar.discovery.registry import read_env_file
from tests.conftest import PLANTED_KEY
from tests.support.harness import chat_request, drain, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.waits import eventually

REFRESH_S = 1.0


@pytest.fixture(autouse=True)
def no_real_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach a real provider with a developer's own keys."""
    for spec in PROVIDERS:
        for name in (*spec.key_envs, spec.base_env):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OLLAMA_API_BASE", "http://127.0.0.1:9")  # nothing listens there


def test_env_file_parsing(tmp_path: Path) -> None:
    path = tmp_path / "keys.env"
    path.write_text("# keys\nexport A=1\nB='two words'\nC=\"x=y\"\n\nbroken line\n")
    assert read_env_file(path) == {"A": "1", "B": "two words", "C": "x=y"}
    assert read_env_file(tmp_path / "missing.env") == {}


async def test_a_key_added_while_running_makes_models_ready(tmp_path: Path) -> None:
    async with OpenAIUpstream({"gpt-test-mini": Scenario(chunks=["found ", "me"])}) as upstream:
        env_file = tmp_path / "keys.env"
        env_file.write_text(f"OPENAI_API_BASE={upstream.url}/v1\n")
        sidecar = await start_sidecar(
            SidecarSettings(listen="127.0.0.1:0", discover=True, env_file=env_file, discovery_ttl_s=REFRESH_S)
        )
        client = sidecar_client(sidecar.address)
        try:
            before = {m.alias: m for m in (await client.list_models()).models}
            assert before["embedded-echo"].ready
            unready = [m for m in before.values() if m.provider == "openai"]
            assert unready and all(not m.ready for m in unready)
            assert {m.not_ready_reason for m in unready} == {"set OPENAI_API_KEY on the sidecar"}
            with pytest.raises(RemoteError) as caught:
                request = chat_request(unready[0].alias, "x", request_id="u")
                [_ async for _ in client.generate(request)]
            assert caught.value.reason is Reason.MODEL_NOT_READY
            assert "set OPENAI_API_KEY on the sidecar" in caught.value.message

            env_file.write_text(f"OPENAI_API_BASE={upstream.url}/v1\nOPENAI_API_KEY={PLANTED_KEY}\n")

            async def ready() -> pb.Model | None:
                listing = {m.alias: m for m in (await client.list_models()).models}
                found = listing.get("openai/gpt-test-mini")
                return found if found is not None and found.ready else None

            # A refresh every second rereads the file; a sidecar that never did stays unready.
            found = await eventually(ready, "the model is ready after a refresh", poll_s=0.2)
            assert found.source == pb.MODEL_SOURCE_DISCOVERED
            request = chat_request("openai/gpt-test-mini", "x", request_id="d")
            assert (await drain(client, request, catch=False)).text == "found me"
            sent = upstream.requests_for("gpt-test-mini")[-1]
            assert sent.headers["authorization"] == f"Bearer {PLANTED_KEY}", "the key from the env file was used"
            refreshed = await client.list_models(refresh=True)
            assert PLANTED_KEY not in str(refreshed)
        finally:
            await client.close()
            await sidecar.stop(grace_s=None)


async def test_configured_alias_wins_and_config_default_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with OpenAIUpstream({"shared": Scenario(chunks=["from config"])}) as upstream:
        monkeypatch.setenv("OPENAI_API_BASE", f"{upstream.url}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", PLANTED_KEY)
        config = tmp_path / "aliases.json"
        spec = {"model": "openai/shared", "api_base": f"{upstream.url}/v1", "api_key": "${OPENAI_API_KEY}"}
        config.write_text(
            json.dumps(
                {"models": {"openai/shared": spec, "mine": spec}, "exo_remote_settings": {"default_model": "mine"}}
            )
        )
        sidecar = await start_sidecar(SidecarSettings(listen="127.0.0.1:0", config_path=config, discover=True))
        client = sidecar_client(sidecar.address)
        try:
            listing = await client.list_models(refresh=True)
            aliases = [m.alias for m in listing.models]
            assert aliases.count("openai/shared") == 1, "no duplicates"
            shared = next(m for m in listing.models if m.alias == "openai/shared")
            assert shared.source == pb.MODEL_SOURCE_CONFIG, "the explicit config entry wins"
            assert listing.default_model == "mine"
        finally:
            await client.close()
            await sidecar.stop(grace_s=None)
