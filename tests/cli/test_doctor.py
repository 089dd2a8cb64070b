"""``exo-remote doctor`` as a user runs it: a subprocess against real sidecars on 127.0.0.1
(plain, token-guarded, TLS), real Redis and PostgreSQL, and, with EXO_SRC, classic exo's
own environment. Each failure names its fix; the exit status tells pass (0) from fail (1).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from exo_remote_engine.server import RunningSidecar, SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import load_config
from exo_remote_engine.sidecar.control.auth import ServerTLS
from exo_remote_engine.sidecar.ledger.spend import Charge, Ledger
from tests.support.certs import Pki, make_pki, openssl_skip_reason
from tests.support.processes import PINS_VENV, REPO, exo_skip_reason, free_port
from tests.support.servers import PostgresServer, RedisServer

TOKEN = "doctor-test-token-0123456789"
needs_openssl = pytest.mark.skipif(openssl_skip_reason() is not None, reason=openssl_skip_reason() or "")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXO_REMOTE_") and not k.endswith("_API_KEY")}
    env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(REPO), **extra})
    return env


async def doctor(*args: str, env: dict[str, str] | None = None, python: str = sys.executable) -> tuple[int, str]:
    """(exit status, stdout) of ``exo-remote doctor ARGS`` in its own process; asynchronous,
    so that in-process sidecars on this event loop keep answering."""
    process = await asyncio.create_subprocess_exec(
        python, "-m", "exo_remote_engine.cli", "doctor", *args,
        env=env or _env(), cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert b"Traceback" not in err, err.decode()
    assert process.returncode is not None
    return process.returncode, out.decode()


def _line(out: str, start: str) -> str:
    """The line starting with ``start`` and its fix line, if any."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(start):
            fix = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("      fix:") else ""
            return line + "\n" + fix
    raise AssertionError(f"no line starting {start!r} in:\n{out}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def sidecars() -> AsyncIterator[Callable[..., Any]]:
    running: list[RunningSidecar] = []

    async def start(**settings: Any) -> RunningSidecar:
        sidecar = await start_sidecar(SidecarSettings(listen="127.0.0.1:0", **settings), load_config(None))
        running.append(sidecar)
        return sidecar

    yield start
    for sidecar in running:
        await sidecar.stop(grace_s=None)


# --------------------------------------------------------------------------- on a node


@pytest.mark.timeout(120)
async def test_no_sidecar_listening_fails_at_the_port_with_the_fix() -> None:
    port = free_port()
    code, out = await doctor("--sidecar", f"127.0.0.1:{port}", "--skip-exo")
    assert code == 1
    assert "ok    name 127.0.0.1: resolves to 127.0.0.1" in out
    check = _line(out, f"FAIL  port 127.0.0.1:{port}")
    assert (
        "Connection refused" in check
        and f"fix: start exo-remote-sidecar on this machine (--listen 127.0.0.1:{port})" in check
    )
    assert "authentication" not in out, "no call is tried past a closed port"


@pytest.mark.timeout(120)
async def test_a_name_that_does_not_resolve_says_so() -> None:
    code, out = await doctor("--sidecar", "no-such-host.invalid:50505", "--skip-exo")
    assert code == 1
    assert "use the sidecar host's IP address" in _line(out, "FAIL  name no-such-host.invalid")


@pytest.mark.timeout(120)
async def test_a_missing_token_fails_with_the_variable_to_set_and_passes_with_it(sidecars: Callable[..., Any]) -> None:
    sidecar = await sidecars(tokens=(TOKEN,))
    code, out = await doctor("--sidecar", sidecar.address, "--skip-exo")
    assert code == 1
    check = _line(out, "FAIL  authentication")
    assert "fix: the sidecar requires a token and none is set: set EXO_REMOTE_TOKEN" in check
    code, out = await doctor("--sidecar", sidecar.address, "--skip-exo", env=_env(EXO_REMOTE_TOKEN=TOKEN))
    assert code == 0, out
    assert "ok    authentication: the token was accepted" in out and "ok    models: 1 ready (embedded-echo)" in out, out
    assert TOKEN not in out


@needs_openssl
@pytest.mark.timeout(120)
async def test_tls_without_the_ca_fails_and_with_it_checks_the_clock(sidecars: Callable[..., Any], pki: Pki) -> None:
    sidecar = await sidecars(tls=ServerTLS(pki.server.cert, pki.server.key))
    code, out = await doctor("--sidecar", sidecar.address, "--skip-exo")
    assert code == 1
    assert "fix: set EXO_REMOTE_TLS_CA" in _line(out, "FAIL  TLS: the sidecar at")
    code, out = await doctor("--sidecar", sidecar.address, "--skip-exo", env=_env(EXO_REMOTE_TLS_CA=str(pki.ca)))
    assert code == 0, out
    assert "ok    TLS: handshake with" in out and "ok    clock: within the certificate's dates" in out


@pytest.mark.timeout(120)
async def test_without_exo_in_this_python_the_fix_names_exos_environment() -> None:
    code, out = await doctor("--sidecar", f"127.0.0.1:{free_port()}")
    assert code == 1
    check = _line(out, "FAIL  exo: classic exo is not installed in this Python")
    assert "run exo-remote doctor with exo's own Python" in check


@pytest.mark.skipif(exo_skip_reason() is not None, reason=str(exo_skip_reason()))
@pytest.mark.timeout(240)
async def test_in_exos_environment_everything_passes(sidecars: Callable[..., Any]) -> None:
    sidecar = await sidecars()
    code, out = await doctor("--sidecar", sidecar.address, python=str(PINS_VENV / "bin" / "python"))
    assert code == 0, out
    for start in ("ok    exo: exo", "ok    exo's pins", "ok    startup trigger", "ok    exo hooks", "ok    models"):
        assert start in out, out


# --------------------------------------------------------------------------- on the sidecar host


def _config(path: Path) -> Path:
    path.write_text("model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n")
    return path


@pytest.mark.timeout(180)
async def test_host_a_missing_key_and_an_open_state_dir_fail_with_their_fixes(tmp_path: Path) -> None:
    config, state = _config(tmp_path / "config.yaml"), tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    args = ("--host", "--config", str(config), "--state-dir", str(state))
    code, out = await doctor(*args)
    assert code == 1
    key = _line(out, "FAIL  key for gpt-4o-mini")
    assert "OPENAI_API_KEY" in key and "fix: set OPENAI_API_KEY in the sidecar's environment" in key
    assert f"fix: chmod 700 {state}" in _line(out, "FAIL  state dir")
    assert "skip  Redis: not used" in out and "skip  PostgreSQL: not used" in out
    # Both fixed: the same command passes.
    state.chmod(0o700)
    code, out = await doctor(*args, env=_env(OPENAI_API_KEY="sk-doctor-test-not-a-real-key"))
    assert code == 0, out
    assert "ok    key for gpt-4o-mini" in out and "sk-doctor-test" not in out


@pytest.mark.timeout(120)
async def test_host_a_broken_config_is_named(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text('model_list:\n  - model_name: "*"\n    litellm_params: {model: "*"}\n')
    code, out = await doctor("--host", "--config", str(config), "--state-dir", str(tmp_path))
    assert code == 1
    assert "wildcard entries" in _line(out, "FAIL  config")


@pytest.mark.timeout(120)
async def test_host_unreachable_redis_and_postgresql_fail_with_their_fixes(tmp_path: Path) -> None:
    dead = free_port()
    code, out = await doctor(
        "--host", "--state-dir", str(tmp_path), "--redis", f"redis://127.0.0.1:{dead}/0",
        "--database", f"postgresql://u:secret-pw@127.0.0.1:{dead}/spend",
    )  # fmt: skip
    assert code == 1
    assert "fix: start redis-server there" in _line(out, f"FAIL  Redis: redis://127.0.0.1:{dead}/0")
    assert "fix: start PostgreSQL there" in _line(out, "FAIL  PostgreSQL")
    assert "secret-pw" not in out, "URLs are shown without their password"


@pytest.mark.timeout(180)
async def test_host_real_redis_and_postgresql_pass(
    tmp_path: Path, redis_server: RedisServer, postgres_server: PostgresServer
) -> None:
    tmp_path.chmod(0o700)
    database = await asyncio.to_thread(postgres_server.create_database, "doctor")
    code, out = await doctor(
        "--host", "--state-dir", str(tmp_path), "--redis", redis_server.url, "--database", database
    )
    assert "ok    Redis:" in out and "answers PING" in out, out
    assert "ok    PostgreSQL:" in out, out
    assert "ok    state dir" in out
    # The config line depends on whether this machine has the embedded model; nothing else fails.
    assert code == 0 or "FAIL  config: none, and the embedded model is not here" in out, out


@pytest.mark.timeout(240)
async def test_a_spent_budget_fails_with_the_fix(tmp_path: Path) -> None:
    """A node whose budget the ledger shows spent: doctor says so, and what to do."""
    from tests.conftest import PLANTED_KEY
    from tests.support.openai_upstream import OpenAIUpstream
    from tests.support.processes import start_sidecar_process

    async with OpenAIUpstream() as upstream:
        config = tmp_path / "config.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: m\n"
            "    litellm_params:\n"
            "      model: openai/m\n"
            f"      api_base: {upstream.url}/v1\n"
            "      api_key: os.environ/TEST_UPSTREAM_KEY\n"
            "      input_cost_per_token: 0.01\n"
            "      output_cost_per_token: 0.01\n"
            "exo_remote_settings:\n"
            "  nodes:\n"
            "    laptop: {max_budget: 0.05, budget_duration: 30d}\n"
        )
        tokens = tmp_path / "tokens"
        tokens.write_text(f"laptop {TOKEN}\n")
        tokens.chmod(0o600)
        env = {"TEST_UPSTREAM_KEY": PLANTED_KEY, "EXO_REMOTE_STATE_DIR": str(tmp_path)}
        sidecar = await asyncio.to_thread(
            start_sidecar_process, config, tmp_path / "s.log", env, "127.0.0.1:0", ["--token-file", str(tokens)]
        )
        try:
            as_laptop = _env(EXO_REMOTE_TOKEN=TOKEN)
            code, out = await doctor("--sidecar", sidecar.address, "--skip-exo", env=as_laptop)
            assert code == 0 and "ok    budget: node laptop: $0.050000 left of $0.05" in out, out
            # The ledger shows the budget spent (reservations keep live requests within it,
            # so the spending is written as an earlier run of the sidecar would have).
            await asyncio.to_thread(sidecar.stop)
            ledger = Ledger.open(tmp_path)
            try:
                await ledger.record(
                    Charge("earlier", time.time(), "laptop", "m", "m", "openai/m", 4, 2, 0.06, False, "completed")
                )
            finally:
                ledger.close()
            sidecar = await asyncio.to_thread(
                start_sidecar_process, config, tmp_path / "s2.log", env, "127.0.0.1:0", ["--token-file", str(tokens)]
            )
            code, out = await doctor("--sidecar", sidecar.address, "--skip-exo", env=as_laptop)
            assert code == 1
            check = _line(out, "FAIL  budget: node laptop:")
            assert "fix: wait for the budget to reset, or raise this node's max_budget" in check
        finally:
            await asyncio.to_thread(sidecar.stop)
