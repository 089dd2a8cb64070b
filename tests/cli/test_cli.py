"""The command-line tools as a newcomer meets them: each command runs as a subprocess (the
installed console script) against real sidecars on 127.0.0.1, plain, TLS and token-guarded.

One test per trap: a sidecar port given as exo's API, a TLS sidecar dialled in plaintext, a
missing token, an address without a port or with ``http://``, ``--sidecar`` after the
command, ``exo-remote-node`` without exo, ``chat`` waiting for its first token, help texts,
and undocumented ``EXO_REMOTE_*`` variables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import pty
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from exo_remote_engine.cli.main import build_parser as cli_parser
from exo_remote_engine.engine.launcher import build_parser as node_parser
from exo_remote_engine.server import RunningSidecar
from exo_remote_engine.server import build_parser as sidecar_parser
from exo_remote_engine.sidecar.control.auth import ServerTLS
from tests.support.certs import Pki, make_pki, openssl_skip_reason
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.sidecars import InProcessSidecars
from tests.support.topology import box_of, remote_node, serve_topology

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOKEN = "cli-test-token-0123456789"
needs_openssl = pytest.mark.skipif(openssl_skip_reason() is not None, reason=openssl_skip_reason() or "")


def _env(**extra: str) -> dict[str, str]:
    """The caller's environment without any EXO_REMOTE_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXO_REMOTE_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env.update(extra)
    return env


async def run(
    command: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60, stderr: int | None = None
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the installed console script ``command``."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / command),
        *args,
        env=env or _env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if stderr is None else stderr,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), (err or b"").decode()


def _no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def sidecars(in_process_sidecars: InProcessSidecars) -> Callable[..., Awaitable[RunningSidecar]]:
    """Start in-process sidecars on the embedded model; stopped at teardown."""
    return in_process_sidecars.start


# --- topology --api pointed at the wrong kind of port ----------------------------------------


@pytest.mark.timeout(60)
async def test_topology_api_at_a_sidecar_port_says_it_is_a_grpc_port(sidecars: Callable[..., Any]) -> None:
    sidecar = await sidecars()
    code, out, err = await run("exo-remote", "topology", "--api", sidecar.address, "--timeout", "3")
    assert code == 1 and out == ""
    assert "that is a gRPC port" in err and "not exo's HTTP API" in err and "52415" in err, err
    _no_traceback(err)


@needs_openssl
@pytest.mark.timeout(60)
async def test_topology_api_at_a_tls_sidecar_port_says_it_speaks_tls(sidecars: Callable[..., Any], pki: Pki) -> None:
    sidecar = await sidecars(tls=ServerTLS(pki.server.cert, pki.server.key))
    code, out, err = await run("exo-remote", "topology", "--api", sidecar.address, "--timeout", "3")
    assert code == 1 and out == ""
    assert "speaks TLS" in err and "not exo's plain HTTP API" in err, err
    _no_traceback(err)


# --- TLS expected, token missing --------------------------------------------------------------


@needs_openssl
@pytest.mark.timeout(60)
async def test_models_of_a_tls_sidecar_without_a_ca_says_tls_expected(sidecars: Callable[..., Any], pki: Pki) -> None:
    sidecar = await sidecars(tls=ServerTLS(pki.server.cert, pki.server.key))
    code, out, err = await run("exo-remote", "--sidecar", sidecar.address, "models")
    assert code == 1 and out == ""
    assert f"TLS expected: the sidecar at {sidecar.address} speaks TLS; set EXO_REMOTE_TLS_CA" in err, err
    # ... and with the CA it works, so the hint was right.
    code, out, err = await run(
        "exo-remote", "--sidecar", sidecar.address, "models", env=_env(EXO_REMOTE_TLS_CA=str(pki.ca))
    )
    assert code == 0 and "embedded-echo" in out, err


@pytest.mark.timeout(60)
async def test_models_without_the_token_says_token_missing(sidecars: Callable[..., Any]) -> None:
    sidecar = await sidecars(tokens=(TOKEN,))
    code, out, err = await run("exo-remote", "--sidecar", sidecar.address, "models")
    assert code == 1 and out == ""
    assert "requires a token and none is set: set EXO_REMOTE_TOKEN" in err, err
    code, out, err = await run("exo-remote", "--sidecar", sidecar.address, "models", env=_env(EXO_REMOTE_TOKEN="no"))
    assert code == 1 and "rejected the token" in err and "no" not in out, err
    assert TOKEN not in err
    code, out, err = await run("exo-remote", "--sidecar", sidecar.address, "models", env=_env(EXO_REMOTE_TOKEN=TOKEN))
    assert code == 0 and "embedded-echo" in out, err


