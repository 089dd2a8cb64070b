"""The token file fails closed (issue 11, item 2).

Grammar: ``name token`` lines, full-line ``#`` comments, blank lines, and a ``# comment``
after the token (separated by blanks). Anything else stops the sidecar naming the file
and the line, never echoing the line (it may hold a secret); so do an empty token set,
a repeated name and a repeated token. A file others may read is reported like ssh does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.sidecar.config.loader import ConfigError
from exo_remote_engine.sidecar.config.token_file import load_token_file
from tests.support.configs import write_config
from tests.support.harness import chat_request, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream
from tests.support.processes import REPO, start_sidecar_process

TOKEN_A = "tokA-0123456789abcdef"
TOKEN_B = "tokB-0123456789abcdef"
SECRETISH = "s3cret-ZZZ-0123456789"


def _write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_comments_blank_lines_and_trailing_comments(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"# nodes of the lab\n\n   \nnode-a {TOKEN_A} # laptop\n\tnode-b\t{TOKEN_B}\t#desk\r\n  # indented comment\n",
    )
    assert load_token_file(path) == {"node-a": TOKEN_A, "node-b": TOKEN_B}


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        (f"{SECRETISH}\n", 1, "one field"),
        (f"# ok\nnode-a # {SECRETISH}\n", 2, "without a token"),
        (f"node-a {TOKEN_A}\nnode-b {SECRETISH} laptop\n", 2, "3 fields"),
        (f"node a {SECRETISH}\n", 1, "3 fields"),
        (f"node/a {SECRETISH}\n", 1, "node name"),
        (f"-node {SECRETISH}\n", 1, "node name"),
        (f"node-a {SECRETISH}é\n", 1, "visible ASCII"),
    ],
    ids=[
        "bare-token",
        "name-then-comment",
        "trailing-word",
        "name-with-blank",
        "slash-in-name",
        "dash-first",
        "non-ascii",
    ],
)
def test_malformed_lines_are_startup_errors_naming_file_and_line(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_token_file(path)
    message = str(caught.value)
    assert f"{path}: line {line}:" in message and problem in message, message
    assert SECRETISH not in message, "the error must not echo what may be a token"


@pytest.mark.parametrize("text", ["", "\n\n", "# only comments\n# node-a tokA-0123456789abcdef\n"])
def test_a_file_without_tokens_is_an_error_never_no_auth(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="no tokens"):
        load_token_file(_write(tmp_path, text))


def test_a_repeated_name_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, f"node-a {TOKEN_A}\n\nnode-a {TOKEN_B}\n")
    with pytest.raises(ConfigError, match=r"line 3: node name 'node-a' already has a token on line 1"):
        load_token_file(path)


def test_a_repeated_token_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, f"node-a {TOKEN_A}\nnode-b {TOKEN_A}\n")
    with pytest.raises(ConfigError, match=r"line 2: the same token as line 1") as caught:
        load_token_file(path)
    assert TOKEN_A not in str(caught.value)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o400, False), (0o640, True), (0o644, True)])
def test_a_file_others_may_read_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: bool
) -> None:
    caplog.set_level(logging.WARNING)
    load_token_file(_write(tmp_path, f"node-a {TOKEN_A}\n", mode))
    reported = [r for r in caplog.records if "too open" in r.getMessage()]
    assert bool(reported) == warned, caplog.text
    if warned:
        assert f"{mode:04o}" in reported[0].getMessage() and "chmod 600" in reported[0].getMessage()


@pytest.mark.timeout(90)
async def test_trailing_comment_is_never_the_token_and_the_nodes_rules_hold(
    upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    """The line of the report: ``node-a tokA-... # laptop`` once made ``node-a`` the token,
    refused the real one and dropped node-a's rules."""
    config = write_config(
        tmp_path / "c.yaml",
        upstream.url,
        ["open-model", "closed-model"],
        "  nodes:\n    node-a: {allowed_models: ['open-*']}\n",
    )
    tokens = _write(tmp_path, f"node-a {TOKEN_A} # laptop\n")
    sidecar = await asyncio.to_thread(
        start_sidecar_process,
        config,
        tmp_path / "sidecar.log",
        {"TEST_UPSTREAM_KEY": "k"},
        "127.0.0.1:0",
        ["--token-file", str(tokens)],
    )
    try:
        for wrong in ("node-a", "#", "laptop"):
            client = sidecar_client(sidecar.address, token=wrong)
            with pytest.raises(RemoteError) as caught:
                await client.list_models()
            assert caught.value.reason is Reason.UNAUTHENTICATED, wrong
            await client.close()
        client = sidecar_client(sidecar.address, token=TOKEN_A, deadline_s=10)
        listing = await client.list_models()
        assert [m.alias for m in listing.models] == ["open-model"], "node-a's rules are in force"
        with pytest.raises(RemoteError) as caught:
            async for _ in client.generate(chat_request("closed-model")):
                pass
        assert caught.value.reason is Reason.PERMISSION_DENIED
        await client.close()
    finally:
        await asyncio.to_thread(sidecar.stop)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("text", "expected"),
    [("# nobody yet\n", "no tokens"), (f"node-a {TOKEN_A}\nnode-a {TOKEN_B}\n", "line 2")],
    ids=["comments-only", "duplicate-name"],
)
def test_the_command_refuses_to_start_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    tokens = _write(tmp_path, text)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "exo_remote_engine.server",
            "--listen",
            "127.0.0.1:0",
            "--no-discover",
            "--token-file",
            str(tokens),
        ],
        cwd=REPO,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "configuration error" in result.stderr and str(tokens) in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stdout
    assert TOKEN_B not in result.stderr
