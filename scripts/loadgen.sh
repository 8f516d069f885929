#!/usr/bin/env bash
# Dispatch benchmark (docs/reliability.md): a fresh database, one coordinator process, and
# fleetmark-loadgen with many simulated agents speaking the real protocol over loopback.
#
#   scripts/loadgen.sh [loadgen flags...]        e.g. scripts/loadgen.sh --agents 100 --jobs 10000
#
# PGURL (default postgres://postgres@127.0.0.1:5432) must allow CREATE DATABASE. PROFILE picks the
# cargo profile (default dev: dependencies optimised, our crates at opt-level 1; use release for
# final figures when there is time to build it). Prints the loadgen's JSON report on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
PROFILE=${PROFILE:-dev}
DB_CONNECTIONS=${DB_CONNECTIONS:-16}
DB="fleetmark_loadgen_$$"
dir=debug
[ "$PROFILE" = release ] && dir=release
cargo build --quiet --profile "$PROFILE" -p fleetmark-coordinator -p fleetmark-loadgen >&2
psql -q "$PGURL/postgres" -c "CREATE DATABASE $DB" >&2
psql -q "$PGURL/postgres" -c "ALTER DATABASE $DB SET track_functions = 'all'" >&2
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$(mktemp /tmp/fleetmark-loadgen-coordinator.XXXXXX.log)
RUST_LOG=warn "target/$dir/fleetmark-coordinator" --listen "127.0.0.1:$port" \
  --database-url "$PGURL/$DB" --db-connections "$DB_CONNECTIONS" >"$log" 2>&1 &
coord=$!
cleanup() {
  kill "$coord" 2>/dev/null || true
  wait "$coord" 2>/dev/null || true
  psql -q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >&2 || true
}
trap cleanup EXIT
for _ in $(seq 1 300); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
echo "coordinator pid $coord on port $port, database $DB, log $log" >&2
"target/$dir/fleetmark-loadgen" --coordinator "http://127.0.0.1:$port" \
  --database-url "$PGURL/$DB" --rss-pid "$coord" "$@"
