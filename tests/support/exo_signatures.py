"""Classic exo's signatures and attributes the hooks touch, pinned in exo_signatures.json.

tests/support/fake_exo.py stands in for exo in CI, so it must look like exo wherever the
hooks touch it. Every name the hook plans patch or need (``exo_hooks.build_plan``, for a
remote and a local node) is described here: what it is (class, function, coroutine
function, dict, ...), its parameter names in order, and, for a class the hooks read
instances of, which of the attributes they read exo's ``__init__`` sets. The file was
written from exo e4238f9ef with::

    EXO_SRC=/path/to/exo .venvs/exo-pins/bin/python -m tests.support.exo_signatures --write

CI checks the fakes against the file (tests/engine/test_exo_signatures.py); with EXO_SRC the
real-exo tests check the file against exo (``--check``, tests/real_exo/test_exo_e2e.py).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

SIGNATURES = Path(__file__).with_name("exo_signatures.json")
EXO_COMMIT = "e4238f9ef"


def _touched() -> dict[str, tuple[Any, set[str]]]:
    """Every target of both plans: its description -> (Target, instance attributes read)."""
    from exo_remote_engine.engine import exo_hooks

    found: dict[str, tuple[Any, set[str]]] = {}
    for remote in (True, False):
        plan = exo_hooks.build_plan(remote_node=remote)
        for need in [p.needs() for p in plan.patches] + plan.needs:
            _, attrs = found.setdefault(need.target.describe(), (need.target, set()))
            attrs.update(need.instance_attrs)
    return found


def _kind(value: Any) -> str:
    if inspect.isclass(value):
        return "class"
    if isinstance(value, property):
        return "property"
    if inspect.iscoroutinefunction(value):
        return "coroutine function"
    if inspect.isfunction(value) or inspect.ismethod(value):
        return "function"
    return type(value).__name__


def _params(value: Any) -> list[str] | None:
    if not callable(value) or isinstance(value, property):
        return None
    try:
        return list(inspect.signature(value).parameters)
    except (TypeError, ValueError):
        return None


def snapshot() -> dict[str, dict[str, Any]]:
    """What the exo importable now (real, or the fakes in sys.modules) has at each target."""
    from exo_remote_engine.engine.exo_hooks.plan import _names_set_in_init

    described: dict[str, dict[str, Any]] = {}
    for name, (target, attrs) in sorted(_touched().items()):
        try:
            value = inspect.getattr_static(target.container(), target.attr)
        except Exception as exc:  # ImportError, AttributeError, anything an import raises
            described[name] = {"missing": type(exc).__name__}
            continue
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        entry: dict[str, Any] = {"kind": _kind(value)}
        params = _params(value)
        if params is not None:
            entry["params"] = params
        if attrs:
            assigned = _names_set_in_init(value)
            entry["instance_attrs"] = sorted(a for a in attrs if a in assigned or hasattr(value, a))
        described[name] = entry
    return described


def differences(expected: dict[str, dict[str, Any]], actual: dict[str, dict[str, Any]]) -> list[str]:
    """Where ``actual`` differs from ``expected``, one line each (empty: the same)."""
    found: list[str] = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            found.append(f"{name}: not a target of the hooks any more (rewrite the file)")
        elif name not in expected:
            found.append(f"{name}: a new target of the hooks, not in the file (rewrite it with EXO_SRC)")
        elif expected[name] != actual[name]:
            found.append(f"{name}: expected {expected[name]}, found {actual[name]}")
    return found


def pinned() -> dict[str, dict[str, Any]]:
    data = json.loads(SIGNATURES.read_text(encoding="utf-8"))
    assert data["exo_commit"] == EXO_COMMIT, data["exo_commit"]
    targets: dict[str, dict[str, Any]] = data["targets"]
    return targets


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"write {SIGNATURES.name} from the exo importable here")
    action.add_argument("--check", action="store_true", help=f"compare the exo importable here with {SIGNATURES.name}")
    args = parser.parse_args(argv)
    import exo  # noqa: F401  (fails early, and clearly, where exo is not importable)

    current = snapshot()
    if args.write:
        data = {"exo_commit": EXO_COMMIT, "targets": current}
        SIGNATURES.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {len(current)} targets to {SIGNATURES}")
        return 0
    problems = differences(pinned(), current)
    print(json.dumps({"targets": len(current), "differences": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
