"""The sidecar's two ways of reading an OpenAI-compatible upstream, as a test parameter.

``EXO_REMOTE_OPENAI_FAST_PATH`` picks the direct aiohttp reader ("direct") or LiteLLM
("litellm"). The ``transport`` fixture (registered for the whole suite by tests/conftest.py)
runs a test once per transport; a module where every test must run on both says
``pytestmark = pytest.mark.usefixtures("transport")``, which also sets it up before the
sidecar fixtures that read the environment.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

TRANSPORTS = ("direct", "litellm")
FAST_PATH_ENV = "EXO_REMOTE_OPENAI_FAST_PATH"


def use_transport(monkeypatch: pytest.MonkeyPatch, transport: str) -> str:
    """Point every sidecar started afterwards (in-process, or a subprocess, which inherits
    os.environ) at ``transport``: "direct" (aiohttp reader) or "litellm"."""
    assert transport in TRANSPORTS, transport
    monkeypatch.setenv(FAST_PATH_ENV, "1" if transport == "direct" else "0")
    return transport


def assert_served_by(headers: Mapping[str, str], transport: str) -> None:
    """The upstream saw ``transport``'s HTTP client: aiohttp for the direct reader, the
    OpenAI SDK (httpx) under LiteLLM. ``headers`` are a recorded request's (lower-cased)."""
    agent = headers.get("user-agent", "")
    served = "direct" if "aiohttp" in agent else "litellm"
    assert served == transport, f"expected the {transport} transport, the upstream saw user-agent {agent!r}"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test once per transport, the environment set for every sidecar it starts."""
    return use_transport(monkeypatch, request.param)
