"""Dynamic model discovery against real HTTP servers on 127.0.0.1.

Every provider and local server kind is a real ``aiohttp.web`` server answering in that
service's own listing shape (tests/support/provider_listings.py documents each shape and
where it comes from). Discovery is driven only through its public API: ``ModelDiscovery``
with an ``environ`` mapping that points every ``<PROVIDER>_API_BASE`` at 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
import pytest

from exo_remote_engine.sidecar.config.loader import ModelEntry, embedded_entry
from exo_remote_engine.sidecar.discovery import (
    PROVIDERS,
    DiscoveredModel,
    ModelDiscovery,
    ServerSpec,
    SourceStatus,
    choose_default,
    is_chat_model,
    known_chat_models,
    merge,
)
from tests.conftest import PLANTED_KEY
from tests.support.clock import FakeClock
from tests.support.provider_listings import ListingServer, env_base
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(30)
# A discovery blocked by a server that never answers would wait until the test's timeout;
# one bounded by its per-source timeout (1-3 s here) ends well inside this, however busy the box.
HANG_BOUND_S = 15.0

HOSTED = [p.name for p in PROVIDERS]
SPEC = {p.name: p for p in PROVIDERS}
KEY_ENV = {p.name: p.key_envs[0] for p in PROVIDERS}
LOCAL = ["ollama", "llamacpp", "vllm", "lmstudio", "openai_compatible"]
VLLM_KEY = "vllm-test-key-5e0c"
_DATED = r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$"


def key_for(provider: str) -> str:
    return f"sk-test-{provider}-0123456789"


def from_map(key: str) -> dict[str, Any]:
    """What LiteLLM's bundled map says, as ModelEntry fields (None where it says nothing)."""
    info = litellm.model_cost[key]
    return {
        "context_window": info.get("max_input_tokens"),
        "max_output_tokens": info.get("max_output_tokens"),
        "supports_tools": info.get("supports_function_calling"),
        "supports_images": info.get("supports_vision"),
    }


UNKNOWN = {"context_window": None, "max_output_tokens": None, "supports_tools": None, "supports_images": None}


def meta(model: DiscoveredModel) -> dict[str, Any]:
    e = model.entry
    return {
        "context_window": e.context_window,
        "max_output_tokens": e.max_output_tokens,
        "supports_tools": e.supports_tools,
        "supports_images": e.supports_images,
    }


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Fleet:
    """Every provider and server kind, each on its own port, and the sidecar's environment."""

    servers: dict[str, ListingServer]
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in HOSTED:
            self.env[KEY_ENV[name]] = key_for(name)
            self.env[SPEC[name].base_env] = env_base(self.servers[name])

    def server_specs(self) -> list[ServerSpec | tuple[str, str, str | None]]:
        s = self.servers
        return [
            ("ollama", env_base(s["ollama"]), None),
            ("llamacpp", env_base(s["llamacpp"]) + "/v1", None),
            ("vllm", env_base(s["vllm"]), VLLM_KEY),
            ("lmstudio", env_base(s["lmstudio"]), None),
            ServerSpec("openai", env_base(s["openai_compatible"]) + "/v1", None, name="house"),
        ]

    def discovery(self, **kwargs: Any) -> ModelDiscovery:
        kwargs.setdefault("servers", self.server_specs())
        kwargs.setdefault("default_ollama", None)  # never probe a real local Ollama here
        kwargs.setdefault("timeout", 1.0)
        return ModelDiscovery(environ=lambda: self.env, **kwargs)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        for kind in HOSTED + LOCAL:
            key = key_for(kind) if kind in HOSTED else VLLM_KEY if kind == "vllm" else None
            servers[kind] = await stack.enter_async_context(ListingServer(kind, key=key))
        yield Fleet(servers)


def by_prefix(models: Iterable[DiscoveredModel], prefix: str) -> dict[str, DiscoveredModel]:
    return {m.alias: m for m in models if m.alias.split("/", 1)[0] == prefix}


def status_of(discovery: ModelDiscovery, source: str) -> SourceStatus:
    return next(s for s in discovery.statuses if s.source == source)


# ---------------------------------------------------------------------------------------
# Listings: only chat models, with the right metadata
# ---------------------------------------------------------------------------------------

