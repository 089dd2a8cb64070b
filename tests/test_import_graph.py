"""The package's import graph: no cycle, and the layering the floor plan promises.

Every ``import`` statement in the source is read (lazy, function-level ones too), not what
happens to be loaded: a cycle or a forbidden edge hidden inside a function still ties two
parts together. Each package's docstring says what it may import; :data:`LAYERS` is the
same list, enforced.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "exo_remote_engine"
ROOT = "exo_remote_engine"
SIDECAR = f"{ROOT}.sidecar"

# Part -> the parts it may import (besides itself and ``generated``). A module belongs to
# the longest part its dotted name starts with.
LAYERS: dict[str, set[str]] = {
    f"{ROOT}.contract": set(),
    f"{ROOT}.engine": {f"{ROOT}.contract", f"{ROOT}.engine_adapter"},
    f"{ROOT}.engine.connection": {f"{ROOT}.contract", f"{ROOT}.engine.settings"},
    f"{ROOT}.engine.settings": {f"{ROOT}.contract"},
    f"{ROOT}.engine_adapter": {f"{ROOT}.contract", f"{ROOT}.engine"},
    f"{ROOT}._startup": {f"{ROOT}.engine"},
    f"{ROOT}.cli": {
        f"{ROOT}.contract",
        f"{ROOT}.engine",
        f"{SIDECAR}.config",
        f"{SIDECAR}.ledger",
        f"{SIDECAR}.embedded",
    },
    f"{SIDECAR}.config": {f"{ROOT}.contract"},
    f"{SIDECAR}.telemetry": {f"{ROOT}.contract"},
    f"{SIDECAR}.transports": {f"{ROOT}.contract", f"{SIDECAR}.config", f"{SIDECAR}.telemetry"},
    f"{SIDECAR}.embedded": {f"{ROOT}.contract", f"{SIDECAR}.config", f"{SIDECAR}.telemetry"},
    f"{SIDECAR}.discovery": {f"{ROOT}.contract", f"{SIDECAR}.config", f"{SIDECAR}.telemetry"},
    f"{SIDECAR}.ledger": {f"{ROOT}.contract", f"{SIDECAR}.config", f"{SIDECAR}.telemetry"},
    f"{SIDECAR}.control": {
        f"{ROOT}.contract",
        f"{SIDECAR}.config",
        f"{SIDECAR}.ledger",
        f"{SIDECAR}.telemetry",
    },
    f"{SIDECAR}.status": {
        f"{ROOT}.contract",
        f"{SIDECAR}.config",
        f"{SIDECAR}.control",
        f"{SIDECAR}.ledger",
        f"{SIDECAR}.telemetry",
    },
    f"{SIDECAR}.relay": {
        f"{ROOT}.contract",
        f"{SIDECAR}.config",
        f"{SIDECAR}.control",
        f"{SIDECAR}.transports",
        f"{SIDECAR}.telemetry",
    },
    f"{SIDECAR}.serving": {SIDECAR, f"{ROOT}.contract"},
    f"{ROOT}.server": {SIDECAR, f"{ROOT}.contract"},
    SIDECAR: set(),  # the package's own __init__
    ROOT: set(),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (generated code apart)."""
    base = package.parent
    modules = {
        ".".join(p.relative_to(base).with_suffix("").parts).removesuffix(".__init__"): p
        for p in package.rglob("*.py")
        if "generated" not in p.parts
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from package import submodule`` depends on the submodule, not on the
                # package's __init__ beyond what importing any submodule runs anyway.
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def part_of(module: str, layers: Mapping[str, set[str]] = LAYERS) -> str:
    """The longest layer name that is ``module`` or a package containing it."""
    matches = [p for p in layers if module == p or module.startswith(p + ".")]
    if not matches:
        raise KeyError(f"{module} belongs to no layer: add it to LAYERS and to README's floor plan")
    return max(matches, key=len)


def violations(graph: Mapping[str, set[str]], layers: Mapping[str, set[str]] = LAYERS) -> list[str]:
    """Every import edge that crosses into a part its importer may not use."""
    found = []
    for module, targets in sorted(graph.items()):
        source = part_of(module, layers)
        allowed = layers[source]
        for target in sorted(targets):
            if target.startswith(f"{ROOT}.generated"):
                continue
            destination = part_of(target, layers)
            if destination == source or destination.startswith(source + "."):
                continue
            if not any(destination == a or destination.startswith(a + ".") for a in allowed):
                found.append(f"{module} -> {target} ({source} may not import {destination})")
    return found


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_belongs_to_a_layer() -> None:
    for module in import_graph():
        part_of(module)  # raises with the fix in its message


def test_the_layering_holds() -> None:
    found = violations(import_graph())
    assert not found, "layering broken:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("planted_in", "planted_import", "expected"),
    [
        # the issue's own examples: transports never import control, engine never the sidecar
        ("sidecar/transports/openai_transport.py", "exo_remote_engine.sidecar.control.routing", "transports"),
        ("engine/connection/client.py", "exo_remote_engine.sidecar.config.loader", "engine.connection"),
        ("contract/errors.py", "exo_remote_engine.engine.codec", "contract"),
        ("sidecar/config/loader.py", "exo_remote_engine.sidecar.serving.settings", "config"),
        # the connection layer knows nothing of exo's side; the relay nothing of gRPC serving
        ("engine/connection/target.py", "exo_remote_engine.engine.codec", "engine.connection"),
        ("sidecar/relay/streaming.py", "exo_remote_engine.sidecar.serving.rpc_errors", "relay"),
    ],
)
def test_a_planted_violation_fails(tmp_path: Path, planted_in: str, planted_import: str, expected: str) -> None:
    """The check is not vacuous: a copy of the package with one forbidden (lazy) import fails it."""
    import shutil

    copy = tmp_path / ROOT
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "generated"))
    target = copy / planted_in
    target.write_text(target.read_text() + f"\n\ndef _planted() -> None:\n    import {planted_import}\n")
    assert not violations(import_graph(PACKAGE))
    found = violations(import_graph(copy))
    assert len(found) == 1, found
    assert f"{expected} may not import" in found[0].split("(")[-1]
    assert planted_import in found[0]


if __name__ == "__main__":  # list every module's package imports
    for module, targets in sorted(import_graph().items()):
        print(module, "->", ", ".join(sorted(targets)) or "-")