@needs_openssl
@pytest.mark.timeout(60)
async def test_topology_box_of_a_tls_sidecar_without_credentials_says_tls_expected(
    sidecars: Callable[..., Any], pki: Pki
) -> None:
    tls_sidecar = await sidecars(tls=ServerTLS(pki.server.cert, pki.server.key))
    guarded = await sidecars(tokens=(TOKEN,))
    topology = {
        "nodes": {
            "tls-node": remote_node(tls_sidecar.address, "remote: 1/1 models ready (embedded-echo)"),
            "token-node": remote_node(guarded.address, "remote: 1/1 models ready (embedded-echo)"),
        },
        "peer_graph": {},
        "active_node_id": None,
    }
    runner, url = await serve_topology(topology)
    try:
        code, out, err = await run("exo-remote", "topology", "--api", url, "--timeout", "3", "--width", "120")
    finally:
        await runner.cleanup()
    assert code == 0, err

    def said(node: str) -> str:  # a box's text, its wrapped lines joined
        return " ".join(" ".join(line.strip("│+| ").split()) for line in box_of(out, node).splitlines())

    assert "sidecar unreachable: TLS expected: set EXO_REMOTE_TLS_CA" in said("tls-node"), out
    assert "token missing: set EXO_REMOTE_TOKEN" in said("token-node"), out
    _no_traceback(out, err)


# --- addresses --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_sidecar_listen_without_a_port_means_50505() -> None:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "exo-remote-sidecar"),
        "--listen",
        "127.0.0.1",
        "--no-discover",
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    seen = ""
    try:
        # Either it listens on 50505 or 50505 is taken (another sidecar on this machine):
        # both name the port it used, which must not be gRPC's 443.
        while "50505" not in seen and not process.stdout.at_eof():
            seen += (await asyncio.wait_for(process.stdout.readline(), 45)).decode()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 20)
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert "127.0.0.1:50505" in seen and ":443" not in seen, seen


@pytest.mark.timeout(60)
async def test_sidecar_flag_and_variable_without_a_port_dial_50505() -> None:
    # A listener of our own on 127.0.0.2:50505 (all of 127/8 is loopback; nothing else uses
    # that address) sees the dial; it hangs up, so the command fails naming the address.
    dialled: list[str] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialled.append("127.0.0.2:50505")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.2", 50505)
    try:
        for args, env in (
            (["--sidecar", "127.0.0.2", "models"], _env()),
            (["models"], _env(EXO_REMOTE_SIDECAR="127.0.0.2")),
        ):
            dialled.clear()
            code, _out, err = await run("exo-remote", *args, env=env)
            assert dialled, (args, "the command never dialled 127.0.0.2:50505", err)
            assert code == 1 and "127.0.0.2:50505" in err and ":443" not in err, (args, code, err)
            _no_traceback(err)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.timeout(60)
async def test_an_http_scheme_is_refused_with_the_address_to_use() -> None:
    code, _, err = await run("exo-remote", "--sidecar", "http://127.0.0.1:50999", "models")
    assert code == 2 and "drop the http:// scheme" in err and "--sidecar 127.0.0.1:50999" in err, err
    code, _, err = await run("exo-remote", "models", env=_env(EXO_REMOTE_SIDECAR="https://sidecar.example:7"))
    assert code == 2 and "drop the https:// scheme" in err and "EXO_REMOTE_SIDECAR=sidecar.example:7" in err, err
    code, _, err = await run("exo-remote-sidecar", "--listen", "http://127.0.0.1:50999", "--no-discover")
    assert code == 2 and "drop the http:// scheme" in err and "--listen 127.0.0.1:50999" in err, err
    _no_traceback(err)


@pytest.mark.timeout(60)
async def test_sidecar_flag_is_accepted_after_the_command(sidecars: Callable[..., Any]) -> None:
    sidecar = await sidecars()
    code, out, err = await run("exo-remote", "models", "--sidecar", sidecar.address)
    assert code == 0 and "embedded-echo" in out, err
    # After the command it wins over one given before it (the nearer one, as people expect).
    code, out, err = await run("exo-remote", "--sidecar", "127.0.0.1:1", "models", "--sidecar", sidecar.address)
    assert code == 0 and "embedded-echo" in out, err