EXPECTED_READY: dict[str, dict[str, dict[str, Any]]] = {
    "openai": {
        "openai/gpt-4o-mini": from_map("gpt-4o-mini"),
        "openai/gpt-zz-unmapped": UNKNOWN,
    },
    "anthropic": {
        "anthropic/claude-haiku-4-5": {
            "context_window": 200000,
            "max_output_tokens": 64000,
            "supports_images": True,
            "supports_tools": from_map("claude-haiku-4-5")["supports_tools"],
        },
        "anthropic/claude-sonnet-4-5": {
            "context_window": 1000000,
            "max_output_tokens": 64000,
            "supports_images": True,
            "supports_tools": from_map("claude-sonnet-4-5")["supports_tools"],
        },
        "anthropic/claude-opus-4-5": from_map("claude-opus-4-5"),
        "anthropic/claude-zz-unmapped": UNKNOWN,
        "anthropic/claude-zz-text-only": {
            "context_window": 100000,
            "max_output_tokens": 8000,
            "supports_images": False,
            "supports_tools": None,
        },
    },
    "gemini": {
        "gemini/gemini-2.5-flash": {
            **from_map("gemini/gemini-2.5-flash"),
            "context_window": 1048576,
            "max_output_tokens": 65536,
        },
        "gemini/gemini-2.5-pro": from_map("gemini/gemini-2.5-pro") | {"context_window": 1048576},
        "gemini/gemini-zz-unmapped": UNKNOWN | {"context_window": 32768, "max_output_tokens": 8192},
    },
    "mistral": {
        # the listing's 131072 wins over the map's value; output limit only from the map
        "mistral/mistral-small-latest": {
            "context_window": 131072,
            "supports_tools": True,
            "supports_images": True,
            "max_output_tokens": from_map("mistral/mistral-small-latest")["max_output_tokens"],
        },
        "mistral/open-zz-unmapped": {
            "context_window": 32768,
            "max_output_tokens": None,
            "supports_tools": False,
            "supports_images": False,
        },
    },
    "groq": {
        "groq/openai/gpt-oss-20b": from_map("groq/openai/gpt-oss-20b")
        | {
            "context_window": 131072,
            "max_output_tokens": 65536,
        },
        "groq/zz-unmapped-70b": UNKNOWN | {"context_window": 8192, "max_output_tokens": 4096},
    },
    "openrouter": {
        "openrouter/openai/gpt-4o-mini": {
            "context_window": 128000,
            "max_output_tokens": 16384,
            "supports_tools": True,
            "supports_images": True,
        },
        "openrouter/zz/unmapped-7b-instruct": {
            "context_window": 32768,
            "max_output_tokens": None,
            "supports_tools": False,
            "supports_images": False,
        },
    },
    "together_ai": {
        "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo": from_map(
            "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo"
        )
        | {"context_window": 131072},
        "together_ai/zz-org/Unmapped-Chat-8B": UNKNOWN,
    },
    "deepseek": {
        "deepseek/deepseek-chat": from_map("deepseek/deepseek-chat"),
        "deepseek/deepseek-reasoner": from_map("deepseek/deepseek-reasoner"),
    },
    "xai": {
        "xai/grok-4.3": from_map("xai/grok-4.3"),
        "xai/grok-zz-unmapped": UNKNOWN,
    },
    "ollama": {
        "ollama/llama3.2": {
            "context_window": 131072,
            "max_output_tokens": None,
            "supports_tools": True,
            "supports_images": False,
        },
        # the Modelfile's num_ctx is what the server runs with
        "ollama/llava:7b": {
            "context_window": 8192,
            "max_output_tokens": None,
            "supports_tools": False,
            "supports_images": True,
        },
    },
    "llamacpp": {
        # runtime n_ctx (4096) rather than n_ctx_train; tools from /props chat_template_caps
        "llamacpp/gemma-3-270m": {
            "context_window": 4096,
            "max_output_tokens": None,
            "supports_tools": True,
            "supports_images": False,
        },
    },
    "vllm": {"vllm/meta-llama/Llama-3.1-8B-Instruct": UNKNOWN | {"context_window": 8192}},
    "lmstudio": {
        "lmstudio/qwen2.5-7b-instruct": {
            "context_window": 32768,
            "max_output_tokens": None,
            "supports_tools": True,
            "supports_images": False,
        },
        "lmstudio/qwen2-vl-2b-instruct": {
            "context_window": 32768,
            "max_output_tokens": None,
            "supports_tools": None,
            "supports_images": True,
        },
    },
    "house": {"house/house-chat-v2": UNKNOWN},
}


