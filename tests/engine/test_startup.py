"""The interpreter-startup trigger (exo_remote_engine/_startup.py), in CI: the shipped
``.pth`` line (startup/exo_remote_engine.pth) run by ``site`` in a fresh interpreter installs
the hooks exactly when ``exo.main`` is imported, against the fake exo (whose shape is pinned
to real exo's), and not with EXO_REMOTE_DISABLE=1; a failing install never stops exo.
Real exo started through the trigger is covered with EXO_SRC (tests/real_exo/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import REPO

CHILD = r"""
import json, site, sys
from tests.support import fake_exo
modules = fake_exo.build_modules()
modules["exo"].__path__ = [sys.argv[1]]  # exo.main itself is a file there, found by the normal finders
if sys.argv[3] == "broken":
    del modules["exo.models"].build_base_shard  # an exo the hooks do not fit
sys.modules.update(modules)
sys.argv = ["exo", "--inference-engine", "remote"]
import os
site.addsitedir(os.environ["STARTUP_SITE"])  # runs the .pth line
from exo_remote_engine._startup import _ExoMainFinder
armed = [type(f).__name__ for f in sys.meta_path if isinstance(f, _ExoMainFinder)]
heavy_before_main = "exo_remote_engine.engine.exo_hooks" in sys.modules
import exo.main
from exo_remote_engine.engine import exo_hooks
handler = sys.modules["exo.api.chatgpt_api"].ChatGPTAPI.handle_post_chat_completions
print(json.dumps({
    "armed": armed,
    "heavy_before_main": heavy_before_main,
    "main_ran": exo.main.RAN,
    "disarmed": not any(isinstance(f, _ExoMainFinder) for f in sys.meta_path),
    "installed": exo_hooks._installed is not None,
    "hooked": hasattr(handler, "__exo_remote_hook__"),
}))
"""


def _run(tmp_path: Path, mode: str = "normal", **env: str) -> tuple[dict[str, Any], str]:
    site_dir, exo_dir = tmp_path / "site-packages", tmp_path / "exo"
    site_dir.mkdir()
    exo_dir.mkdir()
    shutil.copy(REPO / "startup" / "exo_remote_engine.pth", site_dir)  # the file wheels install
    (exo_dir / "main.py").write_text("RAN = True\n")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("EXO_REMOTE_")}
    child_env.update({"PYTHONPATH": str(REPO), "STARTUP_SITE": str(site_dir), **env})
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(exo_dir), "", mode],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=child_env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.timeout(150)
def test_the_pth_line_installs_the_hooks_when_exo_main_is_imported(tmp_path: Path) -> None:
    report, _ = _run(tmp_path)
    assert report["armed"] == ["_ExoMainFinder"], "the .pth line armed the finder"
    assert report["heavy_before_main"] is False, "nothing of the hooks is imported before exo.main"
    assert report == {**report, "main_ran": True, "disarmed": True, "installed": True, "hooked": True}


@pytest.mark.timeout(150)
def test_exo_remote_disable_leaves_exo_as_it_ships(tmp_path: Path) -> None:
    report, _ = _run(tmp_path, EXO_REMOTE_DISABLE="1")
    assert report["main_ran"] and report["disarmed"]
    assert (report["installed"], report["hooked"]) == (False, False)


@pytest.mark.timeout(150)
def test_an_exo_the_hooks_do_not_fit_still_runs_untouched(tmp_path: Path) -> None:
    report, stderr = _run(tmp_path, mode="broken")
    assert report["main_ran"] and report["disarmed"]
    assert (report["installed"], report["hooked"]) == (False, False), "all or nothing: nothing"
    assert "build_base_shard" in stderr, stderr[-2000:]
