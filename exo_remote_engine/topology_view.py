"""``exo-remote topology``: an exo cluster's nodes as boxes, remote nodes with their sidecar's state.

exo's ``GET /v1/topology`` is fetched with urllib (the engine side stays light); every remote
node (``model`` = ``remote LLM``, ``chip`` = ``sidecar host:port: ...``) has its sidecar asked directly for health and
models. :func:`render_topology` is pure, so it can be tested without a network.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import shutil
import socket
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TextIO, TypeVar

from exo_remote_engine.connection_hints import not_exo_api_hint, sidecar_hint
from exo_remote_engine.engine.client import SidecarClient, SidecarTarget
from exo_remote_engine.engine.cluster import remote_sidecar
from exo_remote_engine.errors import Reason, RemoteError

DEFAULT_API = "http://127.0.0.1:52415"
MAX_BODY_BYTES = 16 * 1024 * 1024

SERVING = "SERVING"
NOT_SERVING = "NOT SERVING"
UNREACHABLE = "unreachable"
NOT_PROBED = "not probed"

_GAP = 3  # columns between two boxes of a row
_MIN_BOX = 36  # narrowest box worth splitting a row for

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


class TopologyError(Exception):
    """exo's API could not be reached or did not answer with a topology."""


# --- fetching -------------------------------------------------------------------------------
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
    try:
        health, models = await asyncio.gather(
            _bounded(client.health(timeout_s=timeout_s), timeout_s + 0.5),
            _bounded(client.list_models(timeout_s=timeout_s), timeout_s + 0.5),
            return_exceptions=True,
        )
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
        )
    return SidecarInfo(address=address, status=UNREACHABLE, detail=_short_error(models, timeout_s, hint))


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


def _address_host(address: str) -> str:
    return urllib.parse.urlsplit("//" + address.split("///")[-1]).hostname or ""


def remote_address(node: Mapping[str, Any]) -> str | None:
    """The sidecar address of a remote node, ``None`` for a local one."""
    found = remote_sidecar(node.get("model"), node.get("chip") or "")
    return found[0] if found else None


async def collect_sidecars(
    topology: Mapping[str, Any], api: str, base: SidecarTarget, timeout_s: float
) -> dict[str, SidecarInfo]:
    """Every remote node's sidecar, keyed by address, probed concurrently."""
    addresses = sorted({a for _, node in _nodes(topology) if (a := remote_address(node))})
    api_is_local = _is_this_machine(urllib.parse.urlsplit(api_base(api)).hostname or "")
    found: dict[str, SidecarInfo] = {}
    to_probe: list[str] = []
    for address in addresses:
        if _is_loopback(_address_host(address)) and not api_is_local:
            # 127.0.0.1 as seen by a node on another machine is not our 127.0.0.1.
            found[address] = SidecarInfo(address, NOT_PROBED, detail="loopback of that node's machine")
        else:
            to_probe.append(address)
    results = await asyncio.gather(*(probe_sidecar(a, base, timeout_s) for a in to_probe))
    found.update({info.address: info for info in results})
    return found


# --- rendering ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Glyphs:
    h: str
    v: str
    tl: str
    tr: str
    bl: str
    br: str
    up: str
    down: str
    dot: str
    dash: str
    ellipsis: str
    both: str
    one_way: str


_UNICODE = _Glyphs("─", "│", "┌", "┐", "└", "┘", "●", "○", " · ", " — ", "…", "──", "─▶")
_ASCII = _Glyphs("-", "|", "+", "+", "+", "+", "*", "x", " - ", " - ", "...", "--", "->")