async def test_every_listing_yields_only_its_chat_models_with_metadata(fleet: Fleet) -> None:
    discovery = fleet.discovery()
    models = await discovery.snapshot()
    assert all(s.ok for s in discovery.statuses), [s for s in discovery.statuses if not s.ok]
    for prefix, expected in EXPECTED_READY.items():
        found = by_prefix(models, prefix)
        assert sorted(found) == sorted(expected), prefix
        for alias, fields in expected.items():
            model = found[alias]
            assert model.ready and model.not_ready_reason == "", alias
            assert model.entry.source == "discovered"
            assert meta(model) == fields, alias
    assert len(models) == sum(len(v) for v in EXPECTED_READY.values())  # nothing else slipped in

    # Pagination was followed: 5 Anthropic models at 2 a page, 7 Gemini models at 2 a page.
    assert fleet.servers["anthropic"].hits == 3
    assert fleet.servers["gemini"].hits == 4

    # What LiteLLM needs to call each model: model string, the key from environ, api_base.
    for name in HOSTED:
        for model in by_prefix(models, name).values():
            assert model.entry.litellm_model == model.alias and model.entry.provider == name
            assert model.entry.params["api_key"] == key_for(name)
    s = fleet.servers
    anthropic = by_prefix(models, "anthropic")["anthropic/claude-haiku-4-5"]
    assert anthropic.entry.params["api_base"] == s["anthropic"].url
    assert anthropic.entry.display_name == "Claude Haiku 4.5"
    assert by_prefix(models, "openai")["openai/gpt-4o-mini"].entry.params["api_base"] == s["openai"].url + "/v1"
    assert by_prefix(models, "gemini")["gemini/gemini-2.5-flash"].entry.params["api_base"] == (
        s["gemini"].url + "/v1beta"
    )
    ollama = by_prefix(models, "ollama")["ollama/llama3.2"]
    assert (ollama.entry.litellm_model, ollama.entry.provider) == ("ollama_chat/llama3.2:latest", "ollama")
    assert ollama.entry.params == {"api_base": s["ollama"].url}
    vllm = by_prefix(models, "vllm")["vllm/meta-llama/Llama-3.1-8B-Instruct"]
    assert vllm.entry.litellm_model == "hosted_vllm/meta-llama/Llama-3.1-8B-Instruct"
    assert vllm.entry.params == {"api_base": s["vllm"].url + "/v1", "api_key": VLLM_KEY}
    lmstudio = by_prefix(models, "lmstudio")["lmstudio/qwen2.5-7b-instruct"]
    assert lmstudio.entry.litellm_model == "lm_studio/qwen2.5-7b-instruct"
    assert lmstudio.entry.params == {"api_base": s["lmstudio"].url + "/v1"}
    house = by_prefix(models, "house")["house/house-chat-v2"]
    assert (house.entry.litellm_model, house.entry.params) == (
        "openai/house-chat-v2",
        {"api_base": s["openai_compatible"].url + "/v1"},
    )
    llamacpp = by_prefix(models, "llamacpp")["llamacpp/gemma-3-270m"]
    assert llamacpp.entry.litellm_model == "openai/gemma-3-270m"

    # Costs from the listing where it has them (OpenRouter per token, Together per million).
    router = by_prefix(models, "openrouter")["openrouter/zz/unmapped-7b-instruct"]
    assert (router.input_cost_per_token, router.output_cost_per_token) == (3e-08, 5e-08)
    together = by_prefix(models, "together_ai")["together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo"]
    assert together.input_cost_per_token == pytest.approx(0.88e-6)


# ---------------------------------------------------------------------------------------
# Failures: reasons a person can act on; the others unaffected
# ---------------------------------------------------------------------------------------

FAILING_HOSTED = ["openai", "anthropic", "gemini", "together_ai"]  # bearer, x-api-key, goog, array
FAILING_LOCAL = ["ollama", "vllm", "lmstudio"]
HEALTHY = ["mistral", "groq", "openrouter", "deepseek", "xai", "llamacpp", "house"]
LOCAL_SOURCE = {"ollama": "ollama", "vllm": "vllm", "lmstudio": "lmstudio"}


def hosted_reason(mode: str, fleet: Fleet, name: str) -> str:
    shown = {
        "anthropic": fleet.servers["anthropic"].url,
        "gemini": fleet.servers["gemini"].url + "/v1beta",
    }.get(name, env_base(fleet.servers[name]))
    return {
        "401": f"the sidecar's {KEY_ENV[name]} was rejected (HTTP 401)",
        "403": f"the sidecar's {KEY_ENV[name]} was rejected (HTTP 403)",
        "500": f"server at {shown} answered HTTP 500 to the model listing",
        "malformed": f"server at {shown} returned a malformed model list",
        "badshape": f"server at {shown} returned a malformed model list",
        "hang": f"server at {shown} did not answer within 1s",
    }[mode]


def local_reason(mode: str, fleet: Fleet, kind: str) -> str:
    shown = fleet.servers[kind].url
    auth = (
        f"server at {shown} rejected the sidecar's API key"
        if kind == "vllm"
        else f"server at {shown} requires an API key"
    )
    return {
        "401": f"{auth} (HTTP 401)",
        "403": f"{auth} (HTTP 403)",
        "500": f"server at {shown} answered HTTP 500 to the model listing",
        "malformed": f"server at {shown} returned a malformed model list",
        "badshape": f"server at {shown} returned a malformed model list",
        "hang": f"server at {shown} did not answer within 1s",
    }[mode]


