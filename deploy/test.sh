#!/usr/bin/env bash
# Run the test suite on a fresh Debian machine: installs what the tests need, then pytest.
# Extra arguments go to pytest (e.g. deploy/test.sh -k fanout -x).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_command redis-server redis-server   # the integration tests start their own on a free port
ensure_command node nodejs                 # the chatgpt npm package is tested against the relay
ensure_command npm npm
ensure_command chromium chromium           # the page's tests run in real headless Chromium
ensure_command nginx nginx                 # deploy/nginx.conf is tested in front of gunicorn
ensure_venv dev
say "running the tests"
exec "$PY" -m pytest "$@"
