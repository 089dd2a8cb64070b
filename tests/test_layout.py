"""The floor plan stays readable: small folders, small modules, every package in README.

A newcomer finds a concern by its folder; a folder of dozens of modules, or a module of
hundreds of lines, hides it again. README's layout section is the map, so a package it
does not name is a room without a sign.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "exo_remote_engine"
MAX_MODULES_PER_FOLDER = 12
MAX_MODULE_LINES = 400


def hand_written_folders(package: Path = PACKAGE) -> list[Path]:
    skipped = {"generated", "__pycache__"}
    return sorted(d for d in [package, *package.rglob("*")] if d.is_dir() and not skipped & set(d.parts))


def crowded_folders(package: Path = PACKAGE) -> dict[str, int]:
    return {
        str(d.relative_to(package.parent)): n
        for d in hand_written_folders(package)
        if (n := len(list(d.glob("*.py")))) > MAX_MODULES_PER_FOLDER
    }


def long_modules(package: Path = PACKAGE) -> dict[str, int]:
    return {
        str(p.relative_to(package.parent)): n
        for p in package.rglob("*.py")
        if "generated" not in p.parts and (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }


def packages() -> list[str]:
    return [".".join(d.relative_to(REPO).parts) for d in hand_written_folders() if (d / "__init__.py").exists()]


def test_no_folder_holds_more_than_twelve_modules() -> None:
    crowded = crowded_folders()
    assert not crowded, f"folders over {MAX_MODULES_PER_FOLDER} modules (__init__ counted): {crowded}"


def test_no_module_is_over_400_lines() -> None:
    long = long_modules()
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_every_package_says_what_it_owns() -> None:
    for name in packages():
        init = REPO.joinpath(*name.split("."), "__init__.py")
        text = init.read_text()
        assert re.match(r'\s*"""\S', text), f"{init.relative_to(REPO)} has no docstring saying what it owns"


def _readme_layout() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"^## Layout\b.*?(?=^## |\Z)", readme, re.S | re.M)
    assert match, "README.md has no '## Layout' section"
    return match.group(0)


def test_readme_layout_names_every_package_with_its_job() -> None:
    layout = _readme_layout()
    for name in packages():
        path = "/".join(name.split(".")) + "/"
        line = next((ln for ln in layout.splitlines() if f"`{path}`" in ln), None)
        assert line is not None, f"README's layout does not name {path}"
        job = line.split(f"`{path}`", 1)[1].strip(" :-—|")
        assert len(job.split()) >= 3, f"README's layout names {path} without its job: {line!r}"


def test_the_layout_checks_can_fail(tmp_path: Path) -> None:
    """Not vacuous: a planted thirteenth module and a 401-line module are both reported."""
    package = tmp_path / "exo_remote_engine"
    crowded = package / "sidecar" / "crowded"
    crowded.mkdir(parents=True)
    for i in range(12):
        (crowded / f"m{i}.py").write_text("")
    (package / "small.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    assert crowded_folders(package) == {}
    assert long_modules(package) == {}
    (crowded / "m12.py").write_text("")
    (package / "small.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert crowded_folders(package) == {"exo_remote_engine/sidecar/crowded": 13}
    assert long_modules(package) == {"exo_remote_engine/small.py": MAX_MODULE_LINES + 1}
