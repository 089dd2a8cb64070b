"""All-or-nothing patching: every change to exo is a :class:`Patch` in one :class:`PatchPlan`.

exo has no plugin mechanism, so the add-on replaces functions and methods. A half-applied
set of patches is worse than none (a remote engine registered but its node hooks missing
misroutes requests), so a plan is first *checked* against the exo that is installed
(every target and everything the hooks read must be there, with the parameter names the
hooks pass by keyword) and only then *applied*; an error while applying rolls back what
was already applied. Nothing here knows about exo's contents: the hook modules declare
their targets, this module only resolves, checks, applies and reverts them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

_ABSENT = object()


@dataclass(frozen=True)
class Target:
    """A name in exo: ``module.attr`` or, with ``owner``, ``module.owner.attr``."""

    module: str
    attr: str
    owner: str | None = None

    def describe(self) -> str:
        return f"{self.module}.{self.owner + '.' if self.owner else ''}{self.attr}"

    def container(self) -> Any:
        """The module or class holding ``attr`` (raises ImportError/AttributeError)."""
        module = sys.modules.get(self.module) or importlib.import_module(self.module)
        return getattr(module, self.owner) if self.owner else module

    def resolve(self) -> Any:
        return getattr(self.container(), self.attr)


@dataclass(frozen=True)
class Needs:
    """Something a hook relies on without replacing it: a name, the parameter names it
    passes by keyword, and (for a class) attributes its ``__init__`` sets that hooks read."""

    target: Target
    params: tuple[str, ...] = ()
    instance_attrs: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        try:
            value = self.target.resolve()
        except Exception as exc:  # ImportError, AttributeError, anything exo's import raises
            return [f"{self.target.describe()} ({type(exc).__name__})"]
        found: list[str] = []
        if self.params:
            names = _parameter_names(value)
            lacking = [p for p in self.params if names is not None and p not in names]
            if names is None or lacking:
                found.append(f"{self.target.describe()} parameters {lacking or list(self.params)}")
        if self.instance_attrs:
            assigned = _names_set_in_init(value)
            lacking = [a for a in self.instance_attrs if a not in assigned and not hasattr(value, a)]
            if lacking:
                found.append(f"{self.target.describe()} instance attributes {lacking}")
        return found


def _parameter_names(value: Any) -> set[str] | None:
    try:
        return set(inspect.signature(value).parameters)
    except (TypeError, ValueError):
        return None


def _names_set_in_init(cls: Any) -> set[str]:
    """Attribute names exo's ``__init__`` stores (read from its code object, never run)."""
    init = inspect.unwrap(getattr(cls, "__init__", None) or (lambda: None))
    code = getattr(init, "__code__", None)
    return set(code.co_names) if code is not None else set()


@dataclass(frozen=True)
class Patch:
    """Replace ``target`` with ``hook`` bound to exo's original (its first argument), or,
    with ``dict_key``, add ``value`` under that key of the dict ``target`` names."""

    target: Target
    hook: Callable[..., Any] | None = None
    params: tuple[str, ...] = ()  # exo's parameter names the hook passes by keyword / reads
    dict_key: str | None = None
    value: Any = None
    async_hook: Callable[..., Any] | None = None  # used instead of ``hook`` when exo's is async

    def needs(self) -> Needs:
        return Needs(self.target, self.params)


def bind(hook: Callable[..., Any], original: Any) -> Callable[..., Any]:
    """``hook(original, *args, **kwargs)`` with exo's name, docstring and signature, so
    the result works as a function and as a method and is a coroutine function when the
    hook is one."""
    if inspect.iscoroutinefunction(hook):

        @functools.wraps(original)
        async def patched_async(*args: Any, **kwargs: Any) -> Any:
            return await hook(original, *args, **kwargs)

        patched: Callable[..., Any] = patched_async
    else:

        @functools.wraps(original)
        def patched_sync(*args: Any, **kwargs: Any) -> Any:
            return hook(original, *args, **kwargs)

        patched = patched_sync
    patched.__exo_remote_hook__ = hook  # type: ignore[attr-defined]
    return patched


@dataclass
class _Undo:
    container: Any
    attr: str
    previous: Any  # _ABSENT: the attribute was not in the container's own namespace
    copies: list[tuple[Any, Any]] = field(default_factory=list)  # (module, previous value)
    dict_key: str | None = None

    def run(self) -> None:
        if self.dict_key is not None:
            mapping = getattr(self.container, self.attr)
            if self.previous is _ABSENT:
                mapping.pop(self.dict_key, None)
            else:
                mapping[self.dict_key] = self.previous
            return
        for module, value in self.copies:
            setattr(module, self.attr, value)
        if self.previous is _ABSENT:
            delattr(self.container, self.attr)
        else:
            setattr(self.container, self.attr, self.previous)


class PatchPlan:
    """The patches of one install, checked before any of them is applied."""

    def __init__(self, patches: Iterable[Patch], needs: Iterable[Needs] = ()) -> None:
        self.patches = list(patches)
        self.needs = list(needs)
        self._undo: list[_Undo] = []

    def missing(self) -> list[str]:
        """What this exo lacks of what the plan needs (empty: the plan fits)."""
        found: list[str] = []
        for need in [p.needs() for p in self.patches] + self.needs:
            for problem in need.problems():
                if problem not in found:
                    found.append(problem)
        return found

    def apply(self) -> None:
        """Apply every patch, or none: any error reverts those already applied, re-raised."""
        try:
            for patch in self.patches:
                self._undo.append(_apply(patch))
        except BaseException:
            self.revert()
            raise

    def revert(self) -> None:
        """Put back exactly what exo had, newest patch first."""
        while self._undo:
            self._undo.pop().run()

    @property
    def applied(self) -> Sequence[_Undo]:
        return tuple(self._undo)


def _apply(patch: Patch) -> _Undo:
    container = patch.target.container()
    attr = patch.target.attr
    if patch.dict_key is not None:
        mapping = getattr(container, attr)
        undo = _Undo(container, attr, mapping.get(patch.dict_key, _ABSENT), dict_key=patch.dict_key)
        mapping[patch.dict_key] = patch.value
        return undo
    assert patch.hook is not None, patch
    own = vars(container).get(attr, _ABSENT) if inspect.isclass(container) else getattr(container, attr)
    original = getattr(container, attr)
    async_original = inspect.iscoroutinefunction(original)
    replacement = bind(patch.async_hook if patch.async_hook and async_original else patch.hook, original)
    undo = _Undo(container, attr, own)
    setattr(container, attr, replacement)
    if not inspect.isclass(container):
        # ``from x import y`` made copies: re-bind those already loaded in exo's modules.
        for name, module in list(sys.modules.items()):
            if module is container or not (name == "exo" or name.startswith("exo.")):
                continue
            if getattr(module, attr, None) is original:
                undo.copies.append((module, original))
                setattr(module, attr, replacement)
    return undo
