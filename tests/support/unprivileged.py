"""Run a check as an unprivileged user, for tests of permissions when the suite runs as root.

Root reads any file, so "unreadable file" tests would test nothing in CI (which runs as
root). :func:`call_unprivileged` forks, drops the child to ``nobody`` (groups, gid, uid; no
exec, so the interpreter under root's home stays usable) and returns what the function
returned there. The child cannot import modules from root's home: call the function once
in the parent first. As any other user it just calls the function.
"""

from __future__ import annotations

import os
import pwd
import select
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def call_unprivileged(function: Callable[[], str], timeout_s: float = 60.0) -> str:
    """``function()`` as ``nobody`` when we are root (else as ourselves); an exception it
    raises comes back as ``"Name: message"``. A child that hangs is killed and fails."""
    if os.geteuid() != 0:
        try:
            return function()
        except Exception as error:
            return f"{type(error).__name__}: {error}"
    nobody = pwd.getpwnam("nobody")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, run, report, exit without running the parent's cleanups
        code = 0
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            assert os.geteuid() == nobody.pw_uid
            result = function()
        except BaseException as error:
            result = f"{type(error).__name__}: {error}"
        try:
            os.write(write_fd, result.encode("utf-8", "replace"))
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([read_fd], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"the unprivileged child did not answer within {timeout_s}s")
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    return b"".join(chunks).decode("utf-8")


@contextmanager
def reachable_dir() -> Iterator[Path]:
    """A fresh directory under the system temp dir that any user may traverse (0711), so an
    unprivileged reader meets only the permissions of the file itself."""
    directory = Path(tempfile.mkdtemp(prefix="exo-remote-test-perm-"))
    directory.chmod(0o711)
    try:
        yield directory
    finally:
        for child in directory.iterdir():
            child.chmod(0o600)
            child.unlink()
        directory.rmdir()
