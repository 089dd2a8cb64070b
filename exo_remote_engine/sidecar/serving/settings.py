"""The sidecar's settings: one object, built from its flags and ``EXO_REMOTE_*`` variables.

Every variable a user sets for the sidecar is named in
:data:`~exo_remote_engine.sidecar.config.variables.VARIABLES` and read through its
:class:`~exo_remote_engine.sidecar.config.variables.Environment`, which refuses a name not declared
there (here, and for the ledger's default directory in ``spend``); README's environment table
is checked against :data:`VARIABLES` by a test. A flag beats its variable, which beats the
default. Programmatic users (tests, benchmarks) build :class:`SidecarSettings` directly.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exo_remote_engine.contract.addresses import AddressError, grpc_address
from exo_remote_engine.contract.redaction import url_credentials
from exo_remote_engine.sidecar.config.loader import ConfigError
from exo_remote_engine.sidecar.config.rules import Limits
from exo_remote_engine.sidecar.config.token_file import load_token_file, token_from_env
from exo_remote_engine.sidecar.config.variables import VARIABLES, Environment
from exo_remote_engine.sidecar.control.auth import ServerTLS
from exo_remote_engine.sidecar.control.limits import Clock
from exo_remote_engine.sidecar.control.shared_windows import check_redis_url
from exo_remote_engine.sidecar.discovery import ServerSpec
from exo_remote_engine.sidecar.embedded import packaged
from exo_remote_engine.sidecar.embedded.model import (
    API_KEY_ENV,
    ENDPOINT_ENV,
    LOCAL_EXTRA_HINT,
    EmbeddedModelSettings,
    local_model_available,
    runtime_available,
)
from exo_remote_engine.sidecar.ledger.spend_database import check_database_url
from exo_remote_engine.sidecar.serving.workers import WORKER_ENV

__all__ = ["INTERNAL_VARIABLES", "VARIABLES", "Environment", "SidecarSettings", "build_parser", "parse_args"]

log = logging.getLogger("exo_remote_engine.sidecar")

DEFAULT_LISTEN = "127.0.0.1:50505"
# How long one write to a client may wait (the client reads nothing) before the stream
# ends with CLIENT_STALLED; meanwhile the provider is not read (bounded merge buffer).
DEFAULT_STALL_LIMIT_S = 60.0

# Set by the sidecar for its own child processes (workers, the llama.cpp server) and read
# there, where the value is consumed; not for users.
INTERNAL_VARIABLES: Mapping[str, str] = {
    WORKER_ENV: "a worker process's index",
    ENDPOINT_ENV: "the main process's embedded model, shared with its workers",
    API_KEY_ENV: "the llama.cpp child's key, never on its command line",
}


def _fast_path_from_env() -> bool:
    return Environment().flag("EXO_REMOTE_OPENAI_FAST_PATH")


@dataclass
class SidecarSettings:
    listen: str = DEFAULT_LISTEN
    config_path: Path | None = None
    tokens: Sequence[str] = ()
    named_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)  # node name -> token
    tls: ServerTLS | None = None
    allow_insecure: bool = False  # plaintext off loopback
    allow_anonymous: bool = False  # no client authentication off loopback
    limits: Limits = field(default_factory=Limits)
    metrics_listen: str | None = None
    # Discovery of provider model lists (off for embedded/programmatic use, on for the CLI).
    discover: bool = False
    env_file: Path | None = None
    servers: tuple[ServerSpec, ...] = ()
    discovery_ttl_s: float = 60.0
    discovery_timeout_s: float = 5.0
    extra_options: Sequence[tuple[str, Any]] = field(default_factory=tuple)
    # Read plain OpenAI-compatible deployments directly instead of through LiteLLM.
    openai_fast_path: bool = field(default_factory=_fast_path_from_env)
    # Spend accounting: the SQLite ledger's directory (None: the user's data dir), or off.
    state_dir: Path | None = None
    accounting: bool = True
    # Several sidecar hosts (or --workers): node rpm/tpm counted in Redis, spend and budgets
    # in PostgreSQL. URLs may carry passwords: registered as secrets, never logged.
    redis_url: str | None = field(default=None, repr=False)
    database_url: str | None = field(default=None, repr=False)
    clock: Clock = time.time  # limits, budgets and ledger times; tests inject their own
    # With no config: the real embedded model (llama.cpp, the [local] extra) when set, else
    # the echo. Off for programmatic use, on for the CLI when the extra is installed.
    embedded_model: EmbeddedModelSettings | None = None
    stall_limit_s: float = DEFAULT_STALL_LIMIT_S
    # The process around the server (exo-remote-sidecar only).
    workers: int = 1
    grace_s: float = 30.0
    log_level: str = "info"
    uvloop: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> SidecarSettings:
        """What ``exo-remote-sidecar``'s parsed flags (and the variables behind them) say;
        ConfigError names the flag at fault."""
        env = Environment(environ)
        if args.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if not args.stall_limit_s > 0:
            raise ConfigError("--stall-limit-s must be a positive number of seconds")
        named: dict[str, str] = {}
        if args.token_file:
            named = load_token_file(args.token_file)
        elif token := env.get("EXO_REMOTE_TOKEN"):
            named = token_from_env(token)
        tls = None
        if args.tls_cert or args.tls_key:
            if not (args.tls_cert and args.tls_key):
                raise ConfigError("--tls-cert and --tls-key go together")
            tls = ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca)
        servers = []
        for spec in [*args.server, *filter(None, (env.get("EXO_REMOTE_SERVERS") or "").split(","))]:
            kind, sep, url = spec.partition("=")
            if not sep or not url:
                raise ConfigError(f"--server {spec!r}: expected KIND=URL, e.g. ollama=http://127.0.0.1:11434")
            try:
                servers.append(ServerSpec(kind.strip(), url.strip()))
            except ValueError as exc:
                raise ConfigError(f"--server {spec!r}: {exc}") from exc
        try:
            listen = grpc_address(args.listen, flag="--listen")
        except AddressError as exc:
            raise ConfigError(str(exc)) from None
        redis_url = check_redis_url(args.redis) if args.redis else None
        database_url = check_database_url(args.database) if args.database else None
        for flag, value, variable in (
            ("--redis", args.redis, "EXO_REMOTE_REDIS"),
            ("--database", args.database, "EXO_REMOTE_DATABASE"),
        ):
            if value and value != env.get(variable) and url_credentials(value):
                log.warning(
                    "WARNING: %s carries a password on the command line, where every local user can read it "
                    "(/proc/PID/cmdline); set it in %s instead (workers get it from their environment)",
                    flag,
                    variable,
                )
        if database_url and not args.accounting:
            raise ConfigError("--database keeps spend: it needs accounting (drop --no-accounting)")
        return cls(
            listen=listen,
            config_path=args.config,
            named_tokens=named,
            tls=tls,
            allow_insecure=args.insecure,
            allow_anonymous=args.allow_anonymous,
            metrics_listen=args.metrics_listen,
            discover=args.discover,
            env_file=args.env_file,
            servers=tuple(servers),
            discovery_ttl_s=args.refresh_s,
            openai_fast_path=args.openai_fast_path,
            state_dir=args.state_dir,
            accounting=args.accounting,
            redis_url=redis_url,
            database_url=database_url,
            embedded_model=embedded_from_args(args),
            stall_limit_s=args.stall_limit_s,
            workers=args.workers,
            grace_s=args.grace_s,
            log_level=args.log_level,
            uvloop=env.flag("EXO_REMOTE_UVLOOP"),
        )


def embedded_from_args(args: argparse.Namespace) -> EmbeddedModelSettings | None:
    """The real embedded model unless a config is given, the echo is asked for, or the
    [local] extra is missing (then the echo, unless a model file was asked for)."""
    if args.config is not None or args.embedded_echo:
        return None
    chosen = args.embedded_model or packaged.DEFAULT_MODEL  # a packaged model's name, else a GGUF path
    named = chosen in packaged.PACKAGED
    settings = EmbeddedModelSettings(
        threads=args.embedded_threads,
        ctx=args.embedded_ctx,
        parallel=args.embedded_parallel,
        model_path=None if named else Path(chosen).expanduser(),
        model=chosen if named else packaged.DEFAULT_MODEL,
    )
    settings.check()
    if args.embedded_model and not runtime_available():
        raise ConfigError(f"--embedded-model needs llama.cpp (xllamacpp): {LOCAL_EXTRA_HINT}")
    if args.embedded_model and named and not packaged.available(settings.packaged_model):
        raise ConfigError(f"--embedded-model {chosen}: its file is not here: {settings.packaged_model.install_hint()}")
    if not args.embedded_model and not local_model_available():
        return None
    return settings


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """exo-remote-sidecar's flags; each says its default and the variable that sets it."""
    env = Environment(environ).get
    parser = argparse.ArgumentParser(
        prog="exo-remote-sidecar",
        allow_abbrev=False,  # one spelling per flag: workers' argv drops --redis/--database by name
        description="Serve external LLMs to exo nodes over gRPC. Provider keys live here only.",
    )
    parser.add_argument(
        "--listen",
        default=env("EXO_REMOTE_LISTEN", DEFAULT_LISTEN),
        help=f"host[:port] to serve gRPC on; no port means 50505 (env EXO_REMOTE_LISTEN; default: {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=env("EXO_REMOTE_CONFIG") or None,
        help="LiteLLM proxy config.yaml or JSON alias map (env EXO_REMOTE_CONFIG; "
        "default: none, which serves the embedded offline model)",
    )
    embedded = parser.add_argument_group(
        "embedded model (no --config)",
        "With the [local] extra and the model fetched at install time, a sidecar without a config serves "
        "SmolLM2-135M-Instruct (or --embedded-model) with llama.cpp on 127.0.0.1; without them, embedded-echo, "
        "which only repeats the prompt.",
    )
    embedded.add_argument(
        "--embedded-model",
        default=env("EXO_REMOTE_EMBEDDED_MODEL") or None,
        metavar="NAME|PATH",
        help=f"a packaged model ({', '.join(packaged.PACKAGED)}; gemma-3-270m needs the [gemma] extra) or your "
        f"own GGUF file; nothing is downloaded at run time (default: {packaged.DEFAULT_MODEL}; "
        "env EXO_REMOTE_EMBEDDED_MODEL)",
    )
    embedded.add_argument(
        "--embedded-threads",
        type=int,
        default=int(env("EXO_REMOTE_EMBEDDED_THREADS", "1")),
        metavar="N",
        help="CPU threads for llama.cpp (default: %(default)s; more than one thread on a busy small "
        "machine slows generation down; env EXO_REMOTE_EMBEDDED_THREADS)",
    )
    embedded.add_argument(
        "--embedded-ctx",
        type=int,
        default=int(env("EXO_REMOTE_EMBEDDED_CTX", "4096")),
        metavar="N",
        help="context window of one request, in tokens (default: %(default)s; env EXO_REMOTE_EMBEDDED_CTX)",
    )
    embedded.add_argument(
        "--embedded-parallel",
        type=int,
        default=int(env("EXO_REMOTE_EMBEDDED_PARALLEL", "2")),
        metavar="N",
        help="requests generated at the same time (llama.cpp slots, sharing the threads); more requests "
        "wait in llama.cpp's queue until a slot frees (default: %(default)s; env EXO_REMOTE_EMBEDDED_PARALLEL)",
    )
    embedded.add_argument(
        "--embedded-echo",
        action="store_true",
        default=env("EXO_REMOTE_EMBEDDED_ECHO", "0") == "1",
        help="serve embedded-echo even when the [local] extra is installed (no model loaded; "
        "env EXO_REMOTE_EMBEDDED_ECHO=1; default: off)",
    )
    parser.add_argument(
        "--log-level",
        default=env("EXO_REMOTE_LOG_LEVEL", "info"),
        help="debug, info, warning or error (env EXO_REMOTE_LOG_LEVEL; default: info)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=env("EXO_REMOTE_TOKEN_FILE") or None,
        help="file of 'name token' lines, one per node, '#' comments allowed (env EXO_REMOTE_TOKEN_FILE, "
        "or one token in EXO_REMOTE_TOKEN; default: none, which off loopback needs --tls-client-ca or "
        "--allow-anonymous)",
    )
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for TLS (default: none, plaintext)")
    parser.add_argument("--tls-key", type=Path, help="private key (PEM) of --tls-cert (default: none)")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA, mTLS (default: none)"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow plaintext on a non-loopback address (default: off)"
    )
    parser.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="off loopback, serve callers without a token or client certificate "
        "(warned at start and to clients; default: off)",
    )
    parser.add_argument(
        "--metrics-listen",
        default=env("EXO_REMOTE_METRICS_LISTEN") or None,
        help="host:port for Prometheus metrics, a separate port (env EXO_REMOTE_METRICS_LISTEN; default: off)",
    )
    parser.add_argument(
        "--grace-s", type=float, default=30.0, help="on SIGTERM, how long live streams may finish (default: 30)"
    )
    parser.add_argument(
        "--discover",
        action=argparse.BooleanOptionalAction,
        default=env("EXO_REMOTE_DISCOVER", "1") != "0",
        help="find the models the sidecar's keys and servers make available (env EXO_REMOTE_DISCOVER=0 "
        "turns it off; default: on)",
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        default=env("EXO_REMOTE_ENV_FILE") or None,
        help="KEY=value file re-read at every discovery refresh, to add keys without a restart "
        "(env EXO_REMOTE_ENV_FILE; default: none)",
    )
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="KIND=URL",
        help="an OpenAI-compatible server to list: ollama, llamacpp, vllm, lmstudio or openai; repeatable "
        "(env EXO_REMOTE_SERVERS, comma-separated; default: none, plus Ollama's local address if it answers)",
    )
    parser.add_argument(
        "--refresh-s", type=float, default=60.0, help="discovery refresh period in seconds (default: 60)"
    )
    parser.add_argument(
        "--stall-limit-s",
        type=float,
        default=float(env("EXO_REMOTE_STALL_LIMIT_S", str(DEFAULT_STALL_LIMIT_S))),
        help="end a stream whose client has read nothing for this long (CLIENT_STALLED; default 60)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(env("EXO_REMOTE_WORKERS", "1")),
        help="processes serving Generate, each on its own port announced by ListWorkers; use the number "
        "of cores for many concurrent streams (env EXO_REMOTE_WORKERS; default: 1)",
    )
    parser.add_argument(
        "--openai-fast-path",
        action=argparse.BooleanOptionalAction,
        default=Environment(environ).flag("EXO_REMOTE_OPENAI_FAST_PATH"),
        help="read OpenAI-compatible deployments (openai/ or hosted_vllm/ with an api_base and no "
        "other litellm_params) directly instead of through LiteLLM (env EXO_REMOTE_OPENAI_FAST_PATH=0 "
        "turns it off; default: on)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=env("EXO_REMOTE_STATE_DIR") or None,
        help="where the spend ledger (SQLite) lives (default: $XDG_DATA_HOME/exo-remote-engine)",
    )
    parser.add_argument(
        "--accounting",
        action=argparse.BooleanOptionalAction,
        default=env("EXO_REMOTE_ACCOUNTING", "1") != "0",
        help="record every request's tokens and cost in the ledger (default: on; budgets need it)",
    )
    shared = parser.add_argument_group(
        "several sidecar hosts",
        "Limits and budgets that hold across hosts and --workers processes: rpm/tpm in Redis, "
        "spend in PostgreSQL (each host still writes its own SQLite ledger first).",
    )
    shared.add_argument(
        "--redis",
        default=env("EXO_REMOTE_REDIS") or None,
        metavar="URL",
        help="redis://host:port/db holding the rpm/tpm counts of nodes and deployments; while unreachable, "
        "limits hold per process (env EXO_REMOTE_REDIS; default: none, counts in this process)",
    )
    shared.add_argument(
        "--database",
        default=env("EXO_REMOTE_DATABASE") or None,
        metavar="URL",
        help="postgresql://user@host:port/dbname holding every host's spend, read by budgets; while "
        "unreachable, budgeted nodes are refused (env EXO_REMOTE_DATABASE; default: none, the SQLite ledger)",
    )
    return parser


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    return build_parser(environ).parse_args(argv)