@pytest.mark.parametrize("mode", ["401", "403", "500", "malformed", "badshape", "hang"])
async def test_failures_give_actionable_reasons_and_leave_others_alone(fleet: Fleet, mode: str) -> None:
    for name in FAILING_HOSTED + FAILING_LOCAL:
        fleet.servers[name].mode = mode
    discovery = fleet.discovery()
    # "hang" never answers: the 1 s timeout, not the server, ends it (wide bound for a busy box)
    models = await asyncio.wait_for(discovery.snapshot(), HANG_BOUND_S)

    for name in FAILING_HOSTED:
        found = by_prefix(models, name)
        # no earlier good listing: the provider's chat models LiteLLM knows, not ready
        assert sorted(found) == sorted(f"{name}/{m.id}" for m in known_chat_models(name)), name
        assert found and not any(m.ready for m in found.values())
        assert {m.not_ready_reason for m in found.values()} == {hosted_reason(mode, fleet, name)}
        assert status_of(discovery, name).reason == hosted_reason(mode, fleet, name)
    for kind in FAILING_LOCAL:
        assert by_prefix(models, kind) == {}  # a server's models are unknown until it answers once
        status = status_of(discovery, LOCAL_SOURCE[kind])
        assert (status.ok, status.reason) == (False, local_reason(mode, fleet, kind))
    for prefix in HEALTHY:
        found = by_prefix(models, prefix)
        assert sorted(found) == sorted(EXPECTED_READY[prefix]) and all(m.ready for m in found.values())


async def test_unreachable_servers(fleet: Fleet) -> None:
    port = closed_port()
    fleet.env["XAI_API_BASE"] = f"http://127.0.0.1:{port}/v1"
    discovery = fleet.discovery(servers=[("vllm", f"http://127.0.0.1:{port}", None)])
    models = await discovery.snapshot()
    xai = by_prefix(models, "xai")
    assert xai and not any(m.ready for m in xai.values())
    assert {m.not_ready_reason for m in xai.values()} == {f"server at http://127.0.0.1:{port}/v1 unreachable"}
    assert by_prefix(models, "vllm") == {}
    assert status_of(discovery, "vllm").reason == f"server at http://127.0.0.1:{port} unreachable"
    assert all(m.ready for m in by_prefix(models, "deepseek").values())


async def test_bad_base_url_is_named_not_fatal(fleet: Fleet) -> None:
    fleet.env["MISTRAL_API_BASE"] = "not a url"
    models = await fleet.discovery(servers=[]).snapshot()
    mistral = by_prefix(models, "mistral")
    assert mistral and {m.not_ready_reason for m in mistral.values()} == {
        "(invalid URL) is not a valid http(s) base URL"
    }
    assert all(m.ready for m in by_prefix(models, "groq").values())


# ---------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------


async def test_provider_without_key_lists_litellm_known_chat_models_not_ready(fleet: Fleet) -> None:
    for name in ("anthropic", "gemini", "together_ai"):
        del fleet.env[KEY_ENV[name]]
    discovery = fleet.discovery(servers=[])
    models = await discovery.snapshot()
    for name, var in (
        ("anthropic", "ANTHROPIC_API_KEY"),
        ("gemini", "GEMINI_API_KEY"),
        ("together_ai", "TOGETHERAI_API_KEY"),
    ):
        found = by_prefix(models, name)
        assert found, name
        assert {(m.ready, m.not_ready_reason) for m in found.values()} == {(False, f"set {var} on the sidecar")}
        assert fleet.servers[name].hits == 0  # nothing is asked without a key
        for alias in found:
            assert is_chat_model(alias.split("/", 1)[1])
            info = litellm.model_cost.get(alias) or litellm.model_cost.get(alias.split("/", 1)[1])
            assert info is not None and info["mode"] == "chat", alias
        assert "api_key" not in next(iter(found.values())).entry.params
    anthropic = by_prefix(models, "anthropic")
    # metadata comes from the map for known models
    assert meta(anthropic["anthropic/claude-haiku-4-5"]) == from_map("claude-haiku-4-5")
    # dated snapshot duplicates are left out (claude-haiku-4-5-20251001 is in the map)
    assert "claude-haiku-4-5-20251001" in litellm.model_cost
    assert "anthropic/claude-haiku-4-5-20251001" not in anthropic
    for alias in anthropic:
        dated = re.search(_DATED, alias)
        assert not dated or alias[: dated.start()] not in {a.split("/", 1)[1] for a in anthropic}, alias
    # others untouched
    assert all(m.ready for m in by_prefix(models, "openai").values())

    quiet = await fleet.discovery(servers=[], include_keyless=False).snapshot()
    assert by_prefix(quiet, "anthropic") == {} and by_prefix(quiet, "openai")


