"""The services several sidecar hosts share (Redis, PostgreSQL), as the sidecar treats
them: their URLs, checked once at startup, their passwords registered as secrets and named
in logs without them; and their outages, which are survived, said once, and tried again
after a pause rather than at every request."""

from __future__ import annotations

import importlib.util
import time
import urllib.parse
from collections.abc import Callable

from exo_remote_engine.contract.redaction import SECRETS
from exo_remote_engine.sidecar.config.loader import ConfigError


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


class Outage:
    """Whether a shared service is reachable, as its callers have found it. A failure starts
    an outage (``on_start`` runs once, with the error) and holds calls off for
    ``retry_after_s``, so an outage does not add a timeout to every request; the next
    success ends it (``on_end`` runs once)."""

    def __init__(
        self, retry_after_s: float, on_start: Callable[[BaseException], None], on_end: Callable[[], None]
    ) -> None:
        self._retry_after_s = retry_after_s
        self._on_start, self._on_end = on_start, on_end
        self._down_until = 0.0  # monotonic; no call before it
        self.active = False

    def usable(self) -> bool:
        """False while calls are held off after a failure."""
        return time.monotonic() >= self._down_until

    def failed(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._retry_after_s
        if not self.active:
            self.active = True
            self._on_start(exc)

    def succeeded(self) -> None:
        if self.active:
            self.active = False
            self._on_end()
