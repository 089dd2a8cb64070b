#!/usr/bin/env bash
# The comparative benchmark suite, one command (issue #7):
#   bash scripts/bench.sh [--quick] [--rows raw,litellm,proxy,sidecar,sidecar-litellm,exo]
#                         [--streams 1,32,128] [--rate 50] [--seconds 10] [--sidecar-workers N]
#                         [--out bench-results/suite.json]
#                         [--phases streaming,requests] [--request-rows raw,sidecar,sidecar-w2,proxy]
#                         [--request-rates 100,200,300,400,500,600,800] [--request-seconds 5]
# (--phases requests alone: the request-rate sweep of issue #23, short requests per second.)
# Builds .venv (and, with EXO_SRC set, .venvs/exo-pins with classic exo for the exo row) via
# scripts/bootstrap.sh (which also builds .venvs/litellm-proxy for the proxy row), then runs
# benchmarks/suite.py: a markdown table and targets on stdout, JSON in bench-results/.
# Everything talks to 127.0.0.1 only. Re-runs skip environments that are up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
export LITELLM_LOCAL_MODEL_COST_MAP=True
export LITELLM_TELEMETRY=False

# The exo row needs the pinned environment with classic exo in it; without EXO_SRC it is
# skipped, so the pinned environment is not built just for this.
if [ -n "${EXO_SRC:-}" ]; then
  BOOTSTRAP_PINS=${BOOTSTRAP_PINS:-1} bash scripts/bootstrap.sh
else
  BOOTSTRAP_PINS=${BOOTSTRAP_PINS:-0} bash scripts/bootstrap.sh
fi

# scripts/bootstrap.sh built .venvs/litellm-proxy for the proxy row.
exec .venv/bin/python -m benchmarks.suite "$@"
