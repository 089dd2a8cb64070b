"""Every secret the sidecar can send is redacted from everything anyone else can read.

Planted secrets reach the sidecar the ways an operator provides them: a key the transports
take implicitly from the environment (``OPENAI_API_KEY``, no ``api_key`` in the config), an
``extra_headers`` value written as ``os.environ/VAR``, credentials in an ``api_base`` URL,
and a configured ``api_key``. The upstream answers 400 echoing each of them (``key=<key>``,
and the configured key without its ``sk-`` prefix). None may appear in the status message,
the trailers (google.rpc details), a DEBUG log record, the metrics, or what
``exo-remote chat`` prints; on both transports.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from exo_remote_engine.contract.errors import Reason
from exo_remote_engine.server import RunningSidecar
from tests.support.harness import chat_request, metrics_text_of, raw_generate
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import REPO
from tests.support.sidecars import InProcessSidecars
from tests.support.transports import assert_served_by

# Shapes the old patterns missed: no "sk-" prefix, dots breaking a 32-character run.
IMPLICIT_KEY = "vllm.Impl1c1t.k3y.Qz7Wx2"
HEADER_SECRET = "hdr.S3cr3t.Value.Mn4Pq8"
URL_PASSWORD = "url.Pa55w0rd.Tr9Lk3"
CONFIG_KEY = "sk-Live.7fQ2x9Lm3Rt8Yb"
PLANTED = {
    "implicit env key": IMPLICIT_KEY,
    "extra_headers value": HEADER_SECRET,
    "api_base password": URL_PASSWORD,
    "configured key": CONFIG_KEY,
}


def _markers(secret: str) -> list[str]:
    """The secret, the secret without its first three characters (a prefix-less echo)
    and its last twelve: none of them may be readable anywhere."""
    return [secret, secret[3:], secret[-12:]]


def _assert_clean(where: str, *texts: object) -> None:
    for text in texts:
        shown = bytes(text).decode("latin-1") if isinstance(text, bytes | bytearray) else str(text)
        for name, secret in PLANTED.items():
            for marker in _markers(secret):
                assert marker not in shown, f"the {name} ({marker!r}) leaked into {where}: {shown[:300]!r}"


def _echo(secret: str) -> Scenario:
    return Scenario(status=400, error_message=f"Invalid request: key={secret} was not accepted")


SCENARIOS = {
    "echo-implicit": _echo(IMPLICIT_KEY),
    "echo-header": _echo(HEADER_SECRET),
    "echo-url": Scenario(status=400, error_message=f"bad upstream auth {URL_PASSWORD} for user ops"),
    "echo-prefixless": Scenario(status=400, error_message=f"Incorrect key ending {CONFIG_KEY[3:]} provided"),
    "echo-key": _echo(CONFIG_KEY),
}


def _config(path: Path, upstream: OpenAIUpstream) -> Path:
    base = upstream.url.replace("http://", f"http://ops:{URL_PASSWORD}@") + "/v1"
    lines = ["model_list:"]
    for alias in SCENARIOS:
        lines += [f"  - model_name: {alias}", "    litellm_params:", f"      model: openai/{alias}"]
        if alias == "echo-url":
            lines.append(f"      api_base: {base}")
        else:
            lines.append(f"      api_base: {upstream.url}/v1")
        if alias in ("echo-prefixless", "echo-key"):
            lines.append("      api_key: os.environ/PLANTED_CONFIG_KEY")
        if alias == "echo-header":
            lines += ["      extra_headers:", "        X-Upstream-Token: os.environ/PLANTED_HEADER_SECRET"]
    path.write_text("\n".join(lines) + "\nexo_remote_settings:\n  num_retries: 0\n")
    return path


@pytest.fixture
def _debug_log(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    out, err = capfd.readouterr()
    _assert_clean("the DEBUG log", caplog.text, *(r.getMessage() for r in caplog.records))
    _assert_clean("the process's stdout/stderr", out, err)


@pytest.fixture
async def sidecar(
    transport: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    _debug_log: None,
    in_process_sidecars: InProcessSidecars,
) -> AsyncIterator[tuple[RunningSidecar, OpenAIUpstream]]:
    monkeypatch.setenv("OPENAI_API_KEY", IMPLICIT_KEY)
    monkeypatch.setenv("PLANTED_HEADER_SECRET", HEADER_SECRET)
    monkeypatch.setenv("PLANTED_CONFIG_KEY", CONFIG_KEY)
    async with OpenAIUpstream(dict(SCENARIOS)) as upstream:
        config = _config(tmp_path / "config.yaml", upstream)
        yield await in_process_sidecars.start(config, metrics_listen=None), upstream


@pytest.mark.timeout(60)
@pytest.mark.parametrize("alias", list(SCENARIOS))
async def test_echoed_secrets_reach_no_status_trailer_log_or_metric(
    sidecar: tuple[RunningSidecar, OpenAIUpstream], alias: str, transport: str
) -> None:
    running, upstream = sidecar
    outcome = await raw_generate(running.address, chat_request(alias, request_id=f"secrets-{alias}"))
    if alias == "echo-url" and transport == "litellm":
        # LiteLLM's HTTP client refuses credentials in the URL next to its Authorization
        # header: a connection error, whose text must not show the URL's password either.
        assert outcome.code == grpc.StatusCode.UNAVAILABLE, (outcome.code, outcome.details)
    else:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code, outcome.details)
        assert outcome.error().reason is Reason.INVALID_REQUEST
        assert "[REDACTED]" in outcome.details, "the provider's echo is shown, with the secret taken out"
    _assert_clean("the status message or trailers", *outcome.surface())
    _assert_clean("the metrics", metrics_text_of(running))
    if alias == "echo-url" and transport == "litellm":
        return  # never reached the upstream
    sent = upstream.requests_for(alias)[-1].headers
    assert_served_by(sent, transport)
    if alias == "echo-implicit":
        assert sent.get("authorization") == f"Bearer {IMPLICIT_KEY}", "the implicit key is really sent"
    if alias == "echo-header":
        assert sent.get("x-upstream-token") == HEADER_SECRET, "extra_headers values are resolved like api_key"


@pytest.mark.timeout(90)
async def test_exo_remote_chat_prints_no_secret(sidecar: tuple[RunningSidecar, OpenAIUpstream], transport: str) -> None:
    running, _ = sidecar
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLANTED_", "OPENAI_API_KEY", "EXO_REMOTE_"))}
    env["EXO_REMOTE_SIDECAR"] = running.address
    for alias in SCENARIOS:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "exo_remote_engine.cli.main",
            "chat",
            "Hello",
            "--model",
            alias,
            env=env,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 1, (out, err)
        # (LiteLLM refuses credentials in the URL itself: test_echoed_secrets_reach_no_status...)
        refused_by_litellm = alias == "echo-url" and transport == "litellm"
        assert (b"PROVIDER_UNAVAILABLE" if refused_by_litellm else b"INVALID_REQUEST") in err, err
        _assert_clean(f"`exo-remote chat --model {alias}` output", out, err)


@pytest.fixture
def restored_secrets() -> Iterator[None]:
    """The process-wide secret registry as it was before the test: what a test registers
    (and stops using) does not redact, or hide a leak, in the tests after it."""
    from exo_remote_engine.contract.redaction import SECRETS

    saved = (SECRETS._values, SECRETS._grams, SECRETS._short)
    yield
    with SECRETS._lock:
        SECRETS._values, SECRETS._grams, SECRETS._short = saved


def test_fragments_and_key_shapes_are_redacted_but_ids_are_not() -> None:
    from exo_remote_engine.contract.redaction import SecretRegistry

    secrets = SecretRegistry()  # a registry of its own: the process-wide one stays as it was
    secret = "zz.Fr4gm3nt.0f.A.Secret.9x"
    secrets.add(secret)
    request_id = "3f1c2b7e-9d4a-4c1e-8f0b-2a6d5e7c9b10"
    text = (
        f"request {request_id}: echoed {secret[4:20]} and {secret[-9:]}; "
        "key=abcd1234efgh Bearer tok_98765zyx http://bob:hunter2pass@host/v1"
    )
    shown = secrets.redact(text)
    assert request_id in shown, shown
    for leaked in (secret[4:20], secret[-9:], "abcd1234efgh", "tok_98765zyx", "hunter2pass"):
        assert leaked not in shown, shown


@pytest.mark.timeout(30)
async def test_discovery_keys_from_an_env_file_are_registered(tmp_path: Path, restored_secrets: None) -> None:
    from exo_remote_engine.contract.redaction import SECRETS
    from exo_remote_engine.sidecar.config.loader import SidecarConfig, embedded_entry
    from exo_remote_engine.sidecar.discovery.registry import ModelRegistry
    from tests.support.processes import free_port

    key = "gsk.EnvF1le.Discovery.K3y"
    env_file = tmp_path / "keys.env"
    # A base URL nobody listens on: the listing fails at once, the key was still used.
    env_file.write_text(f"GROQ_API_KEY={key}\nGROQ_API_BASE=http://127.0.0.1:{free_port()}/openai/v1\n")
    registry = ModelRegistry.with_discovery(
        SidecarConfig((embedded_entry(),), embedded_entry().alias), env_file=env_file, timeout_s=2.0
    )
    try:
        await registry.models(refresh=True)
    finally:
        await registry.stop()
    assert key not in SECRETS.redact(f"groq said key {key}")
    assert key[4:] not in SECRETS.redact(f"groq said {key[4:]}")
