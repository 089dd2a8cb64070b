"""With CI=true a skip for a missing real part fails the run; only EXO_SRC's stays a skip.

A tiny test file runs in a child pytest with the suite's plugin (tests/support/real_parts.py):
the same skips are skips on a developer's machine and failures in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO
from tests.support.real_parts import EXO_SRC_UNSET

SAMPLE = f'''
import pytest
from tests.support.real_parts import missing

@pytest.mark.skipif(True, reason="redis-server not found")
def test_marker_skip():
    pass

def test_missing_part():
    missing("openssl not found")

def test_exo_skip():
    pytest.skip("{EXO_SRC_UNSET} real classic exo not available")

def test_runs():
    pass
'''


def _run(tmp_path: Path, ci: str | None) -> str:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.support.real_parts", "-p", "no:cacheprovider", "-rsf",
         "-q", "test_sample.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return result.stdout + result.stderr


@pytest.mark.timeout(150)
def test_without_ci_a_missing_part_skips(tmp_path: Path) -> None:
    out = _run(tmp_path, None)
    assert "1 passed, 3 skipped" in out, out


@pytest.mark.timeout(150)
def test_in_ci_a_missing_part_fails_and_exo_src_still_skips(tmp_path: Path) -> None:
    out = _run(tmp_path, "true")
    # The marker's skip fails in setup (an error), missing() in the call (a failure).
    assert "1 failed, 1 passed, 1 skipped, 1 error" in out, out
    assert "CI=true: a missing real part is a failure, not a skip (redis-server not found)" in out, out
    assert "CI=true: a missing real part is a failure, not a skip (openssl not found)" in out, out
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 1 and EXO_SRC_UNSET in skips[0], out