async def test_alternative_key_variable_is_used_and_named(fleet: Fleet) -> None:
    del fleet.env["GEMINI_API_KEY"]
    fleet.env["GOOGLE_API_KEY"] = key_for("gemini")
    discovery = fleet.discovery(servers=[])
    gemini = by_prefix(await discovery.snapshot(), "gemini")
    assert sorted(gemini) == sorted(EXPECTED_READY["gemini"]) and all(m.ready for m in gemini.values())
    fleet.env["GOOGLE_API_KEY"] = "wrong-key"
    gemini = by_prefix(await discovery.snapshot(refresh=True), "gemini")
    assert {m.not_ready_reason for m in gemini.values()} == {"the sidecar's GOOGLE_API_KEY was rejected (HTTP 401)"}
    # the last good listing is what becomes not ready (not LiteLLM's list)
    assert sorted(gemini) == sorted(EXPECTED_READY["gemini"])


async def test_key_added_to_environ_is_picked_up_at_next_refresh(fleet: Fleet) -> None:
    del fleet.env["OPENAI_API_KEY"]
    discovery = fleet.discovery(servers=[])
    before = by_prefix(await discovery.snapshot(), "openai")
    assert "openai/gpt-4o-mini" in before and not before["openai/gpt-4o-mini"].ready
    assert "openai/gpt-zz-unmapped" not in before
    fleet.env["OPENAI_API_KEY"] = key_for("openai")  # e.g. the env file was re-read
    after = by_prefix(await discovery.snapshot(refresh=True), "openai")
    assert sorted(after) == sorted(EXPECTED_READY["openai"]) and all(m.ready for m in after.values())
    del fleet.env["OPENAI_API_KEY"]  # and removed again: not ready, nothing stale served
    again = by_prefix(await discovery.snapshot(refresh=True), "openai")
    assert not any(m.ready for m in again.values())
    assert discovery.secrets == frozenset(key_for(n) for n in HOSTED if n != "openai")


# ---------------------------------------------------------------------------------------
# Freshness
# ---------------------------------------------------------------------------------------


async def test_last_good_listing_is_kept_while_refreshes_fail(fleet: Fleet) -> None:
    anthropic, vllm = fleet.servers["anthropic"], fleet.servers["vllm"]
    discovery = fleet.discovery(servers=[("vllm", env_base(vllm), VLLM_KEY)])
    first = await discovery.snapshot()
    expected = sorted(EXPECTED_READY["anthropic"]) + sorted(EXPECTED_READY["vllm"])
    for mode in ("500", "hang", "malformed"):
        anthropic.mode = vllm.mode = mode
        models = await discovery.snapshot(refresh=True)
        kept = sorted(by_prefix(models, "anthropic")) + sorted(by_prefix(models, "vllm"))
        assert kept == expected, mode
        assert all(m.ready for m in models if m.alias in expected)
        # metadata survives too
        assert meta(by_prefix(models, "anthropic")["anthropic/claude-haiku-4-5"]) == meta(
            by_prefix(first, "anthropic")["anthropic/claude-haiku-4-5"]
        )
        status = status_of(discovery, "anthropic")
        assert status.serving_last_good and status.reason == hosted_reason(mode, fleet, "anthropic")
    await vllm.stop()
    models = await discovery.snapshot(refresh=True)
    assert all(m.ready for m in by_prefix(models, "vllm").values()) and by_prefix(models, "vllm")
    assert status_of(discovery, "vllm").reason.endswith("unreachable")

    anthropic.mode = "401"  # a rejected key is not transient: not ready, named
    models = await discovery.snapshot(refresh=True)
    found = by_prefix(models, "anthropic")
    assert sorted(found) == sorted(EXPECTED_READY["anthropic"])
    assert {m.not_ready_reason for m in found.values()} == {"the sidecar's ANTHROPIC_API_KEY was rejected (HTTP 401)"}
    anthropic.mode = "ok"
    models = await discovery.snapshot(refresh=True)
    assert all(m.ready for m in by_prefix(models, "anthropic").values())


async def test_server_started_between_refreshes_is_discovered(fleet: Fleet) -> None:
    port = closed_port()
    discovery = fleet.discovery(servers=[ServerSpec("openai_compatible", f"http://127.0.0.1:{port}/v1", name="late")])
    assert by_prefix(await discovery.snapshot(), "late") == {}
    assert status_of(discovery, "late").reason == f"server at http://127.0.0.1:{port}/v1 unreachable"
    async with ListingServer("openai_compatible", port=port):
        found = by_prefix(await discovery.snapshot(refresh=True), "late")
    assert sorted(found) == ["late/house-chat-v2"] and found["late/house-chat-v2"].ready
    assert status_of(discovery, "late").ok


