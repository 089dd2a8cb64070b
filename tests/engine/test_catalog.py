"""The remote node's start-up line (issue #27): a sidecar with discovery on lists ~70
hosted models of which few are ready; the line names the ready ones and counts the rest
by what would make them ready, instead of one 2 KB line of every id."""

from __future__ import annotations

from exo_remote_engine.engine.catalog import RemoteCatalog
from exo_remote_engine.generated import remote_inference_pb2 as pb

OPENAI_KEY = "set OPENAI_API_KEY on the sidecar"
ANTHROPIC_KEY = "set ANTHROPIC_API_KEY on the sidecar"


def _catalog(models: list[pb.Model], default: str = "") -> RemoteCatalog:
    catalog = RemoteCatalog()
    catalog.update(pb.ListModelsResponse(models=models, default_model=default))
    return catalog


def test_one_ready_model_and_68_waiting_fit_one_short_line() -> None:
    models = [pb.Model(alias="local-llm", provider="embedded", ready=True)]
    models += [pb.Model(alias=f"gpt-{i}-very-long-model-name", not_ready_reason=OPENAI_KEY) for i in range(40)]
    models += [pb.Model(alias=f"claude-{i}", not_ready_reason=ANTHROPIC_KEY) for i in range(28)]
    line = _catalog(models, "local-llm").summary("10.0.0.5:50505")
    assert line == (
        "sidecar 10.0.0.5:50505 serves 1 ready model: local-llm (default); 68 more not ready "
        f"({OPENAI_KEY}: 40; {ANTHROPIC_KEY}: 28; `exo-remote models` lists them)"
    )
    assert len(line) < 200 and "gpt-0" not in line


def test_many_ready_models_and_reasons_are_capped() -> None:
    models = [pb.Model(alias=f"m{i}", ready=True) for i in range(12)]
    models += [pb.Model(alias=f"w{i}", not_ready_reason=f"reason {i % 5} " + "x" * 80) for i in range(10)]
    models.append(pb.Model(alias="bare"))  # not ready, no reason given
    line = _catalog(models).summary("s:1")
    assert line.startswith("sidecar s:1 serves 12 ready models: m0 (default), m1, m2, m3, m4, m5, m6, m7, and 4 more;")
    assert "11 more not ready (" in line and "; 3 other reasons;" in line
    assert "x" * 60 not in line, "long reasons are clipped"


def test_nothing_ready_says_so() -> None:
    line = _catalog([pb.Model(alias="a", not_ready_reason=OPENAI_KEY)]).summary("s:1")
    waiting = f"1 more not ready ({OPENAI_KEY}: 1; `exo-remote models` lists them)"
    assert line == f"sidecar s:1 serves 0 ready models; {waiting}"
    assert _catalog([]).summary("s:1") == "sidecar s:1 serves 0 ready models"
