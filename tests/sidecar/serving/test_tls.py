"""Transport security and node identity of the sidecar, with certificates made at test time.

A CA signs the sidecar's certificate (SAN 127.0.0.1 and localhost), a client certificate
with CN ``node-a`` and an expired one; a second CA signs another ``node-a`` certificate.
The sidecar runs in-process with ``SidecarSettings(tls=ServerTLS(...))`` and a config whose
``exo_remote_settings.nodes`` lets node-a use ``open-*`` models only; clients are the
engine side's ``SidecarClient`` with ``SidecarTarget(tls=ClientTLS(...))``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.engine.connection.target import ClientTLS
from exo_remote_engine.server import RunningSidecar, SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import ConfigError
from exo_remote_engine.sidecar.control.auth import ServerTLS
from tests.conftest import PLANTED_KEY
from tests.support.certs import Pki, make_pki, openssl_skip_reason
from tests.support.configs import KEY_ENV, write_config
from tests.support.harness import assert_no_key, chat_request, error_surface, metrics_text_of, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream
from tests.support.processes import REPO
from tests.support.sidecars import InProcessSidecars

pytestmark = pytest.mark.skipif(openssl_skip_reason() is not None, reason=openssl_skip_reason() or "")

NODES = "  nodes:\n    node-a: {allowed_models: ['open-*']}\n    node-b: {allowed_models: ['open-*']}\n"
REFUSED_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


StartTLS = Callable[..., Awaitable[RunningSidecar]]


@pytest.fixture
async def start_tls(
    upstream: OpenAIUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    in_process_sidecars: InProcessSidecars,
) -> AsyncIterator[StartTLS]:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    config = write_config(tmp_path / "tls.yaml", upstream.url, ["open-model", "closed-model"], NODES)

    async def start(tls: ServerTLS, **settings: Any) -> RunningSidecar:
        return await in_process_sidecars.start(config, tls=tls, **settings)

    yield start
    await in_process_sidecars.stop()
    out, err = capfd.readouterr()
    assert_no_key(caplog.text, out, err, where="the DEBUG log or the process's stdout/stderr")


def _mtls(pki: Pki) -> ServerTLS:
    return ServerTLS(pki.server.cert, pki.server.key, pki.ca)


def _client(sidecar: RunningSidecar, **tls: Any) -> SidecarClient:
    return sidecar_client(sidecar.address, tls=ClientTLS(**tls), deadline_s=10)


async def _refused(client: SidecarClient) -> RemoteError:
    """Both RPCs fail at the handshake, promptly, as SIDECAR_UNAVAILABLE."""
    errors = []
    for call in ("list", "generate"):
        started = time.monotonic()
        with pytest.raises(RemoteError) as caught:
            if call == "list":
                await client.list_models(timeout_s=10)
            else:
                async for _ in client.generate(chat_request("open-model")):
                    pass
        assert time.monotonic() - started < REFUSED_WITHIN_S, "refused at the handshake, not by a timeout"
        error = caught.value
        assert (error.reason, error.grpc_code) == (Reason.SIDECAR_UNAVAILABLE, grpc.StatusCode.UNAVAILABLE), error
        assert_no_key(*error_surface(error), where="the refusal")
        errors.append(error)
    await client.close()
    return errors[0]


@pytest.mark.timeout(60)
async def test_mtls_refuses_a_client_without_a_certificate(
    pki: Pki, start_tls: StartTLS, upstream: OpenAIUpstream
) -> None:
    sidecar = await start_tls(_mtls(pki))
    await _refused(_client(sidecar, ca_file=pki.ca))
    assert not upstream.requests, "nothing reached the provider"


@pytest.mark.timeout(60)
async def test_mtls_refuses_an_expired_client_certificate(
    pki: Pki, start_tls: StartTLS, upstream: OpenAIUpstream
) -> None:
    sidecar = await start_tls(_mtls(pki))
    expired = pki.expired_client
    await _refused(_client(sidecar, ca_file=pki.ca, cert_file=expired.cert, key_file=expired.key))
    assert not upstream.requests


@pytest.mark.timeout(60)
async def test_mtls_refuses_a_certificate_from_another_ca(
    pki: Pki, start_tls: StartTLS, upstream: OpenAIUpstream
) -> None:
    sidecar = await start_tls(_mtls(pki))
    foreign = pki.foreign_client
    await _refused(_client(sidecar, ca_file=pki.ca, cert_file=foreign.cert, key_file=foreign.key))
    assert not upstream.requests


@pytest.mark.timeout(60)
async def test_client_refuses_a_sidecar_it_does_not_trust_or_that_has_another_name(
    pki: Pki, start_tls: StartTLS
) -> None:
    sidecar = await start_tls(_mtls(pki))
    client = pki.client
    await _refused(_client(sidecar, ca_file=pki.foreign_ca, cert_file=client.cert, key_file=client.key))
    await _refused(
        _client(sidecar, ca_file=pki.ca, cert_file=client.cert, key_file=client.key, server_name="sidecar.evil")
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server_name", [None, "localhost"])
async def test_valid_client_certificate_is_node_a_with_its_model_rules(
    pki: Pki, start_tls: StartTLS, server_name: str | None
) -> None:
    sidecar = await start_tls(_mtls(pki))
    client = _client(
        sidecar, ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key, server_name=server_name
    )
    with pytest.raises(RemoteError) as caught:
        async for _ in client.generate(chat_request("closed-model")):
            pass
    error = caught.value
    assert (error.reason, error.grpc_code) == (Reason.PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED), error
    assert "node-a" in error.message and "closed-model" in error.message
    events = [event async for event in client.generate(chat_request("open-model", "over mTLS"))]
    assert events[-1].HasField("finished")
    assert "over mTLS" in "".join(e.delta.text for e in events[:-1]), "the upstream echoed the prompt"
    metrics = metrics_text_of(sidecar)
    assert 'model="open-model",node="node-a"' in metrics, "the metrics name the certificate's node"
    assert_no_key(*error_surface(error), metrics, where="errors or metrics")
    await client.close()


@pytest.mark.timeout(60)
async def test_server_only_tls_with_bearer_tokens(pki: Pki, start_tls: StartTLS) -> None:
    sidecar = await start_tls(ServerTLS(pki.server.cert, pki.server.key), named_tokens={"node-b": "token-b"})
    for token in (None, "wrong-token", "token-b "):
        client = _client(sidecar, ca_file=pki.ca) if token is None else _tokened(sidecar, pki, token)
        with pytest.raises(RemoteError) as caught:
            await client.list_models()
        assert caught.value.reason is Reason.UNAUTHENTICATED, (token, caught.value)
        assert caught.value.grpc_code is grpc.StatusCode.UNAUTHENTICATED
        await client.close()
    client = _tokened(sidecar, pki, "token-b")
    listing = await client.list_models()
    assert {m.alias for m in listing.models} == {"open-model"}, "node-b is listed only what it may use"
    events = [event async for event in client.generate(chat_request("open-model"))]
    assert events[-1].HasField("finished")
    with pytest.raises(RemoteError) as caught:
        async for _ in client.generate(chat_request("closed-model")):
            pass
    assert caught.value.reason is Reason.PERMISSION_DENIED and "node-b" in caught.value.message
    await client.close()


def _tokened(sidecar: RunningSidecar, pki: Pki, token: str) -> SidecarClient:
    return sidecar_client(sidecar.address, tls=ClientTLS(ca_file=pki.ca), token=token, deadline_s=10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.10:0"])
async def test_plaintext_off_loopback_is_refused_without_insecure(listen: str) -> None:
    with pytest.raises(ConfigError, match="plaintext"):
        await start_sidecar(SidecarSettings(listen=listen))


@pytest.mark.timeout(60)
async def test_cli_refuses_plaintext_off_loopback_without_insecure() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exo_remote_engine.server",
        "--listen",
        "0.0.0.0:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "EXO_REMOTE_DISCOVER": "0", "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=50)
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 2, stderr.decode()
    assert "plaintext" in stderr.decode() and "--insecure" in stderr.decode()
    assert b"listening" not in stdout
