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


def metrics_address(listen: str) -> tuple[str, int]:
    """``--metrics-listen``'s host and port (no host: loopback); ConfigError when malformed."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--metrics-listen {listen!r}: expected host:port, e.g. 127.0.0.1:9464")
    return host, int(port)


def check_status_exposure(settings: SidecarSettings, admins_can_prove: bool) -> None:
    """The status page and metrics port follow the gRPC port's rules, with one difference:
    off loopback only an admin node may read them (its token or client certificate), and
    there is no anonymous opt-in: what they show (spend, nodes, failures) is the operator's."""
    if settings.metrics_listen is None:
        return
    host, _ = metrics_address(settings.metrics_listen)
    if is_loopback(f"{host}:0"):
        return
    if not admins_can_prove:
        raise ConfigError(
            f"refusing to serve the status page and metrics on {settings.metrics_listen} to anyone: give a node "
            "`role: admin` in exo_remote_settings.nodes and a token in --token-file (or a "
            "general_settings.master_key), or --tls-client-ca with a certificate naming an admin node; "
            "or listen on loopback"
        )
    if settings.tls is None:
        if not settings.allow_insecure:
            raise ConfigError(
                f"refusing to serve the status page in plaintext on {settings.metrics_listen}: admin tokens would "
                "cross the network readable; use --tls-cert/--tls-key, a loopback address, or --insecure"
            )
        log.warning(
            "WARNING: serving the status page and metrics in PLAINTEXT on %s; admin tokens cross the network readable",
            settings.metrics_listen,
        )
