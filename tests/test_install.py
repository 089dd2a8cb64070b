"""`pip install .` into classic exo's environment, the user's way, leaves exo's pins alone.

A fresh venv on the Python exo supports (3.12 or 3.11) gets classic exo's requirements
(scripts/exo-requirements.txt), then exactly the README's command `pip install .` with no
constraints file. pip does not weigh installed packages' requirements when it resolves a new
one, so a dependency whose newest release needs a newer protobuf silently replaces exo's
5.28.1; only a before/after freeze shows it. Takes 1-3 minutes.

It runs offline: pip reads only ``.venvs/wheelhouse``, which scripts/bootstrap.sh fills with
exo's pins and, resolved apart and unconstrained, this project's dependencies (the newest
releases, as pip picks them for new dependencies) and its build backend.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.real_parts import missing

REPO = Path(__file__).resolve().parents[1]
EXO_REQUIREMENTS = REPO / "scripts" / "exo-requirements.txt"
WHEELHOUSE = REPO / ".venvs" / "wheelhouse"
# The same candidates as scripts/bootstrap.sh (EXO_PYTHON_BIN first).
PYTHON_CANDIDATES = ("/root/.pyenv/versions/3.12*/bin/python3", "python3.12", "python3.11", "python3")
# What never belongs in the copied source tree (environments, caches, build output).
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".venvs", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "bench-results"
)

pytestmark = [pytest.mark.slow_install, pytest.mark.timeout(900)]


def _exo_python() -> str:
    """An interpreter classic exo supports (3.11/3.12), found as bootstrap.sh finds it."""
    candidates = [os.environ["EXO_PYTHON_BIN"]] if os.environ.get("EXO_PYTHON_BIN") else []
    for pattern in PYTHON_CANDIDATES:
        if "*" in pattern:
            candidates += sorted(str(p) for p in Path("/").glob(pattern.lstrip("/")))
        else:
            candidates.append(pattern)
    probe = "import sys; assert sys.version_info[:2] in ((3, 11), (3, 12))"
    for candidate in candidates:
        try:
            ok = subprocess.run([candidate, "-c", probe], capture_output=True, timeout=30, check=False)
        except (FileNotFoundError, PermissionError):
            continue
        if ok.returncode == 0:
            return candidate
    pytest.fail(f"no Python 3.11/3.12 for classic exo's environment (tried {candidates}); set EXO_PYTHON_BIN")


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_CONSTRAINT", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INDEX"] = "1"  # offline: the wheelhouse only
    env["PIP_FIND_LINKS"] = str(WHEELHOUSE)
    return env


def _run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, env=_pip_env(), capture_output=True, text=True, timeout=800, check=False)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _freeze(pip: Path, cwd: Path) -> dict[str, str]:
    """name (normalised) -> the freeze line's version part (or the whole line for URLs)."""
    packages: dict[str, str] = {}
    for line in _run([str(pip), "freeze", "--all"], cwd).splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
        elif " @ " in line:
            name, version = line.split(" @ ", 1)
        else:
            continue
        packages[name.strip().lower().replace("_", "-")] = version.strip()
    return packages


def _exo_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in EXO_REQUIREMENTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_pip_install_dot_keeps_every_exo_pin(tmp_path: Path) -> None:
    if not (WHEELHOUSE / ".stamp").is_file():
        missing(f"no wheelhouse at {WHEELHOUSE}: run scripts/bootstrap.sh (the test installs offline)")
    source = tmp_path / "exo-remote-engine"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)  # the checkout as a user has it, built apart
    venv = tmp_path / "exo-env"
    _run([_exo_python(), "-m", "venv", str(venv)], tmp_path)
    pip, python = venv / "bin" / "pip", venv / "bin" / "python"
    _run([str(pip), "install", "-q", "-r", str(EXO_REQUIREMENTS)], tmp_path)
    before = _freeze(pip, tmp_path)
    pins = _exo_pins()
    assert {name: before.get(name) for name in pins} == pins, "exo's requirements did not install as pinned"

    _run([str(pip), "install", "."], source)  # exactly the README's command

    after = _freeze(pip, tmp_path)
    changed = {n: f"{before[n]} -> {after.get(n, 'removed')}" for n in before if after.get(n) != before[n]}
    assert not changed, f"`pip install .` changed packages of exo's environment: {changed}"
    assert "exo-remote-engine" in after
    assert "litellm" not in after, "the base install pulled LiteLLM"
    _run([str(pip), "check"], tmp_path)
    probe = (
        "import exo_remote_engine.engine_adapter, exo_remote_engine.engine.exo_api, "
        "exo_remote_engine.engine.exo_hooks, exo_remote_engine.cli.main, psutil, google.protobuf, grpc; "
        "print(google.protobuf.__version__, grpc.__version__)"
    )
    versions = _run([str(python), "-c", probe], tmp_path).split()
    assert versions == [pins["protobuf"], pins["grpcio"]]