def _clean(value: object) -> str:
    """Text from the network, made safe for a terminal (no escapes, no newlines)."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return "".join(c if c.isprintable() else "?" for c in text)


def _fit(text: str, width: int, g: _Glyphs) -> str:
    if len(text) <= width:
        return text
    if width <= len(g.ellipsis):
        return text[:width]
    return text[: width - len(g.ellipsis)] + g.ellipsis


def _wrap(text: str, width: int, g: _Glyphs, max_lines: int = 3) -> list[str]:
    """A reason on up to ``max_lines`` lines: what to fix must not be cut off."""
    return textwrap.wrap(text, max(width, 12), max_lines=max_lines, placeholder=g.ellipsis) or [""]


def _list_fit(prefix: str, names: list[str], width: int, g: _Glyphs) -> str:
    """``prefix a, b, +3 more`` with as many names as fit in ``width``."""
    for k in range(len(names), 0, -1):
        text = prefix + ", ".join(names[:k]) + (f", +{len(names) - k} more" if k < len(names) else "")
        if len(text) <= width:
            return text
    # Not even one whole name fits: shorten the first, still say how many there are.
    suffix = f", +{len(names) - 1} more" if len(names) > 1 else ""
    room = width - len(prefix) - len(suffix)
    if room >= 8:
        return prefix + _fit(names[0], room, g) + suffix
    return _fit(prefix + ", ".join(names), width, g)


def _nodes(topology: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    nodes = topology.get("nodes") if isinstance(topology, Mapping) else None
    if isinstance(nodes, Mapping):
        return [(str(k), v if isinstance(v, Mapping) else {}) for k, v in nodes.items()]
    if isinstance(nodes, list):
        return [(str(n.get("id", "?")), n) for n in nodes if isinstance(n, Mapping)]
    return []


def _edges(topology: Mapping[str, Any]) -> list[tuple[str, str, bool, str]]:
    """(a, b, both directions, description), one per connected pair, in first-seen order."""
    graph = topology.get("peer_graph") if isinstance(topology, Mapping) else None
    pairs: dict[frozenset[str], tuple[str, str, set[tuple[str, str]], str]] = {}
    if not isinstance(graph, Mapping):
        return []
    for source, targets in graph.items():
        items: Iterable[Any] = [targets] if isinstance(targets, str | Mapping) else targets or ()
        if not isinstance(items, Iterable):
            continue
        for edge in items:
            if isinstance(edge, Mapping):
                a = str(edge.get("from_id") or source)
                b = str(edge.get("to_id") or "")
                description = _clean(edge.get("description") or "")
            else:
                a, b, description = str(source), str(edge), ""
            if not b or a == b:
                continue
            key = frozenset((a, b))
            first = pairs.setdefault(key, (a, b, set(), description))
            first[2].add((a, b))
            if description and not first[3]:
                pairs[key] = (first[0], first[1], first[2], description)
    return [(a, b, len(dirs) > 1, desc) for a, b, dirs, desc in pairs.values()]


def _memory_gb(node: Mapping[str, Any]) -> str:
    memory = node.get("memory")
    return f"{memory / 1024:.1f} GB" if isinstance(memory, int | float) and memory > 0 else "? GB"


def _fp16(node: Mapping[str, Any]) -> str:
    flops = node.get("flops")
    value = flops.get("fp16") if isinstance(flops, Mapping) else None
    return f"fp16 {value:.1f} TFLOPS" if isinstance(value, int | float) else "fp16 ? TFLOPS"


def _without_device(text: str) -> str:
    return text.replace("(Device: ", "(")


def _remote_lines(node: Mapping[str, Any], address: str, info: SidecarInfo | None, g: _Glyphs, width: int) -> list[str]:
    status = info.status if info else NOT_PROBED
    lines = [f"REMOTE  sidecar {_clean(address) or '?'}  {g.up if status == SERVING else g.down}"]
    found = remote_sidecar(node.get("model"), node.get("chip") or "")
    chip = _clean(found[1] if found else node.get("chip") or "")
    exo_says = f"exo says: {chip}" if chip else "exo says nothing about its models"
    if info is None or status in (UNREACHABLE, NOT_PROBED):
        why = info.detail if info and info.detail else "sidecar not probed"
        lines += _wrap(f"sidecar {status}: {_clean(why)}" if info else why, width, g)
        lines.append(exo_says)
    elif info.models_error is not None:
        lines += _wrap(f"models: ? ({_clean(info.models_error)})", width, g)
        lines.append(f"sidecar {status}")
    else:
        names = [_clean(a) for a in info.ready]
        lines.append(_list_fit("models: ", names, width, g) if names else "models: none ready")
        total = len(info.ready) + info.not_ready
        lines.append(f"{len(info.ready)}/{total} ready{g.dot}sidecar {status}")
    return lines


def _local_lines(node: Mapping[str, Any], g: _Glyphs) -> list[str]:
    model = _without_device(_clean(node.get("model") or "unknown device"))
    chip = _without_device(_clean(node.get("chip") or ""))
    lines = [f"LOCAL  {model}", f"{_memory_gb(node)}{g.dot}{_fp16(node)}"]
    if chip and not chip.lower().startswith("unknown"):
        lines.append(chip)
    return lines


def _box(title: str, lines: list[str], box_w: int, height: int, g: _Glyphs) -> list[str]:
    inner = box_w - 4
    head = _fit(f"{g.h} {title} ", box_w - 2, g)
    out = [g.tl + head + g.h * (box_w - 2 - len(head)) + g.tr]
    padded = [*lines, *[""] * (height - len(lines))]
    out += [f"{g.v} {_fit(line, inner, g).ljust(inner)} {g.v}" for line in padded]
    out.append(g.bl + g.h * (box_w - 2) + g.br)
    return out


def render_topology(
    topology: dict[str, Any],
    sidecars: dict[str, SidecarInfo],
    api: str,
    width: int = 100,
    ascii_only: bool = False,
) -> str:
    """The cluster as boxes (wrapping onto rows), then its links; no line longer than ``width``.

    ``sidecars`` is keyed by sidecar address (a node id works too); a remote node without an
    entry is shown as not probed, with what exo itself reports about its models.
    """
    g = _ASCII if ascii_only else _UNICODE
    width = max(width, 20)
    nodes = _nodes(topology)
    edges = _edges(topology)
    active = topology.get("active_node_id") if isinstance(topology, Mapping) else None
    remote = {nid: a for nid, node in nodes if (a := remote_address(node)) is not None}
    where = _clean(api_base(api))
    if not nodes:
        out = [_fit(f"exo cluster at {where}{g.dash}no nodes in the topology (exo may still be discovering)", width, g)]
        return _finish(out, ascii_only)

    n_remote = len(remote)
    plural = "node" if len(nodes) == 1 else "nodes"
    counts = f"{len(nodes)} {plural} ({n_remote} remote, {len(nodes) - n_remote} local)"
    header = f"exo cluster at {where}{g.dash}{counts}"
    out = [header] if len(header) <= width else [f"exo cluster at {where}", counts]
    if active and str(active) not in dict(nodes):
        out.append(f"active node: {_clean(active)} (not among the nodes)")
    out.append("")

    # Content first at full width, to learn how wide the boxes want to be.
    titles: list[str] = []
    contents: list[list[str]] = []
    for nid, node in nodes:
        titles.append(_clean(nid) + ("  (active)" if active is not None and str(active) == nid else ""))
        if nid in remote:
            info = sidecars.get(remote[nid]) or sidecars.get(nid)
            contents.append(_remote_lines(node, remote[nid], info, g, width - 4))
        else:
            contents.append(_local_lines(node, g))
    want = max(max(len(t) + 5 for t in titles), max(len(line) + 4 for lines in contents for line in lines))
    box_w = max(min(want, width), 12)
    cols = max(1, min(len(nodes), (width + _GAP) // (box_w + _GAP)))
    if cols == 1 and len(nodes) > 1 and (width - _GAP) // 2 >= _MIN_BOX:
        cols = 2
    box_w = max(min(box_w, (width - _GAP * (cols - 1)) // cols), 12)
    # Re-fit the model lists of remote nodes to the box actually drawn.
    for i, (nid, node) in enumerate(nodes):
        if nid in remote:
            info = sidecars.get(remote[nid]) or sidecars.get(nid)
            contents[i] = _remote_lines(node, remote[nid], info, g, box_w - 4)

    linked = {frozenset((a, b)) for a, b, _, _ in edges}
    for start in range(0, len(nodes), cols):
        row = range(start, min(start + cols, len(nodes)))
        height = max(len(contents[i]) for i in row)
        boxes = [_box(titles[i], contents[i], box_w, height, g) for i in row]
        for line_no in range(height + 2):
            parts = [boxes[0][line_no]]
            for k in range(1, len(boxes)):
                pair = frozenset((nodes[row[k - 1]][0], nodes[row[k]][0]))
                joined = line_no == 1 and pair in linked
                parts.append((g.h * _GAP if joined else " " * _GAP) + boxes[k][line_no])
            out.append("".join(parts).rstrip())
        out.append("")

    extra = topology.get("exo_remote") if isinstance(topology, Mapping) else None
    missing = [_clean(n) for n in (extra or {}).get("nodes_without_addon") or []] if isinstance(extra, Mapping) else []
    if missing:
        out.append(f"WARNING: without the exo-remote-engine add-on: {', '.join(missing)}")
        out.append("  install it on every node; without it mixed local/remote requests can be misrouted")
        out.append("")
    if edges:
        out.append("links:")
        for a, b, both, description in edges:
            arrow = g.both if both else g.one_way
            text = f"  {_clean(a)} {arrow} {_clean(b)}" + (f"  ({description})" if description else "")
            out.append(_fit(text, width, g))
    elif len(nodes) > 1:
        out.append("links: none reported")
    else:
        out.pop()
    return _finish([_fit(line, width, g) for line in out], ascii_only)


def _finish(lines: list[str], ascii_only: bool) -> str:
    text = "\n".join(lines)
    return text.encode("ascii", "replace").decode("ascii") if ascii_only else text


# --- the command ----------------------------------------------------------------------------
def stream_can_draw(stream: TextIO) -> bool:
    """Whether ``stream``'s encoding has the box-drawing characters."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "┌─┐│└┘●○·—…▶".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def run(
    api: str,
    timeout_s: float,
    base: SidecarTarget,
    *,
    ascii_only: bool = False,
    width: int | None = None,
    out: TextIO | None = None,
) -> int:
    """Fetch, probe, draw. 0 when exo answered (whatever the sidecars said), 1 when it did not."""
    out = out or sys.stdout
    try:
        topology = fetch_topology(api, timeout_s)
    except TopologyError as exc:
        print(f"exo-remote: {exc}", file=sys.stderr)
        return 1
    sidecars = asyncio.run(collect_sidecars(topology, api, base, timeout_s))
    width = width or shutil.get_terminal_size((100, 24)).columns
    ascii_only = ascii_only or not stream_can_draw(out)
    print(render_topology(topology, sidecars, api, width=width, ascii_only=ascii_only), file=out)
    return 0
