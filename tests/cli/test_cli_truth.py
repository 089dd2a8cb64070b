"""Commands that tell the truth (issue #22 §2), each run as a subprocess: ``chat`` never
leaves a reply to run to the context limit (a default --max-tokens, said in its help),
``usage --sidecar`` shows that sidecar's ledger over an RPC for its master key only, and
``models`` on a no-config sidecar with discovery on shows the ready models and one
line per not-ready reason, ``--all`` every model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exo_remote_engine.cli.main import DEFAULT_CHAT_MAX_TOKENS
from tests.conftest import PLANTED_KEY
from tests.support.configs import write_proxy_config
from tests.support.openai_upstream import OpenAIUpstream
from tests.support.processes import REPO, SidecarProcess, start_sidecar_process

# Provider keys blanked, so discovery finds none whatever this machine's environment holds.
NO_KEYS = {name: "" for name in os.environ if name.endswith("_API_KEY")}


def cli(*args: str, timeout: float = 120, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXO_REMOTE_")}
    env.update({"PYTHONPATH": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env_extra or {})})
    done = subprocess.run(
        [sys.executable, "-m", "exo_remote_engine.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=False,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture(scope="module")
def upstream_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenAIUpstream, SidecarProcess]]:
    workdir = tmp_path_factory.mktemp("truth")
    with OpenAIUpstream.in_thread() as upstream:
        config = write_proxy_config(workdir / "config.yaml", upstream.url, ["m"])
        sidecar = start_sidecar_process(config, workdir / "sidecar.log", env={"TEST_UPSTREAM_KEY": PLANTED_KEY})
        try:
            yield upstream, sidecar
        finally:
            sidecar.stop()


@pytest.mark.timeout(180)
def test_chat_sends_its_default_max_tokens_and_says_so(upstream_sidecar: tuple[OpenAIUpstream, SidecarProcess]) -> None:
    upstream, sidecar = upstream_sidecar
    assert 0 < DEFAULT_CHAT_MAX_TOKENS <= 4096
    assert f"(default: {DEFAULT_CHAT_MAX_TOKENS})" in " ".join(cli("chat", "--help").stdout.split())
    upstream.clear()
    done = cli("--sidecar", sidecar.address, "chat", "hello there")
    assert done.returncode == 0, done.stderr
    [request] = upstream.requests_for("m")
    assert request.body is not None and request.body["max_tokens"] == DEFAULT_CHAT_MAX_TOKENS
    # Explicit values pass through; 0 leaves the cap to the provider.
    upstream.clear()
    assert cli("--sidecar", sidecar.address, "chat", "--max-tokens", "7", "hi").returncode == 0
    assert upstream.requests_for("m")[0].body["max_tokens"] == 7  # type: ignore[index]
    upstream.clear()
    assert cli("--sidecar", sidecar.address, "chat", "--max-tokens", "0", "hi").returncode == 0
    assert "max_tokens" not in (upstream.requests_for("m")[0].body or {})
    bad = cli("chat", "--max-tokens", "-3", "hi")
    assert bad.returncode == 2 and "must be 0 or more" in bad.stderr


MASTER = "sk-master-usage-0123456789"
NODE_TOKEN = "node-usage-token-0123456789"
ADMIN_TOKEN = "ops-usage-token-0123456789"


def cli_as(token: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, env_extra={"EXO_REMOTE_TOKEN": token} if token else {})


@pytest.mark.timeout(240)
def test_usage_over_the_admin_rpc_for_admins_only(tmp_path: Path) -> None:
    with OpenAIUpstream.in_thread() as upstream:
        config = write_proxy_config(tmp_path / "config.yaml", upstream.url, ["m"])
        config.write_text(
            config.read_text()
            + f"general_settings:\n  master_key: {MASTER}\n"
            + "exo_remote_settings:\n  nodes:\n    ops: {role: admin}\n    laptop: {rpm: 1000}\n"
        )
        tokens = tmp_path / "tokens"
        tokens.write_text(f"laptop {NODE_TOKEN}\nops {ADMIN_TOKEN}\n")
        tokens.chmod(0o600)
        env = {"TEST_UPSTREAM_KEY": PLANTED_KEY, "EXO_REMOTE_STATE_DIR": str(tmp_path)}
        sidecar = start_sidecar_process(
            config, tmp_path / "sidecar.log", env=env, extra_args=["--token-file", str(tokens)]
        )
        try:
            assert cli_as(NODE_TOKEN, "--sidecar", sidecar.address, "chat", "--max-tokens", "5", "hi").returncode == 0
            admin = cli_as(MASTER, "usage", "--sidecar", sidecar.address)
            assert admin.returncode == 0, admin.stderr
            [row] = [line.split() for line in admin.stdout.splitlines() if line.startswith("laptop ")]
            assert row[:3] == ["laptop", "m", "1"], admin.stdout
            assert f"{sidecar.address}: {tmp_path}" in admin.stdout, "says whose ledger it read"
            assert MASTER not in admin.stdout + admin.stderr
            # A node with role: admin may read it too (the status page's admins).
            by_role = cli_as(ADMIN_TOKEN, "usage", "--sidecar", sidecar.address)
            assert by_role.returncode == 0, by_role.stderr
            assert [line.split()[:3] for line in by_role.stdout.splitlines() if line.startswith("laptop ")] == [
                ["laptop", "m", "1"]
            ]
            only = cli_as(MASTER, "--sidecar", sidecar.address, "usage", "--node", "nobody", "--since", "1h")
            assert only.returncode == 0 and "laptop" not in only.stdout
            # A node's own token is refused, clearly; so is no token at all.
            for token, status in ((NODE_TOKEN, "PERMISSION_DENIED"), (None, "UNAUTHENTICATED")):
                denied = cli_as(token, "usage", "--sidecar", sidecar.address)
                assert denied.returncode == 1 and denied.stdout == ""
                assert status in denied.stderr, (token is None, denied.stderr)
            assert (
                "usage is for the sidecar's admins: send its master_key, or the token of a node with role: admin"
                in cli_as(NODE_TOKEN, "usage", "--sidecar", sidecar.address).stderr
            )
            # --sidecar asks the sidecar: a local --state-dir with it is a mistake, said so.
            mixed = cli_as(MASTER, "usage", "--sidecar", sidecar.address, "--state-dir", str(tmp_path))
            assert mixed.returncode == 2 and "--state-dir and --database read here" in mixed.stderr
        finally:
            sidecar.stop()


@pytest.fixture(scope="module")
def discovering(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    workdir = tmp_path_factory.mktemp("discovering")
    sidecar = start_sidecar_process(None, workdir / "sidecar.log", env=NO_KEYS, discover=True)
    yield sidecar
    sidecar.stop()


@pytest.mark.timeout(180)
def test_models_summarises_not_ready_models_one_line_per_reason(discovering: SidecarProcess) -> None:
    done = cli("--sidecar", discovering.address, "models")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("embedded-echo *") for line in lines), done.stdout
    [header] = [i for i, line in enumerate(lines) if "more not ready (exo-remote models --all lists them):" in line]
    total = int(lines[header].split()[0])
    reasons = lines[header + 1 :]
    assert total >= 10, "a no-config sidecar with discovery on knows many hosted models"
    assert 1 <= len(reasons) < total, "one line per reason, not per model"
    assert all(line.startswith("  ") and line.rstrip().endswith(("model", "models")) for line in reasons), reasons
    assert sum(int(line.rsplit(" ", 2)[-2]) for line in reasons) == total
    assert any("OPENAI_API_KEY" in line for line in reasons), reasons
    # --all lists each of them under its reason.
    full = cli("--sidecar", discovering.address, "models", "--all")
    assert full.returncode == 0
    full_lines = full.stdout.splitlines()
    [start] = [i for i, line in enumerate(full_lines) if line == f"{total} not ready:"]
    listed = [line for line in full_lines[start + 1 :] if line.startswith("    ")]
    assert len(listed) == total and len(set(listed)) == total
