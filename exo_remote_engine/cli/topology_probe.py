"""What ``exo-remote topology`` draws: exo's ``GET /v1/topology`` (urllib; the engine side
stays light) and, for every remote node, its sidecar asked directly for health and models.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from exo_remote_engine.cli.connection_hints import not_exo_api_hint, sidecar_hint
from exo_remote_engine.contract.addresses import AddressError, sidecar_target
from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.engine.cluster import remote_sidecar
from exo_remote_engine.engine.connection.client import (
    HOST_NOT_SERVING,
    HOST_SERVING,
    HOST_UNREACHABLE,
    SidecarClient,
    host_status,
)
from exo_remote_engine.engine.connection.target import SidecarTarget

DEFAULT_API = "http://127.0.0.1:52415"
MAX_BODY_BYTES = 16 * 1024 * 1024
SERVING = HOST_SERVING
NOT_SERVING = HOST_NOT_SERVING
UNREACHABLE = HOST_UNREACHABLE
NOT_PROBED = "not probed"
T = TypeVar("T")


@dataclass(frozen=True)
class SidecarInfo:
    """What a sidecar said when asked directly (or why it could not be asked)."""

    address: str
    status: str  # SERVING, NOT_SERVING, UNREACHABLE or NOT_PROBED
    ready: tuple[str, ...] = ()
    not_ready: int = 0
    models_error: str | None = None  # ListModels failed although the sidecar answered
    detail: str | None = None  # why it is unreachable / was not probed
    # A target of several hosts: each host (for dns: the addresses the name resolves to
    # now) with its own readiness, asked over a channel to that host alone.
    hosts: tuple[tuple[str, str], ...] = ()


class TopologyError(Exception):
    """exo's API could not be reached or did not answer with a topology."""


def api_base(api: str) -> str:
    """``host:port``, ``http://host:port/`` or ``.../v1/topology`` -> ``http://host:port``."""
    api = api.strip().rstrip("/")
    if "://" not in api:
        api = "http://" + api
    if api.endswith("/v1/topology"):
        api = api[: -len("/v1/topology")]
    return api


