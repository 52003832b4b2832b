#!/usr/bin/env bash
# The benchmark suite (tests/bench/README): installs what it needs, runs every scenario, and
# rewrites tests/bench/RESULTS.md, results.json and p99.png. Arguments go to run.py, e.g.
#   bash tests/bench/run.sh --only fanout peer      # some scenarios
#   bash tests/bench/run.sh --smoke                 # tiny loads, results in a temp dir
#   bash tests/bench/run.sh --cluster               # many jobs: one Redis, then a cluster
set -euo pipefail
source "$(dirname "$0")/../../deploy/lib.sh"
cd "$ROOT"
ensure_command redis-server redis-server
ensure_venv bench
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # thousands of sockets on each side
if [[ "${1:-}" == "--cluster" ]]; then   # one Redis beside a Redis Cluster (tests/bench/cluster.py)
    shift
    say "running the cluster benchmark (about 4 minutes)"
    exec "$PY" -m tests.bench.cluster "$@"
fi
say "running the benchmarks (about 8 minutes)"
exec "$PY" -m tests.bench.run --clients 2 "$@"
