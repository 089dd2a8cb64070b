"""Sidecar addresses as people type them, made into gRPC targets.

gRPC reads a bare host as ``host:443`` and ``http://host:port`` as a host name, so both the
sidecar's ``--listen`` and every client's ``--sidecar`` / ``EXO_REMOTE_SIDECAR`` go through
:func:`grpc_address`: a missing port means the sidecar's port, 50505, and a URL scheme is
refused with the address to use instead.

A client may name several sidecar hosts (:func:`sidecar_target`): a comma-separated list of
IP literals becomes gRPC's own ``ipv4:``/``ipv6:`` address list, and ``dns:///name:port``
lets gRPC's resolver find every A/AAAA record of a name. gRPC has no target form for a list
of host *names*, so such a list is refused with the two forms that work.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass
from enum import Enum

DEFAULT_PORT = 50505
# gRPC's own target forms (unix sockets, explicit resolvers) pass through unchanged.
_GRPC_TARGET_PREFIXES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")
_SOCKET_PREFIXES = ("unix:", "unix-abstract:", "vsock:")


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


class TargetKind(Enum):
    """How many sidecar hosts a target names, and how they are known."""

    HOST = "host"  # one host:port (a name may still resolve to several addresses)
    LIST = "list"  # IP literals, dialled as gRPC's ipv4:/ipv6: address list
    DNS = "dns"  # dns:[//authority/]name:port: gRPC resolves every record of the name
    SOCKET = "socket"  # unix:, unix-abstract:, vsock:


@dataclass(frozen=True)
class SidecarAddress:
    """A parsed client target: what gRPC dials, and the hosts behind it where written out."""

    target: str  # the gRPC target string
    kind: TargetKind
    hosts: tuple[str, ...] = ()  # host:port of each host named (HOST, LIST); () otherwise
    dns_name: str | None = None  # name:port of a DNS target (resolved for display only)

    @property
    def several(self) -> bool:
        """Whether calls may spread over several hosts, with ports of their own each."""
        return self.kind in (TargetKind.LIST, TargetKind.DNS)


def sidecar_target(text: str, *, flag: str = "--sidecar") -> SidecarAddress:
    """``host[:port]``, ``a:p,b:p`` (IP literals), ``ipv4:``/``ipv6:`` lists, ``dns:///name:port``
    (or ``dns:name:port``), ``unix:path`` -> a :class:`SidecarAddress`; a missing port means
    50505. Parsing its own ``target`` gives the same address back."""
    address = text.strip()
    if address.startswith(("ipv4:", "ipv6:")):
        family = address[:4]
        items = [_literal(i, text, flag, family) for i in _items(address[5:], text, flag)]
        return _address_list(items, text, flag)
    if address.startswith("dns:"):
        return _dns(address, text, flag)
    if address.startswith(_SOCKET_PREFIXES):
        return SidecarAddress(address, TargetKind.SOCKET)
    if "," not in address:
        target = grpc_address(text, flag=flag)
        return SidecarAddress(target, TargetKind.HOST, (target,))
    items = []
    for item in _items(address, text, flag):
        hostport, host, ip = _ip_of(item, flag)
        if ip is None:
            raise AddressError(
                f"{flag} {text!r}: {host!r} is a host name, and gRPC cannot dial a list of names as one target; "
                f"write IP addresses (127.0.0.2:{DEFAULT_PORT},127.0.0.3:{DEFAULT_PORT}) or one name with "
                f"several address records as dns:///{host}:{hostport.rpartition(':')[2]}"
            )
        items.append((f"ipv{ip.version}", hostport))
    return _address_list(items, text, flag)


def _ip_of(item: str, flag: str) -> tuple[str, str, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """``item`` as ``host:port``, its host, and that host as an IP address (None: a name)."""
    hostport = grpc_address(item, flag=flag)
    host = hostport.rpartition(":")[0].strip("[]")
    try:
        return hostport, host, ipaddress.ip_address(host)
    except ValueError:
        return hostport, host, None


def _items(listed: str, text: str, flag: str) -> list[str]:
    items = [i.strip() for i in listed.split(",")]
    if not listed.strip() or any(not i for i in items):
        raise AddressError(f"{flag} {text!r}: empty address in the list; expected a:port,b:port")
    return items


def _literal(item: str, text: str, flag: str, family: str) -> tuple[str, str]:
    """One entry of an ``ipv4:``/``ipv6:`` list -> (family, host:port), checked."""
    if family == "ipv6" and not item.startswith("[") and item.count(":") > 1:
        item = f"[{item}]"  # gRPC's ipv6: form takes a bare address without a port
    hostport, host, ip = _ip_of(item, flag)
    if ip is None:
        raise AddressError(f"{flag} {text!r}: {host!r} is not an IP address; {family}: lists take IP addresses")
    if f"ipv{ip.version}" != family:
        raise AddressError(f"{flag} {text!r}: {host} is not an IPv{family[-1]} address")
    return family, hostport


def _address_list(items: list[tuple[str, str]], text: str, flag: str) -> SidecarAddress:
    families = {family for family, _ in items}
    if len(families) > 1:
        raise AddressError(
            f"{flag} {text!r}: mixes IPv4 and IPv6 addresses; gRPC's address lists take one family: "
            "list the hosts by one family, or use dns:///name:port"
        )
    hosts = tuple(hostport for _, hostport in items)
    twice = sorted({h for h in hosts if hosts.count(h) > 1})
    if twice:
        raise AddressError(f"{flag} {text!r}: {twice[0]} is listed twice")
    return SidecarAddress(f"{families.pop()}:{','.join(hosts)}", TargetKind.LIST, hosts)


def _dns(address: str, text: str, flag: str) -> SidecarAddress:
    """``dns:///name[:port]``, ``dns://authority/name[:port]`` or ``dns:name[:port]``."""
    rest = address[4:]
    authority = ""
    if rest.startswith("//"):
        authority, slash, rest = rest[2:].partition("/")
        if not slash:
            raise AddressError(f"{flag} {text!r}: expected dns:///name:port (three slashes) or dns:name:port")
    if not rest or "," in rest or "/" in rest:
        raise AddressError(f"{flag} {text!r}: expected one name, as dns:///name:port")
    hostport = grpc_address(rest, flag=flag)
    prefix = f"dns://{authority}/" if address.startswith("dns://") else "dns:"
    return SidecarAddress(prefix + hostport, TargetKind.DNS, dns_name=hostport)
