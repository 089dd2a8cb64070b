"""Sidecar addresses as people type them, made into gRPC ``host:port`` targets.

gRPC reads a bare host as ``host:443`` and ``http://host:port`` as a host name, so both the
sidecar's ``--listen`` and every client's ``--sidecar`` / ``EXO_REMOTE_SIDECAR`` go through
:func:`grpc_address`: a missing port means the sidecar's port, 50505, and a URL scheme is
refused with the address to use instead.
"""

from __future__ import annotations

import urllib.parse

DEFAULT_PORT = 50505
# gRPC's own target forms (unix sockets, explicit resolvers) pass through unchanged.
_GRPC_TARGET_PREFIXES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")


class AddressError(ValueError):
    """An address that cannot be a gRPC target, with what to write instead."""


def grpc_address(text: str, *, flag: str = "--sidecar") -> str:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address -> ``host:port``.
    ``flag`` (an option or an environment variable) names the source in error messages."""
    address = text.strip()
    if not address:
        raise AddressError(f"{flag}: empty address; expected host:port, e.g. 127.0.0.1:{DEFAULT_PORT}")
    if address.startswith(_GRPC_TARGET_PREFIXES):
        return address
    if "://" in address:
        parts = urllib.parse.urlsplit(address)
        host = parts.hostname or "host"
        host = f"[{host}]" if ":" in host else host
        port = _port_of(parts.netloc.rpartition("@")[2], address, flag)
        port = DEFAULT_PORT if port is None else port
        how = "--tls-cert and --tls-key" if flag == "--listen" else "EXO_REMOTE_TLS_CA"
        tls = f" (TLS is set with {how}, not https://)" if parts.scheme == "https" else ""
        instead = f"{flag}={host}:{port}" if flag.isupper() else f"{flag} {host}:{port}"
        raise AddressError(
            f"{flag} {text!r}: drop the {parts.scheme}:// scheme, the sidecar speaks gRPC, not HTTP: {instead}{tls}"
        )
    if address.startswith("["):  # [v6] or [v6]:port
        host, _, rest = address.partition("]")
        if rest and not rest.startswith(":"):
            raise AddressError(f"{flag} {text!r}: expected [IPv6]:port")
        port = _port_of(rest, text, flag) if rest else None
        return f"{host}]:{DEFAULT_PORT if port is None else port}"
    if address.count(":") > 1:  # a bare IPv6 address has no port
        return f"[{address}]:{DEFAULT_PORT}"
    host, sep, _ = address.partition(":")
    if not host:
        raise AddressError(f"{flag} {text!r}: no host; expected host:port, e.g. 127.0.0.1:{DEFAULT_PORT}")
    port = _port_of(address[len(host) :], text, flag) if sep else None
    return f"{host}:{DEFAULT_PORT if port is None else port}"


def _port_of(hostport_tail: str, text: str, flag: str) -> int | None:
    """The port after the last ``:`` of ``hostport_tail`` (``None`` when there is none)."""
    if ":" not in hostport_tail or hostport_tail.endswith("]"):
        return None
    value = hostport_tail.rsplit(":", 1)[1]
    if not value:
        return None
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise AddressError(f"{flag} {text!r}: port {value!r} is not a number from 0 to 65535")
    return int(value)
