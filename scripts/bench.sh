#!/usr/bin/env bash
# End-to-end benchmarks (issue 10): makes sure RabbitMQ runs and moto is installed
# (scripts/services.sh up), then runs `cargo bench --bench offboard -- ARGS`
# (see benches/offboard.rs for the arguments). The bench starts its own simulator, S3 server
# (a fresh moto per run) and worker processes, and stops them afterwards.
#
#   scripts/bench.sh                 full run: BENCHMARKS.md and docs/bench/*.svg
#   scripts/bench.sh --quick         scaled down: target/bench-quick/
#   scripts/bench.sh --only layoff   one workload (layoff,client,scaleout,overhead,memory,startup,simtp)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export AWS_EC2_METADATA_DISABLED=true
CARGO="${CARGO:-cargo}"

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

if ! port_open 127.0.0.1 5672 || ! python3 -c 'import moto.server' >/dev/null 2>&1; then
  scripts/services.sh up
fi
echo "[bench] load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec "$CARGO" bench --locked --bench offboard -- "$@"