async def test_one_hanging_provider_delays_nobody(fleet: Fleet) -> None:
    hung = fleet.servers["anthropic"]
    hung.mode = "hang"
    timeout = 3.0
    discovery = fleet.discovery(servers=[("vllm", env_base(fleet.servers["vllm"]), VLLM_KEY)], timeout=timeout)
    models = await asyncio.wait_for(discovery.snapshot(refresh=True), HANG_BOUND_S)
    # Every other source was asked while the hung one still held its request (before its
    # timeout could fire), so nobody waited for it: sources are queried concurrently.
    assert hung.first_hit_at is not None
    others = {s.source: fleet.servers[s.source].first_hit_at for s in discovery.statuses if s.source != "anthropic"}
    assert len(others) == 9 and None not in others.values(), f"every other source was asked: {others}"
    late = [name for name, at in others.items() if at is None or at >= hung.first_hit_at + timeout]
    assert not late, f"asked only after the hung source's timeout: {late}"
    assert len(discovery.statuses) == 10
    for status in discovery.statuses:
        assert status.ok == (status.source != "anthropic"), status
    hang_reason = hosted_reason("hang", fleet, "anthropic").replace("within 1s", f"within {timeout:g}s")
    assert status_of(discovery, "anthropic").reason == hang_reason
    assert all(m.ready for m in models if not m.alias.startswith("anthropic/"))


async def test_cache_ttl_and_one_shared_refresh(fleet: Fleet) -> None:
    clock = FakeClock(1000.0)
    deepseek = fleet.servers["deepseek"]
    discovery = fleet.discovery(servers=[], providers=[SPEC["deepseek"]], ttl=60.0, clock=clock)
    first = await discovery.snapshot()
    assert await discovery.snapshot() == first and deepseek.hits == 1  # cached
    clock.now += 59.0
    await discovery.snapshot()
    assert deepseek.hits == 1
    clock.now += 2.0  # stale
    await discovery.snapshot()
    assert deepseek.hits == 2
    results = await asyncio.gather(*(discovery.snapshot(refresh=True) for _ in range(8)))
    assert deepseek.hits == 3  # eight callers, one refresh
    assert all(r == results[0] for r in results)
    assert (await discovery.lookup("deepseek/deepseek-chat")) is not None
    assert await discovery.lookup("deepseek/nope") is None


async def test_cancelled_caller_does_not_cancel_the_shared_refresh(fleet: Fleet) -> None:
    deepseek = fleet.servers["deepseek"]
    deepseek.mode = "hang"
    discovery = fleet.discovery(servers=[], providers=[SPEC["deepseek"]], timeout=0.5)
    impatient = asyncio.ensure_future(discovery.snapshot())
    patient = asyncio.ensure_future(discovery.snapshot())
    await eventually(lambda: deepseek.hits >= 1, "the shared refresh reached the provider")
    impatient.cancel()
    models = await asyncio.wait_for(patient, 15.0)  # the 0.5 s timeout ends it; a loaded box's margin
    assert models and not any(m.ready for m in models)


async def test_background_refresh_loop(fleet: Fleet) -> None:
    deepseek = fleet.servers["deepseek"]
    discovery = fleet.discovery(servers=[], providers=[SPEC["deepseek"]], ttl=0.1)
    discovery.start()
    try:
        await eventually(lambda: deepseek.hits >= 3, "three refreshes of the background loop")
        assert [m.alias for m in discovery.cached()] == ["deepseek/deepseek-chat", "deepseek/deepseek-reasoner"]
    finally:
        await discovery.stop()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("model-discovery")], "loop left running"
    hits = deepseek.hits
    await asyncio.sleep(10 * 0.1)  # ten TTLs: a loop still running would have refreshed
    assert deepseek.hits == hits


async def test_default_ollama_probe_is_silent_when_absent(fleet: Fleet) -> None:
    port = closed_port()
    discovery = fleet.discovery(servers=[], default_ollama=f"http://127.0.0.1:{port}")
    models = await discovery.snapshot()
    assert by_prefix(models, "ollama") == {}
    assert all(m.ready for m in models if m.not_ready_reason.startswith("server at"))  # no error entries
    probe = status_of(discovery, "ollama")
    assert probe.probe and not probe.ok
    # OLLAMA_API_BASE moves the probe; an answering Ollama contributes its models
    fleet.env["OLLAMA_API_BASE"] = fleet.servers["ollama"].url
    found = by_prefix(await discovery.snapshot(refresh=True), "ollama")
    assert sorted(found) == sorted(EXPECTED_READY["ollama"])
    # a configured Ollama replaces the probe; default_ollama=None disables it
    configured = fleet.discovery(servers=[("ollama", fleet.servers["ollama"].url, None)], default_ollama="x")
    await configured.snapshot()
    assert [s.source for s in configured.statuses if s.source.startswith("ollama")] == ["ollama"]
    off = fleet.discovery(servers=[], default_ollama=None)
    await off.snapshot()
    assert not [s for s in off.statuses if s.source.startswith("ollama")]


