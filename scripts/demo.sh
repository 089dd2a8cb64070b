#!/usr/bin/env bash
# The main job on a fresh machine, offline and with no API keys: install, start a sidecar
# on loopback with the embedded default model, list its models, stream a reply, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
BOOTSTRAP_PINS=0 bash scripts/bootstrap.sh
export LITELLM_LOCAL_MODEL_COST_MAP=True
LOG=$(mktemp)
.venv/bin/exo-remote-sidecar --listen 127.0.0.1:0 ${EXO_REMOTE_CONFIG:+--config "$EXO_REMOTE_CONFIG"} >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 1 300); do
  PORT=$(sed -n 's/^exo-remote-sidecar listening on port \([0-9]*\)$/\1/p' "$LOG")
  [ -n "$PORT" ] && break
  kill -0 $PID 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.1
done
[ -n "${PORT:-}" ] || { echo "sidecar did not start"; cat "$LOG"; exit 1; }
echo "== sidecar on 127.0.0.1:$PORT"
.venv/bin/exo-remote --sidecar "127.0.0.1:$PORT" models
echo "== streamed reply"
.venv/bin/exo-remote --sidecar "127.0.0.1:$PORT" chat "${1:-Hello from a fresh machine! 👋 Ça va?}"
