#!/usr/bin/env bash
# The whole test suite, from a fresh clone: builds the environments, lints, type-checks,
# checks the wire contract, then runs pytest. Real-exo tests run when EXO_SRC points at
# a classic exo source tree (commit e4238f9ef) and are skipped with the reason otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export LITELLM_LOCAL_MODEL_COST_MAP=True
export EXO_REMOTE_PINS_PYTHON="$PWD/.venvs/exo-pins/bin/python"
echo "[test] ruff"; .venv/bin/ruff check .
echo "[test] mypy"; .venv/bin/mypy exo_remote_engine
# -rs: every skip with its reason (with CI=true only EXO_SRC's may remain: tests/support/real_parts.py).
# The modules, and the tests in each, run in a shuffled order; the seed is printed, and
# `--random-order-seed=N` replays it (pytest-random-order).
echo "[test] pytest"; .venv/bin/python -m pytest -rs --random-order-bucket=module "$@"
