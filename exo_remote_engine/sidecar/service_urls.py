"""The URLs of the services several sidecar hosts share (Redis, PostgreSQL): checked once
at startup, their passwords registered as secrets, and named in logs without them."""

from __future__ import annotations

import importlib.util
import urllib.parse

from exo_remote_engine.redaction import SECRETS
from exo_remote_engine.sidecar.config import ConfigError


def display_url(url: str) -> str:
    """``url`` without user, password or query: what a log line may say about it."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_service_url(url: str, *, flag: str, package: str, schemes: tuple[str, ...], expected: str) -> str:
    """``url`` for ``flag``, registered as a secret source first (so no error can repeat
    its password); ConfigError when ``package`` (the driver) is missing, the URL does not
    parse, or its scheme is not one of ``schemes`` (``expected`` says what to write)."""
    SECRETS.add_url(url)
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{flag} needs the {package} package: pip install 'exo-remote-engine[sidecar]'")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        raise ConfigError(f"{flag}: not a valid URL") from None
    if parts.scheme not in schemes:
        raise ConfigError(f"{flag} {display_url(url)}: expected {expected}")
    return url
