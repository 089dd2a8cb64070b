"""The fake exo of the hook tests (tests/support/fake_exo.py) looks like classic exo wherever
the hooks touch it: the same kinds, parameter names in the same order, and the instance
attributes the hooks read, as pinned from exo e4238f9ef in tests/support/exo_signatures.json
(real exo is checked against that file by tests/real_exo/test_exo_e2e.py with EXO_SRC)."""

from __future__ import annotations

import sys

import pytest

from tests.support import exo_signatures, fake_exo


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake exo modules in sys.modules for one test (no hooks installed)."""
    fake_exo.use_fakes(monkeypatch)


def test_the_fakes_match_exos_pinned_signatures(fakes: None) -> None:
    pinned = exo_signatures.pinned()
    assert len(pinned) >= 40 and not [n for n, e in pinned.items() if "missing" in e], "a complete pin of exo"
    problems = exo_signatures.differences(pinned, exo_signatures.snapshot())
    assert not problems, "tests/support/fake_exo.py differs from exo e4238f9ef:\n" + "\n".join(problems)


def test_the_check_sees_a_fake_that_drifted(fakes: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A renamed parameter, a sync stand-in for a coroutine and a lost attribute all show."""
    node = sys.modules["exo.orchestration.node"].Node

    async def process_prompt(self: object, shard: object, prompt: str, request_id: str | None = None) -> None:
        return None

    def start(self: object, wait_for_peers: int = 0) -> None:
        return None

    monkeypatch.setattr(node, "process_prompt", process_prompt)
    monkeypatch.setattr(node, "start", start)
    monkeypatch.delattr(sys.modules["exo"], "VERSION")
    problems = "\n".join(exo_signatures.differences(exo_signatures.pinned(), exo_signatures.snapshot()))
    assert "exo.orchestration.node.Node.process_prompt: expected" in problems, problems
    assert "exo.orchestration.node.Node.start: expected {'kind': 'coroutine function'" in problems, problems
    assert "exo.VERSION: expected {'kind': 'str'}, found {'missing': 'AttributeError'}" in problems, problems
