"""The TUI hooks on exo's stand-in (tests/support/fake_exo.py, shaped like exo's TopologyViz):
the prompt panel shows the user's last message instead of the add-on's envelope, and a
remote node's entry on the ring gets one line per sidecar host with its health (issue #27).
The same hooks run against real exo under tmux in tests/real_exo/test_exo_tui.py."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from exo_remote_engine import engine_adapter
from exo_remote_engine.engine import exo_hooks
from exo_remote_engine.engine.cluster import ClusterView
from exo_remote_engine.engine.exo_hooks import tui
from exo_remote_engine.engine.exo_hooks.state import STATE
from exo_remote_engine.engine.tokenizer import RemoteTokenizer
from tests.support import fake_exo

LOCAL_ARGV = ["exo", "--inference-engine", "dummy"]


@pytest.fixture
def viz(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """exo's TUI class with the hooks installed (a local node: the TUI hooks are on every node)."""
    modules = fake_exo.build_modules()
    for name in [n for n in sys.modules if n == "exo" or n.startswith("exo.")]:
        monkeypatch.delitem(sys.modules, name)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(engine_adapter, "_shared", None)
    exo_hooks.uninstall()
    assert exo_hooks.install(list(LOCAL_ARGV), {}) is True
    STATE.view = ClusterView("d")
    yield types.SimpleNamespace(TopologyViz=modules["exo.viz.topology_viz"].TopologyViz, exo=modules)
    exo_hooks.uninstall()


def test_prompt_panel_shows_the_last_user_message_not_the_envelope(viz: types.SimpleNamespace) -> None:
    screen = viz.TopologyViz()
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "What is in"}, {"type": "image_url", "image_url": {}}]},
    ]
    envelope = RemoteTokenizer().apply_chat_template(conversation, params={"max_tokens": 5})
    assert isinstance(envelope, str) and "exo-remote/v1" in envelope
    screen.update_prompt("r1", envelope)  # what exo's start_process_prompt status carries
    assert screen.requests["r1"][0] == "What is in [image]"
    screen.update_prompt("r2", "a local model's prompt")  # local models: as exo shows them
    assert screen.requests["r2"][0] == "a local model's prompt"
    screen.update_prompt("r3", "\x1eexo-remote/v1\x1e{not json")
    assert screen.requests["r3"][0] == "(prompt not readable)"


def _two_node_ring(screen: types.SimpleNamespace, exo: dict[str, types.ModuleType]) -> None:
    caps = exo["exo.topology.device_capabilities"]
    flops = caps.DeviceFlops(0, 0, 0)
    screen.topology.nodes = {
        "r": caps.DeviceCapabilities("remote LLM", "sidecar 10.0.0.5:50505", 23 * 1024, flops),
        "d": caps.DeviceCapabilities("Linux Box", "CPU", 16 * 1024, flops),
    }
    partition = exo["exo.topology.partitioning_strategy"].Partition
    screen.partitions = [partition("r", 1.0, 1.0), partition("d", 0.0, 1.0)]


def test_a_remote_node_entry_lists_each_sidecar_host_with_its_health(viz: types.SimpleNamespace) -> None:
    screen = viz.TopologyViz()
    _two_node_ring(screen, viz.exo)
    plain = screen._generate_main_layout()
    announcement = ClusterView.announcement(
        "r",
        "RemoteLLMInferenceEngine",
        {"m": "m"},
        "10.0.0.5:1,10.0.0.6:2",
        sidecar_hosts={"10.0.0.5:1": "SERVING", "10.0.0.6:2": "unreachable"},
    )
    STATE.view.absorb(announcement)
    rows = screen._generate_main_layout().split("\n")
    assert rows[10][4:25] == "-emote LLM 23GB" + " " * 6, "exo's own entry is untouched"
    assert rows[12][4:15] == "[1.00-1.00]"
    assert rows[13][4:].rstrip() == "1/2 sidecar hosts serving:"
    assert rows[14][4:].rstrip() == " ● 10.0.0.5:1 SERVING"
    assert rows[15][4:].rstrip() == " ○ 10.0.0.6:2 unreachable"
    assert "sidecar hosts" not in "\n".join(rows[16:]), "the local node's entry gets no host lines"
    assert plain.split("\n")[13].strip() == "", "nothing is drawn without hosts to show"
    assert screen.topology.nodes["r"].model == "remote LLM", "the topology exo drew from is unchanged"


def test_host_lines_near_the_right_edge_move_left_to_fit_exo_canvas(viz: types.SimpleNamespace) -> None:
    screen = viz.TopologyViz()
    _two_node_ring(screen, viz.exo)
    screen.partitions.reverse()  # the remote node's entry now starts at column 54
    hosts = {"10.0.0.5:50505": "SERVING", "sidecar-b.example.internal:50505": "NOT SERVING"}
    STATE.view.absorb(ClusterView.announcement("r", "RemoteLLMInferenceEngine", {}, "x", sidecar_hosts=hosts))
    rows = screen._generate_main_layout().split("\n")
    longest = " ○ sidecar-b.example.internal:50505 NOT SERVING"
    assert rows[22][54:69] == "-emote LLM 23GB"
    assert rows[25].rstrip().endswith("1/2 sidecar hosts serving:") and rows[27].endswith(longest)
    assert len(rows[27]) == 100 and rows[27].index(longest) == 100 - len(longest) < 54


def test_host_lines_are_clipped_to_exo_canvas_and_made_printable() -> None:
    lines = tui.host_lines({"h\x1b[31m:1": "SERVING", "b:2": "NOT SERVING"})
    assert lines == ["1/2 sidecar hosts serving:", " ● h?[31m:1 SERVING", " ○ b:2 NOT SERVING"]