async def test_server_names_never_collide(fleet: Fleet) -> None:
    a, b = closed_port(), closed_port()
    discovery = fleet.discovery(
        servers=[
            ("openai", f"http://127.0.0.1:{a}/v1", None),
            ("openai", f"http://127.0.0.1:{b}/v1", None),
            ServerSpec("vllm", env_base(fleet.servers["vllm"]), VLLM_KEY, name="house"),
            ServerSpec("openai", env_base(fleet.servers["openai_compatible"]), None, name="house"),
        ],
        providers=[],
    )
    models = await discovery.snapshot()
    assert [s.source for s in discovery.statuses] == [
        f"openai@127.0.0.1:{a}",
        f"openai@127.0.0.1:{b}",
        f"house@{fleet.servers['vllm'].url[7:]}",
        f"house@{fleet.servers['openai_compatible'].url[7:]}",
    ]
    aliases = [m.alias for m in models]
    assert len(aliases) == len(set(aliases)) == 2
    with pytest.raises(ValueError, match="unknown server kind"):
        ServerSpec("tgi", "http://127.0.0.1:1")


async def test_base_url_forms_litellm_accepts(fleet: Fleet) -> None:
    fleet.env["ANTHROPIC_API_BASE"] = fleet.servers["anthropic"].url + "/v1/messages/"
    fleet.env["GEMINI_API_BASE"] = fleet.servers["gemini"].url  # no API version: /v1beta added
    models = await fleet.discovery(servers=[]).snapshot()
    haiku = by_prefix(models, "anthropic")["anthropic/claude-haiku-4-5"]
    flash = by_prefix(models, "gemini")["gemini/gemini-2.5-flash"]
    assert haiku.ready and haiku.entry.params["api_base"] == fleet.servers["anthropic"].url
    assert flash.ready and flash.entry.params["api_base"] == fleet.servers["gemini"].url + "/v1beta"
    # no override: LiteLLM's default base is used, so no api_base is passed
    del fleet.env["DEEPSEEK_API_BASE"]
    fleet.env["DEEPSEEK_API_KEY"] = ""  # empty is unset
    models = await fleet.discovery(servers=[]).snapshot()
    deepseek = by_prefix(models, "deepseek")
    assert deepseek and all("api_base" not in m.entry.params for m in deepseek.values())
    assert {m.not_ready_reason for m in deepseek.values()} == {"set DEEPSEEK_API_KEY on the sidecar"}


# ---------------------------------------------------------------------------------------
# Merge and default
# ---------------------------------------------------------------------------------------


def discovered(
    alias: str, *, ready: bool = True, cost: float | None = None, source: str = "discovered"
) -> DiscoveredModel:
    provider = alias.split("/", 1)[0]
    entry = ModelEntry(alias=alias, litellm_model=alias, provider=provider, source=source)
    return DiscoveredModel(
        entry,
        ready,
        "" if ready else "set X on the sidecar",
        input_cost_per_token=None if cost is None else cost / 2,
        output_cost_per_token=None if cost is None else cost / 2,
    )


async def test_merge_config_wins_without_duplicates(fleet: Fleet) -> None:
    mine = ModelEntry(
        alias="openai/gpt-4o-mini",
        litellm_model="openai/gpt-4o-mini",
        provider="openai",
        params={"api_key": "cfg"},
        display_name="mine",
    )
    fast = ModelEntry(alias="fast", litellm_model="groq/llama-3.1-8b-instant", provider="groq")
    merged = merge([mine, fast, fast], [discovered("openai/gpt-4o-mini"), discovered("x/y"), discovered("x/y")])
    assert [m.alias for m in merged] == ["openai/gpt-4o-mini", "fast", "x/y"]
    assert merged[0].entry is mine and merged[0].ready and merged[1].ready

    del fleet.env["OPENAI_API_KEY"]  # a config entry is ready even when discovery is not
    discovery = fleet.discovery(servers=[], config_entries=[mine, fast])
    models = await discovery.snapshot()
    aliases = [m.alias for m in models]
    assert aliases[:2] == ["openai/gpt-4o-mini", "fast"] and len(aliases) == len(set(aliases))
    assert models[0].entry is mine and models[0].ready
    ready_flags = [m.ready for m in models[2:]]
    assert ready_flags == sorted(ready_flags, reverse=True)  # discovered: ready ones first


