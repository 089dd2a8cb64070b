"""Drawing a topology: nodes as boxes, remote ones with their sidecar's state, in Unicode
or ASCII. Pure (no network), so it is tested directly.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from exo_remote_engine.cli.topology_probe import (
    NOT_PROBED,
    SERVING,
    UNREACHABLE,
    SidecarInfo,
    api_base,
    remote_address,
    topology_nodes,
)
from exo_remote_engine.engine.cluster import remote_sidecar

_GAP = 3  # columns between two boxes of a row
_MIN_BOX = 36  # narrowest box worth splitting a row for


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
    if info is not None and info.hosts:
        up = sum(1 for _, s in info.hosts if s == SERVING)
        lines.append(f"{up}/{len(info.hosts)} sidecar hosts serving:")
        lines += [f"  {g.up if s == SERVING else g.down} {_clean(a)} {s}" for a, s in info.hosts]
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
    nodes = topology_nodes(topology)
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