def fetch_topology(api: str, timeout_s: float) -> dict[str, Any]:
    """exo's ``/v1/topology`` as a dict; raises :class:`TopologyError` with a one-line reason."""
    url = api_base(api) + "/v1/topology"
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise TopologyError(f"{url}: only http and https are supported")
    # exo's API is on the cluster's own network: never send it through an HTTP proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 - scheme checked
    try:
        with opener.open(request, timeout=timeout_s) as response:
            body = response.read(MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise TopologyError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except http.client.HTTPException as exc:  # not HTTP/1.x at all: a sidecar's gRPC or TLS port?
        first_line = exc.args[0] if exc.args and isinstance(exc.args[0], str | bytes) else b""
        if isinstance(exc, http.client.RemoteDisconnected):
            first_line = b""
        raise TopologyError(not_exo_api_hint(first_line, api_base(api))) from None
    except urllib.error.URLError as exc:
        raise TopologyError(f"cannot reach exo at {url}: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise TopologyError(f"cannot reach exo at {url}: {exc or type(exc).__name__}") from None
    if len(body) > MAX_BODY_BYTES:
        raise TopologyError(f"{url}: answer larger than {MAX_BODY_BYTES // 2**20} MiB")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise TopologyError(f"{url} did not answer JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TopologyError(f"{url} answered {type(data).__name__}, not a topology object")
    return data


async def _bounded(awaitable: Awaitable[T], timeout_s: float) -> T:
    return await asyncio.wait_for(awaitable, timeout_s)


def _short_error(exc: BaseException, timeout_s: float, hint: str | None = None) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"no answer in {timeout_s:g} s"
    if hint:
        return hint
    text = str(exc)
    lowered = text.lower()
    if "connection refused" in lowered:
        return "connection refused"
    if "deadline" in lowered:
        return f"no answer in {timeout_s:g} s"
    if isinstance(exc, RemoteError):
        return f"{exc.reason.value}: {text}"
    return text or type(exc).__name__


async def probe_sidecar(address: str, base: SidecarTarget, timeout_s: float) -> SidecarInfo:
    """Health and ListModels of one sidecar, each bounded by ``timeout_s``; never raises."""
    target = replace(base, address=address)
    client = SidecarClient(target)
    hosts: tuple[tuple[str, str], ...] = ()
    try:
        health, models, each = await asyncio.gather(
            _bounded(client.health(timeout_s=timeout_s), timeout_s + 0.5),
            _bounded(client.list_models(timeout_s=timeout_s), timeout_s + 0.5),
            _bounded(_host_health(client, timeout_s), timeout_s + 0.5),
            return_exceptions=True,
        )
        if isinstance(each, dict):
            hosts = tuple(each.items())
    finally:
        try:
            await client.close()
        except Exception:  # noqa: S110 - closing a channel that never connected
            pass
    if not isinstance(models, BaseException):
        return SidecarInfo(
            address=address,
            status=SERVING if health is True else NOT_SERVING,
            ready=tuple(m.alias for m in models.models if m.ready),
            not_ready=sum(1 for m in models.models if not m.ready),
            hosts=hosts,
        )
    # TLS expected, token missing...: may try a TLS handshake, so off the event loop.
    hint = None
    if isinstance(models, RemoteError):
        hint = await asyncio.to_thread(sidecar_hint, models, target, short=True)
    answered = isinstance(models, RemoteError) and models.reason not in (
        Reason.SIDECAR_UNAVAILABLE,
        Reason.DEADLINE_EXCEEDED,
        Reason.INTERNAL,
    )
    if health is True or answered:
        return SidecarInfo(
            address=address,
            status=SERVING if health is True else NOT_SERVING,
            models_error=_short_error(models, timeout_s, hint),
            hosts=hosts,
        )
    return SidecarInfo(address=address, status=UNREACHABLE, detail=_short_error(models, timeout_s, hint), hosts=hosts)


async def _host_health(client: SidecarClient, timeout_s: float) -> dict[str, str]:
    """Every host of a several-host target with its status; {} for one host (its status
    is the sidecar's)."""
    if not client.target.parsed.several:
        return {}
    return {a: host_status(r) for a, r in (await client.host_health(timeout_s)).items()}


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_this_machine(host: str) -> bool:
    """Loopback, or an address of one of this machine's interfaces (it can be bound)."""
    if _is_loopback(host):
        return True
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False


def positive_seconds(text: str) -> float:
    """argparse type for ``--timeout``."""
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def _address_hosts(address: str) -> list[str]:
    """The hosts a sidecar target names (a dns: target: its name)."""
    try:
        parsed = sidecar_target(address)
    except AddressError:
        return [address]
    named = parsed.hosts or ((parsed.dns_name,) if parsed.dns_name else (parsed.target,))
    return [urllib.parse.urlsplit("//" + a).hostname or "" for a in named]


def remote_address(node: Mapping[str, Any]) -> str | None:
    """The sidecar address of a remote node, ``None`` for a local one."""
    found = remote_sidecar(node.get("model"), node.get("chip") or "")
    return found[0] if found else None


async def collect_sidecars(
    topology: Mapping[str, Any], api: str, base: SidecarTarget, timeout_s: float
) -> dict[str, SidecarInfo]:
    """Every remote node's sidecar, keyed by address, probed concurrently."""
    addresses = sorted({a for _, node in topology_nodes(topology) if (a := remote_address(node))})
    api_is_local = _is_this_machine(urllib.parse.urlsplit(api_base(api)).hostname or "")
    found: dict[str, SidecarInfo] = {}
    to_probe: list[str] = []
    for address in addresses:
        if all(_is_loopback(h) for h in _address_hosts(address)) and not api_is_local:
            # 127.0.0.1 as seen by a node on another machine is not our 127.0.0.1.
            found[address] = SidecarInfo(address, NOT_PROBED, detail="loopback of that node's machine")
        else:
            to_probe.append(address)
    results = await asyncio.gather(*(probe_sidecar(a, base, timeout_s) for a in to_probe))
    found.update({info.address: info for info in results})
    return found


def topology_nodes(topology: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    nodes = topology.get("nodes") if isinstance(topology, Mapping) else None
    if isinstance(nodes, Mapping):
        return [(str(k), v if isinstance(v, Mapping) else {}) for k, v in nodes.items()]
    if isinstance(nodes, list):
        return [(str(n.get("id", "?")), n) for n in nodes if isinstance(n, Mapping)]
    return []
