"""Who may read the status page, its JSON and the metrics: anyone on loopback; off
loopback only an admin node, by bearer token or client certificate, over TLS (or
plaintext with --insecure); a sidecar that no admin could reach refuses to start."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest

from exo_remote_engine.server import SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import ConfigError, load_config
from exo_remote_engine.sidecar.control.auth import ServerTLS
from exo_remote_engine.sidecar.status.access import StatusAccess, admin_nodes
from tests.conftest import PLANTED_KEY
from tests.support.certs import Pki, make_pki, openssl_skip_reason
from tests.support.configs import write_config
from tests.support.openai_upstream import OpenAIUpstream

ROUTES = ("/", "/status.json", "/metrics")
TOKENS = {"ops": "tok-ops-0123456789abc", "node-b": "tok-node-b-0123456789"}
NODES = "  nodes:\n    node-a: {role: admin}\n    ops: {role: admin}\n    node-b: {allowed_models: [good]}\n"
OFF_LOOPBACK = "0.0.0.0:0"  # bound on every interface; the tests only ever connect to 127.0.0.1

needs_openssl = pytest.mark.skipif(openssl_skip_reason() is not None, reason=str(openssl_skip_reason()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def status_of(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers, ssl=context if context is not None else False) as response:
            await response.read()
            return response.status


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


async def start(tmp_path: Path, upstream: OpenAIUpstream, settings: str = NODES, **fields: object) -> object:
    config = write_config(tmp_path / "config.yaml", upstream.url, ["good"], settings)
    return await start_sidecar(
        SidecarSettings(listen="127.0.0.1:0", config_path=config, **fields),  # type: ignore[arg-type]
        load_config(config),
    )


@needs_openssl
async def test_off_loopback_only_admin_nodes_read_it(
    tmp_path: Path, upstream: OpenAIUpstream, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", PLANTED_KEY)
    tls = ServerTLS(pki.server.cert, pki.server.key, pki.ca)
    sidecar = await start(tmp_path, upstream, named_tokens=TOKENS, tls=tls, metrics_listen=OFF_LOOPBACK)
    try:
        base = f"https://127.0.0.1:{sidecar.metrics_port}"  # type: ignore[attr-defined]
        anonymous = client_context(pki)
        for route in ROUTES:
            assert await status_of(base + route, context=anonymous) == 401, route
            assert await status_of(base + route, TOKENS["node-b"], anonymous) == 403, route  # a node, not an admin
            assert await status_of(base + route, "not-a-token", anonymous) == 403, route
            assert await status_of(base + route, TOKENS["ops"], anonymous) == 200, route
            # node-a has role: admin and no token: its client certificate (CN node-a) proves it.
            assert await status_of(base + route, context=client_context(pki, pki.client.cert, pki.client.key)) == 200
        foreign = client_context(pki, pki.foreign_client.cert, pki.foreign_client.key)
        with pytest.raises(aiohttp.ClientError):
            await status_of(base + "/", context=foreign)  # the TLS handshake refuses another CA's certificate
        with pytest.raises(aiohttp.ClientError):
            await status_of(f"http://127.0.0.1:{sidecar.metrics_port}/", TOKENS["ops"])  # type: ignore[attr-defined]
    finally:
        await sidecar.stop(grace_s=None)  # type: ignore[attr-defined]


async def test_off_loopback_without_any_admin_is_refused_at_start(
    tmp_path: Path, upstream: OpenAIUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", PLANTED_KEY)
    plain_nodes = "  nodes:\n    node-b: {allowed_models: [good]}\n"
    with pytest.raises(ConfigError, match="role: admin"):
        await start(tmp_path, upstream, plain_nodes, named_tokens=TOKENS, metrics_listen=OFF_LOOPBACK)
    # An admin token, but plaintext off loopback: the token would cross the network readable.
    with pytest.raises(ConfigError, match="plaintext"):
        await start(tmp_path, upstream, named_tokens=TOKENS, metrics_listen=OFF_LOOPBACK)
    with pytest.raises(ConfigError, match="--metrics-listen 'nowhere': expected host:port"):
        await start(tmp_path, upstream, metrics_listen="nowhere")


async def test_insecure_off_loopback_still_needs_the_admin_token(
    tmp_path: Path, upstream: OpenAIUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", PLANTED_KEY)
    sidecar = await start(tmp_path, upstream, named_tokens=TOKENS, metrics_listen=OFF_LOOPBACK, allow_insecure=True)
    try:
        base = f"http://127.0.0.1:{sidecar.metrics_port}"  # type: ignore[attr-defined]
        assert await status_of(base + "/metrics") == 401
        assert await status_of(base + "/metrics", TOKENS["node-b"]) == 403
        assert await status_of(base + "/metrics", TOKENS["ops"]) == 200
    finally:
        await sidecar.stop(grace_s=None)  # type: ignore[attr-defined]


async def test_loopback_is_open_as_before(
    tmp_path: Path, upstream: OpenAIUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", PLANTED_KEY)
    sidecar = await start(tmp_path, upstream, named_tokens=TOKENS, metrics_listen="127.0.0.1:0")
    try:
        for route in ROUTES:
            assert await status_of(f"http://127.0.0.1:{sidecar.metrics_port}{route}") == 200  # type: ignore[attr-defined]
    finally:
        await sidecar.stop(grace_s=None)  # type: ignore[attr-defined]


def test_admin_role_and_master_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", PLANTED_KEY)
    config = write_config(tmp_path / "c.yaml", "http://127.0.0.1:9", ["good"], NODES)
    config.write_text(config.read_text() + "general_settings:\n  master_key: sk-master-0123456789\n")
    assert admin_nodes(load_config(config)) == {"node-a", "ops", "master-key"}
    bad = write_config(tmp_path / "bad.yaml", "http://127.0.0.1:9", ["good"], "  nodes:\n    x: {role: root}\n")
    with pytest.raises(ConfigError, match="role must be one of user, admin"):
        load_config(bad)
    access = StatusAccess(open=False, admin_tokens={"ops": "t"}, admin_names=frozenset({"ops"}))
    assert access.decide("", {"subject": ((("commonName", "ops"),),)}) == 200
    assert access.decide("", {"subject": ((("commonName", "node-b"),),)}) == 403
    assert access.decide("", None) == 401
    assert access.decide("Bearer t", None) == 200


@needs_openssl
async def test_client_certificates_alone_guard_it_when_no_admin_has_a_token(
    tmp_path: Path, upstream: OpenAIUpstream, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", PLANTED_KEY)
    tls = ServerTLS(pki.server.cert, pki.server.key, pki.ca)  # mTLS, no token file
    sidecar = await start(tmp_path, upstream, tls=tls, metrics_listen=OFF_LOOPBACK)
    try:
        base = f"https://127.0.0.1:{sidecar.metrics_port}"  # type: ignore[attr-defined]
        admin = client_context(pki, pki.client.cert, pki.client.key)  # CN node-a: role admin
        assert await status_of(base + "/status.json", context=admin) == 200
        with pytest.raises(aiohttp.ClientError):  # no certificate: the handshake itself is refused
            await status_of(base + "/status.json", context=client_context(pki))
    finally:
        await sidecar.stop(grace_s=None)  # type: ignore[attr-defined]
