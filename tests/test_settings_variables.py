"""The environment table (docs/operating.md), the two settings objects and the code agree.

Every ``EXO_REMOTE_*`` variable a user sets is read by exactly one settings object per
side (:mod:`exo_remote_engine.sidecar.serving.settings`, :mod:`exo_remote_engine.engine.settings`);
The table in docs/operating.md is what users read. A variable added to one and not the other fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exo_remote_engine.engine import settings as engine_settings
from exo_remote_engine.engine.exo_argv import ADDON_FLAGS
from exo_remote_engine.sidecar.serving import settings as sidecar_settings

REPO = Path(__file__).resolve().parents[1]
SIDECAR = set(sidecar_settings.VARIABLES) | set(sidecar_settings.INTERNAL_VARIABLES)
ENGINE = set(engine_settings.VARIABLES)


def readme_table() -> dict[str, set[str]]:
    """Variable -> the readers its row names (``sidecar``, ``exo node``, ``tests`` ...)."""
    text = (REPO / "docs" / "operating.md").read_text()
    section = text[text.index("## Environment variables") :]
    end = section.find("\n## ", 5)
    section = section[: end if end > 0 else None]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = line.split("|")
        if not line.startswith("| `") or len(cells) < 4:
            continue
        readers = {reader.strip() for reader in cells[2].split(",")}
        for name in re.findall(r"`(EXO_REMOTE_\w+)`", cells[1]):
            rows[name] = readers
    return rows


def test_the_table_is_read() -> None:
    rows = readme_table()
    assert rows["EXO_REMOTE_LISTEN"] == {"sidecar"} and "exo node" in rows["EXO_REMOTE_SIDECAR"]


def test_every_setting_is_in_the_readme_table() -> None:
    rows = readme_table()
    assert not (SIDECAR | ENGINE) - set(rows), "read by a settings object, missing from docs/operating.md's table"


@pytest.mark.parametrize(
    ("reader", "variables"),
    [("sidecar", SIDECAR), ("exo node", ENGINE), ("`exo-remote`", ENGINE)],
)
def test_every_row_is_read_by_the_settings_of_the_side_it_names(reader: str, variables: set[str]) -> None:
    rows = readme_table()
    named = {name for name, readers in rows.items() if reader in readers}
    assert named, f"no docs/operating.md row names {reader}"
    assert not named - variables, f"docs/operating.md says {reader} reads these, its settings object does not"


def test_rows_not_for_tests_name_a_reader_with_settings() -> None:
    unread = {n for n, readers in readme_table().items() if "tests" not in readers and n not in SIDECAR | ENGINE}
    assert not unread, "docs/operating.md documents variables no settings object reads"


def test_the_addon_flags_set_engine_settings() -> None:
    assert set(ADDON_FLAGS.values()) <= ENGINE


def test_an_undeclared_variable_cannot_be_read() -> None:
    with pytest.raises(KeyError):
        sidecar_settings.Environment({}).get("EXO_REMOTE" + "_NOT_A_SETTING")  # split: not a real variable


def test_engine_settings_read_the_environment_given() -> None:
    env = {
        "EXO_REMOTE_SIDECAR": "10.0.0.5",
        "EXO_REMOTE_TOKEN": "t0ken",
        "EXO_REMOTE_TLS_CA": "/ca.pem",
        "EXO_REMOTE_DEADLINE_S": "12.5",
        "EXO_REMOTE_DISABLE": "1",
        "EXO_REMOTE_LOG_LEVEL": "debug",
    }
    settings = engine_settings.EngineSettings.from_env(env)
    assert settings.sidecar == "10.0.0.5" and settings.token == "t0ken"
    assert settings.tls_ca == Path("/ca.pem") and settings.tls_cert is None
    assert settings.deadline_s == 12.5 and settings.disabled and settings.log_level == "debug"
    assert not engine_settings.EngineSettings.from_env({"EXO_REMOTE_DISABLE": "0"}).disabled
    assert engine_settings.EngineSettings.from_env({}).deadline_s == 900.0


def test_the_code_reads_user_variables_only_through_the_settings_objects() -> None:
    """A literal ``environ.get("EXO_REMOTE_...")`` outside the settings modules bypasses them."""
    read = re.compile(r"environ(?:\.get\(|\[)\s*\"(EXO_REMOTE_\w+)\"")
    settings_modules = {"sidecar/serving/settings.py", "engine/settings.py"}
    stray = {}
    for path in (REPO / "exo_remote_engine").rglob("*.py"):
        rel = str(path.relative_to(REPO / "exo_remote_engine"))
        if rel in settings_modules:
            continue
        names = set(read.findall(path.read_text())) - set(sidecar_settings.INTERNAL_VARIABLES)
        if names:
            stray[rel] = sorted(names)
    assert not stray, f"EXO_REMOTE_* read outside the settings objects: {stray}"
