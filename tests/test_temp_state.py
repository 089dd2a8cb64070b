"""A test run leaves nothing in the temp dir: the state folder tests/conftest.py makes for
the sidecars' ledgers goes with the run (it was left behind, 16 MB, on every run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.processes import REPO


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EXO_REMOTE_STATE_DIR"}
    env["TMPDIR"] = str(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip


def test_a_run_removes_its_state_folder(tmp_path: Path) -> None:
    # Importing tests/conftest.py made the folder; the run's end must take it away.
    result = _pytest(tmp_path, "--collect-only", "tests/test_layout.py")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("exo-remote-test-state-*")) == []


def test_a_state_dir_given_by_the_caller_is_kept(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep").write_text("x")
    env_dir = {"EXO_REMOTE_STATE_DIR": str(mine)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "tests/test_layout.py"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, **env_dir, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]
    assert (mine / "keep").read_text() == "x"
    assert list(tmp_path.glob("exo-remote-test-state-*")) == []
