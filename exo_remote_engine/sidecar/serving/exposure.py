"""Whether the sidecar may listen where it was told to: the provider keys behind it are
worth protecting off loopback.

Two separate questions: can the network read the traffic (TLS, else ``--insecure``), and
must a caller prove who it is (a token or a client certificate, else
``--allow-anonymous``). Server-only TLS without tokens answers the first, not the second.
"""

from __future__ import annotations

import ipaddress

from exo_remote_engine.sidecar.config.loader import ConfigError
from exo_remote_engine.sidecar.serving.settings import SidecarSettings
from exo_remote_engine.sidecar.telemetry.safe_logging import safe_logger

log = safe_logger("exo_remote_engine.sidecar")


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext(settings: SidecarSettings) -> None:
    """Refuse plaintext off loopback unless ``--insecure`` (checked before a model loads)."""
    if settings.tls is None and not is_loopback(settings.listen) and not settings.allow_insecure:
        raise ConfigError(
            f"refusing to listen in plaintext on {settings.listen}: use TLS, a loopback address, or --insecure"
        )


def exposure_warnings(settings: SidecarSettings, authenticates: bool) -> tuple[str, ...]:
    """Refuse to expose the keys off loopback without what protects them, unless the
    operator said so explicitly; then warn here and return what every client is told."""
    if is_loopback(settings.listen):
        return ()
    check_plaintext(settings)
    if settings.tls is None:
        log.warning(
            "WARNING: serving provider credentials in PLAINTEXT on %s; anyone on the "
            "network can read requests and replies",
            settings.listen,
        )
    if authenticates:
        return ()
    if not settings.allow_anonymous:
        raise ConfigError(
            f"refusing to serve anyone who can reach {settings.listen} without client authentication: "
            "give --token-file (or EXO_REMOTE_TOKEN) or --tls-client-ca, or say --allow-anonymous"
        )
    warning = (
        f"this sidecar serves ANYONE who can reach {settings.listen} without authentication "
        "(--allow-anonymous): every caller can use its provider keys"
    )
    log.warning("WARNING: %s", warning)
    return (warning,)