# --- exo-remote-node without exo ------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_exo_remote_node_help_without_exo_is_help_not_a_traceback() -> None:
    if importlib.util.find_spec("exo") is not None:
        pytest.skip("exo is installed in this environment; this test needs one without it")
    code, out, err = await run("exo-remote-node", "--help")
    assert code == 0, err
    assert "--sidecar" in out and "--sidecar-tls-ca" in out and "default" in out
    assert "classic exo is not installed" in err
    code, out, err = await run("exo-remote-node", "--sidecar", "127.0.0.1:50505")
    assert code == 1 and "classic exo is not installed" in err, err
    _no_traceback(out, err)


# --- chat shows that it waits ----------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_chat_shows_it_is_waiting_for_the_first_token_on_a_terminal_only(
    upstream: OpenAIUpstream, sidecar_for: Callable[..., Any]
) -> None:
    upstream.scenarios["slow-start"] = Scenario(chunks=["late ", "reply"], stall_before_first_byte_s=1.5)
    sidecar = await sidecar_for(upstream, "slow-start")
    args = ("--sidecar", sidecar.address, "chat", "--model", "slow-start", "hi")
    primary, secondary = pty.openpty()  # stderr is a terminal, stdout a pipe
    try:
        code, out, _ = await run("exo-remote", *args, stderr=secondary)
        os.close(secondary)
        secondary = -1
        terminal = b""
        with contextlib.suppress(OSError):  # EIO once everything written has been read
            while chunk := os.read(primary, 65536):
                terminal += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    shown = terminal.decode(errors="replace")
    assert code == 0 and out.strip() == "late reply", (out, shown)
    assert "waiting for slow-start's first token" in shown, shown
    assert "finish_reason=stop" in shown.split("first token")[-1], "the line is cleared before the reply"
    # Not a terminal: nothing but the reply and its summary.
    code, out, err = await run("exo-remote", *args)
    assert code == 0 and out.strip() == "late reply"
    assert "waiting" not in err and "\r" not in err, err


# --- help texts ------------------------------------------------------------------------------


def _options(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    """Every optional flag of ``parser`` and of its subcommands, with the parser's name."""
    found: list[tuple[str, argparse.Action]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _options(sub)
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            found.append((parser.prog, action))
    return found


@pytest.mark.timeout(120)
async def test_help_texts_give_every_flag_help_and_a_default_and_no_rst() -> None:
    for parser in (cli_parser(), sidecar_parser(), node_parser()):
        for prog, action in _options(parser):
            flag = "/".join(action.option_strings)
            assert action.help, f"{prog} {flag} has no help"
            assert "default" in action.help, f"{prog} {flag} does not say its default: {action.help!r}"
    commands = [
        ("exo-remote", "--help"),
        ("exo-remote", "models", "--help"),
        ("exo-remote", "chat", "--help"),
        ("exo-remote", "topology", "--help"),
        ("exo-remote-sidecar", "--help"),
        ("exo-remote-node", "--help"),
    ]
    for command, *args in commands:
        code, out, err = await run(command, *args)
        assert code == 0, (command, args, err)
        assert "``" not in out and ":class:" not in out and ":func:" not in out, (command, args, out)
        _no_traceback(out, err)
        if command == "exo-remote":
            assert "EXO_REMOTE_TOKEN" in out and "EXO_REMOTE_TLS_CA" in out, (args, out)


def test_every_exo_remote_variable_the_code_reads_is_documented_in_the_readme() -> None:
    readme = "".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    pattern = re.compile(r"\bEXO_REMOTE_[A-Z0-9_]*[A-Z0-9]\b")
    places: dict[str, set[str]] = {}
    for folder in ("exo_remote_engine", "scripts", "startup", "tests", "benchmarks", ".ci"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in ("", ".py", ".sh", ".toml", ".txt", ".start", ".pth"):
                for name in pattern.findall(path.read_text(errors="replace")):
                    places.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert "EXO_REMOTE_SIDECAR" in places and "EXO_REMOTE_TOKEN" in places  # the scan sees the code
    missing = {name: sorted(where) for name, where in places.items() if f"`{name}`" not in readme}
    assert not missing, f"EXO_REMOTE_* variables read in the code but not in README.md or docs/: {missing}"
