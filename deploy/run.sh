#!/usr/bin/env bash
# Run the whole stack locally: Redis, the upstream simulator (unless an upstream is configured),
# a worker and gunicorn; then stream a demo reply. Ctrl-C stops everything it started.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

PORT="${RELAY_PORT:-8000}"
SIM_PORT="${RELAY_SIM_PORT:-8081}"
STATE="$ROOT/.local"
mkdir -p "$STATE"
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  [ ${#PIDS[@]} -gt 0 ] && kill "${PIDS[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

ensure_venv

redis_reachable() {
  "$PY" -c 'import redis, sys; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()' \
    "$1" 2>/dev/null
}

export RELAY_REDIS_URL="${RELAY_REDIS_URL:-redis://127.0.0.1:6379/0}"
if redis_reachable "$RELAY_REDIS_URL"; then
  say "using Redis at $RELAY_REDIS_URL"
else
  ensure_command redis-server redis-server
  # Debian's package starts a system service; use it if it is the one we were told about.
  if ! redis_reachable "$RELAY_REDIS_URL"; then
    REDIS_PORT="$("$PY" -c 'import sys, urllib.parse; print(urllib.parse.urlparse(sys.argv[1]).port or 6379)' "$RELAY_REDIS_URL")"
    say "starting redis-server on port $REDIS_PORT (data in $STATE)"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STATE" --appendonly yes \
      --save "" >"$STATE/redis.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do redis_reachable "$RELAY_REDIS_URL" && break; sleep 0.1; done
    redis_reachable "$RELAY_REDIS_URL" || { echo "redis-server did not start: $STATE/redis.log" >&2; exit 1; }
  fi
fi

if [ -z "${RELAY_UPSTREAM_API_KEY:-}" ] && [ -z "${RELAY_UPSTREAM_BASE_URL:-}" ]; then
  say "no upstream configured: starting the simulator on port $SIM_PORT"
  "$PY" -m relay.simulator --port "$SIM_PORT" --interval "${RELAY_SIM_INTERVAL:-0.05}" \
    >"$STATE/simulator.log" 2>&1 &
  PIDS+=($!)
  export RELAY_UPSTREAM_BASE_URL="http://127.0.0.1:$SIM_PORT/v1"
  export RELAY_DEFAULT_MODEL="${RELAY_DEFAULT_MODEL:-simulator}"
fi

say "starting a worker (log: $STATE/worker.log)"
"$PY" -m worker >"$STATE/worker.log" 2>&1 &
PIDS+=($!)

say "starting gunicorn on 127.0.0.1:$PORT (log: $STATE/web.log)"
RELAY_BIND="127.0.0.1:$PORT" RELAY_WEB_PROCESSES="${RELAY_WEB_PROCESSES:-2}" \
  "$PY" -m gunicorn -c deploy/gunicorn.conf.py >"$STATE/web.log" 2>&1 &
PIDS+=($!)

"$PY" -m relay.demo "http://127.0.0.1:$PORT" || { echo "demo failed; see $STATE/*.log" >&2; exit 1; }

say "the stack is running; Ctrl-C stops it"
wait -n "${PIDS[@]}" || true
echo "a process exited; see $STATE/*.log" >&2