def test_choose_default() -> None:
    models = [
        discovered("openai/gpt-4o", cost=12.5e-6),
        discovered("openai/gpt-4o-mini", cost=7.5e-7),
        discovered("gemini/gemini-2.5-pro", cost=11.25e-6),  # "gemini" is not "mini"
        discovered("gemini/gemini-2.0-flash", cost=5e-7),
        discovered("gemini/gemini-2.0-flash-lite-preview", cost=1e-7),  # preview: specialised
        discovered("anthropic/claude-haiku-4-5", ready=False, cost=1e-9),  # not ready
        discovered("ollama/llama3.2:3b"),  # small, cost unknown
        discovered("house/big-model"),
        discovered("embedded-echo", source="embedded"),
    ]
    assert choose_default(models, "house/big-model") == "house/big-model"
    assert choose_default(models, "not-listed") == "gemini/gemini-2.0-flash"
    for _ in range(5):
        random.shuffle(models)
        assert choose_default(models, None) == "gemini/gemini-2.0-flash"
    small_unknown = [m for m in models if m.alias in ("ollama/llama3.2:3b", "house/big-model", "openai/gpt-4o")]
    assert choose_default(small_unknown, None) == "ollama/llama3.2:3b"
    assert choose_default([discovered("b/x"), discovered("a/x")], None) == "a/x"  # deterministic tie-break
    assert choose_default([discovered("a/small", ready=False)], None) is None
    assert choose_default([merge([embedded_entry()], [])[0], discovered("house/big-model")], None) == "house/big-model"


# ---------------------------------------------------------------------------------------
# Keys never leak
# ---------------------------------------------------------------------------------------


async def test_planted_key_never_in_reasons_reprs_or_logs(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fleet.servers["anthropic"].key = PLANTED_KEY
    fleet.env["ANTHROPIC_API_KEY"] = PLANTED_KEY
    fleet.servers["vllm"].key = PLANTED_KEY
    servers = [("vllm", env_base(fleet.servers["vllm"]), PLANTED_KEY)]
    discovery = fleet.discovery(servers=servers)
    seen: list[str] = []
    for mode in ("ok", "401", "500", "malformed", "ok"):
        fleet.servers["anthropic"].mode = fleet.servers["vllm"].mode = mode
        models = await discovery.snapshot(refresh=True)
        seen += [m.not_ready_reason for m in models] + [repr(m) for m in models]
        seen += [repr(s) for s in discovery.statuses] + [repr(discovery.statuses), repr(discovery)]
    fleet.env["ANTHROPIC_API_KEY"] = "sk-wrong-" + PLANTED_KEY[-8:]  # a rejected key, logged about
    await discovery.snapshot(refresh=True)
    text = "\n".join(seen) + caplog.text
    assert PLANTED_KEY not in text and "PLANTEDKEY" not in text
    assert "rejected (HTTP 401)" in caplog.text  # the log did talk about the failures
    # ... while the entries do carry it, for LiteLLM
    fleet.env["ANTHROPIC_API_KEY"] = PLANTED_KEY
    models = await discovery.snapshot(refresh=True)
    assert by_prefix(models, "anthropic")["anthropic/claude-haiku-4-5"].entry.params["api_key"] == PLANTED_KEY
    assert PLANTED_KEY in discovery.secrets


def test_chat_filter_rules() -> None:
    for model_id in (
        "text-embedding-3-small",
        "nomic-embed-text",
        "whisper-large-v3",
        "gpt-4o-mini-tts",
        "gpt-4o-transcribe",
        "omni-moderation-latest",
        "dall-e-3",
        "gpt-image-1",
        "imagen-4.0-generate-001",
        "meta-llama/llama-guard-4-12b",
        "bge-reranker-v2-m3",
        "gpt-4o-realtime-preview",
        "babbage-002",
        "mistral-ocr-latest",
        "BAAI/bge-m3",
    ):
        assert not is_chat_model(model_id), model_id
    for model_id in (
        "gpt-4o-mini",
        "gemini-2.5-flash",
        "claude-haiku-4-5",
        "llama3.2:latest",
        "codestral-latest",
        "deepseek-chat",
        "gpt-4o-mini-search-preview",
        "openai/gpt-oss-20b",
    ):
        assert is_chat_model(model_id), model_id
    assert not is_chat_model("some-model", listing_says=False)
    assert is_chat_model("some-model", listing_says=True)
    assert not is_chat_model("gemini-2.5-flash-preview-tts", listing_says=True)  # id rule beats listing
    assert not is_chat_model("x", map_mode="embedding") and is_chat_model("x", map_mode="responses")
