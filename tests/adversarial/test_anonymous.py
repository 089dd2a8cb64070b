"""Off loopback, no service without client authentication unless the operator says so
(issue 11, item 3).

Two separate questions: can the network read the traffic (TLS, else ``--insecure``), and
must a caller prove who it is (a token or an mTLS client certificate, else
``--allow-anonymous``). TLS without a client CA and without tokens answers only the
first, so it counts as anonymous. With ``--allow-anonymous`` the sidecar warns at start
and every ``exo-remote models`` shows the warning.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exo_remote_engine.engine.connection.target import ClientTLS
from exo_remote_engine.server import SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import ConfigError
from exo_remote_engine.sidecar.control.auth import ServerTLS
from tests.support.certs import Pki, make_pki, openssl_skip_reason
from tests.support.harness import sidecar_client
from tests.support.processes import REPO, start_sidecar_process

OFF_LOOPBACK = "0.0.0.0:0"  # every interface; the tests' clients still dial 127.0.0.1
TOKEN = "node-a-token-0123456789abcdef"
needs_openssl = pytest.mark.skipif(openssl_skip_reason() is not None, reason=openssl_skip_reason() or "")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def test_plaintext_without_client_auth_is_refused_even_with_insecure() -> None:
    with pytest.raises(ConfigError, match="without client authentication") as caught:
        await start_sidecar(SidecarSettings(listen=OFF_LOOPBACK, allow_insecure=True))
    assert "--allow-anonymous" in str(caught.value) and "--token-file" in str(caught.value)


@needs_openssl
async def test_tls_without_a_client_ca_or_tokens_counts_as_anonymous(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="without client authentication"):
        await start_sidecar(SidecarSettings(listen=OFF_LOOPBACK, tls=ServerTLS(pki.server.cert, pki.server.key)))


@needs_openssl
async def test_tokens_or_client_certificates_make_it_start_without_a_warning(pki: Pki) -> None:
    for settings in (
        SidecarSettings(listen=OFF_LOOPBACK, allow_insecure=True, named_tokens={"node-a": TOKEN}),
        SidecarSettings(listen=OFF_LOOPBACK, tls=ServerTLS(pki.server.cert, pki.server.key), tokens=[TOKEN]),
        SidecarSettings(listen=OFF_LOOPBACK, tls=ServerTLS(pki.server.cert, pki.server.key, pki.ca)),
    ):
        running = await start_sidecar(settings)
        try:
            tls = ClientTLS(pki.ca, pki.client.cert, pki.client.key) if settings.tls else None
            client = sidecar_client(running.address, token=TOKEN, tls=tls)
            listing = await client.list_models()
            assert list(listing.warnings) == []
            await client.close()
        finally:
            await running.stop(grace_s=None)


@needs_openssl
async def test_allow_anonymous_starts_warns_at_start_and_tells_every_client(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    settings = SidecarSettings(
        listen=OFF_LOOPBACK, tls=ServerTLS(pki.server.cert, pki.server.key), allow_anonymous=True
    )
    running = await start_sidecar(settings)
    try:
        assert "serves ANYONE" in caplog.text and "--allow-anonymous" in caplog.text
        client = sidecar_client(running.address, tls=ClientTLS(ca_file=pki.ca))
        listing = await client.list_models()
        assert len(listing.warnings) == 1 and "without authentication" in listing.warnings[0]
        await client.close()
    finally:
        await running.stop(grace_s=None)


async def test_loopback_without_tokens_stays_as_it_was() -> None:
    running = await start_sidecar(SidecarSettings(listen="127.0.0.1:0"))
    try:
        client = sidecar_client(running.address)
        assert list((await client.list_models()).warnings) == []
        await client.close()
    finally:
        await running.stop(grace_s=None)


@pytest.mark.timeout(120)
def test_command_refuses_then_with_allow_anonymous_warns_in_its_log_and_in_exo_remote_models(tmp_path: Path) -> None:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("EXO_REMOTE_TOKEN", None)
    env.pop("EXO_REMOTE_TOKEN_FILE", None)
    refused = subprocess.run(
        [sys.executable, "-m", "exo_remote_engine.server", "--listen", OFF_LOOPBACK, "--insecure", "--no-discover"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "without client authentication" in refused.stderr and "--allow-anonymous" in refused.stderr
    assert "Traceback" not in refused.stderr

    log = tmp_path / "sidecar.log"
    sidecar = start_sidecar_process(None, log, env, OFF_LOOPBACK, ["--insecure", "--allow-anonymous"])
    try:
        models = subprocess.run(
            [sys.executable, "-m", "exo_remote_engine.cli.main", "--sidecar", sidecar.address, "models"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        sidecar.stop()
    assert models.returncode == 0, models.stderr
    first = models.stdout.splitlines()[0]
    assert first.startswith("WARNING: ") and "without authentication" in first, models.stdout
    assert "embedded-echo" in models.stdout
    assert "serves ANYONE" in log.read_text()


def test_exo_remote_models_shows_no_warning_line_when_there_is_none() -> None:
    from exo_remote_engine.cli.main import render_models
    from exo_remote_engine.generated import remote_inference_pb2 as pb

    plain = render_models(pb.ListModelsResponse(models=[pb.Model(alias="m", ready=True)], default_model="m"))
    assert "WARNING" not in plain
    warned = render_models(pb.ListModelsResponse(models=[pb.Model(alias="m", ready=True)], warnings=["careful"]))
    assert warned.splitlines()[0] == "WARNING: careful"
