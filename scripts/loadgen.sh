#!/usr/bin/env bash
# Dispatch benchmark (docs/reliability.md): a fresh database, one coordinator process, and
# fleetmark-loadgen with many simulated agents speaking the real protocol over loopback.
#
#   scripts/loadgen.sh [loadgen flags...]        e.g. scripts/loadgen.sh --agents 100 --jobs 10000
#
# PREFILL_FINISHED=N first fills the tables with N finished jobs and their results (in SQL, as
# a completed sweep of another agent), for the "rate with a full table" figure.
#
# PGURL (default postgres://postgres@127.0.0.1:5432) must allow CREATE DATABASE. PROFILE picks the
# cargo profile (default dev: dependencies optimised, our crates at opt-level 1; use release for
# figures); binaries are taken from $CARGO_TARGET_DIR (default target/), or from BIN_DIR without
# building. DB_CONNECTIONS is the coordinator's pool size (default 16). Prints the loadgen's JSON
# report on stdout, and on stderr the CPU seconds the coordinator, this database's Postgres
# backends and the loadgen used during the load.
set -euo pipefail
cd "$(dirname "$0")/.."
PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
PROFILE=${PROFILE:-dev}
DB_CONNECTIONS=${DB_CONNECTIONS:-16}
DB="fleetmark_loadgen_$$"
dir=debug
[ "$PROFILE" = release ] && dir=release
bin="${CARGO_TARGET_DIR:-target}/$dir"
if [ -n "${BIN_DIR:-}" ]; then
  bin=$BIN_DIR # binaries built earlier (say, of another commit, for a before/after pair)
else
  cargo build --quiet --profile "$PROFILE" -p fleetmark-coordinator -p fleetmark-loadgen >&2
fi
echo "postgres autovacuum: $(psql -At "$PGURL/postgres" -c 'SHOW autovacuum') (a soak needs it on)" >&2
psql -q "$PGURL/postgres" -c "CREATE DATABASE $DB" >&2
psql -q "$PGURL/postgres" -c "ALTER DATABASE $DB SET track_functions = 'all'" >&2
# DB_SETTINGS="name=value ...": more per-database settings for an experiment (each is printed).
for kv in ${DB_SETTINGS:-}; do
  echo "database setting for this run: $kv" >&2
  psql -q "$PGURL/postgres" -c "ALTER DATABASE $DB SET ${kv%%=*} = '${kv#*=}'" >&2
done
# One admin token: agents register with it and sweeps are submitted with it.
token=$("$bin/fleetmark-coordinator" token create --role admin --name loadgen \
  --database-url "$PGURL/$DB" | tail -n 1)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$(mktemp /tmp/fleetmark-loadgen-coordinator.XXXXXX.log)
RUST_LOG=warn "$bin/fleetmark-coordinator" --listen "127.0.0.1:$port" \
  --database-url "$PGURL/$DB" --db-connections "$DB_CONNECTIONS" \
  --register-per-minute 100000 --submit-per-minute 100000 --max-pending-jobs 1000000 >"$log" 2>&1 &
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
if [ "${PREFILL_FINISHED:-0}" -gt 0 ]; then
  # The same moves a coordinator makes (claim, result, success), so the triggers accept them.
  psql -q -v ON_ERROR_STOP=1 -v n="$PREFILL_FINISHED" "$PGURL/$DB" >&2 <<'SQL'
INSERT INTO agents (id, name, inventory, devices)
VALUES ('00000000-0000-0000-0000-0000000000aa', 'prefill', '{}',
        '[{"device": "cpu", "kind": "cpu", "name": "prefill cpu"}]');
INSERT INTO sweeps (id, name, spec, spec_toml)
VALUES ('00000000-0000-0000-0000-0000000000bb', 'prefill', '{}', '');
INSERT INTO jobs (id, sweep_id, seq, spec, target)
SELECT gen_random_uuid(), '00000000-0000-0000-0000-0000000000bb', i,
       jsonb_build_object('model', 'resnet18', 'batch_size', 1 + i % 10, 'precision', 'f32',
                          'image_size', 32, 'target', 'any', 'pad', repeat('x', 150)), 'any'
FROM generate_series(0, :n - 1) i;
UPDATE jobs SET state = 'running', attempt = 1,
       lease_agent_id = '00000000-0000-0000-0000-0000000000aa', lease_device = 'cpu',
       lease_expires_at = now() + interval '1 hour',
       last_agent_id = '00000000-0000-0000-0000-0000000000aa', last_device = 'cpu',
       started_at = now()
WHERE sweep_id = '00000000-0000-0000-0000-0000000000bb';
INSERT INTO results (id, job_id, sweep_id, agent_id, attempt, model, batch_size, precision,
    image_size, hardware_kind, hardware_name, device, backend, path, math, simulated, throttled,
    mean_ms, std_ms, p50_ms, p90_ms, p99_ms, ci95_low_ms, ci95_high_ms, images_per_sec,
    peak_memory_bytes, latencies_ms, record, finished_at, content_sha256)
SELECT gen_random_uuid(), id, sweep_id, lease_agent_id, 1, 'resnet18', 1, 'f32', 32, 'cpu',
       'prefill cpu', 'cpu', 'simulated', 'loadgen', 'f32', true, false, 1.1, 0.1, 1.1, 1.2,
       1.2, 1.0, 1.2, 900, 0, '{1.0,1.1,1.2}', jsonb_build_object('pad', repeat('x', 1500)),
       now(), encode(sha256(id::text::bytea), 'hex')
FROM jobs WHERE sweep_id = '00000000-0000-0000-0000-0000000000bb';
UPDATE jobs SET state = 'succeeded', lease_agent_id = NULL, lease_device = NULL,
       lease_expires_at = NULL, finished_at = now(), fraction = 1, phase = 'done'
WHERE sweep_id = '00000000-0000-0000-0000-0000000000bb';
UPDATE sweeps SET state = 'completed', finished_at = now()
WHERE id = '00000000-0000-0000-0000-0000000000bb';
VACUUM ANALYZE;
SQL
  echo "prefilled $PREFILL_FINISHED finished jobs with results" >&2
fi
# CPU seconds (user + system) of a set of processes, from /proc.
cpu_of() {
  local total=0 pid t
  for pid in "$@"; do
    t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + t))
  done
  echo "scale=2; $total / $(getconf CLK_TCK)" | bc
}
backends() {
  psql -At "$PGURL/postgres" -c "SELECT pid FROM pg_stat_activity WHERE datname = '$DB'"
}
coord_cpu0=$(cpu_of "$coord")
# shellcheck disable=SC2046
db_cpu0=$(cpu_of $(backends))
/usr/bin/time -f "cpu_seconds loadgen=%U+%S" "$bin/fleetmark-loadgen" --coordinator "http://127.0.0.1:$port" \
  --database-url "$PGURL/$DB" --token "$token" --rss-pid "$coord" "$@"
# The coordinator's pool keeps its connections for the whole run, so the CPU of this database's
# backends now, less what they had used before the load, is what the load cost Postgres
# (background processes such as the WAL writer and autovacuum are not included).
# shellcheck disable=SC2046
echo "cpu_seconds coordinator=$(echo "$(cpu_of "$coord") - $coord_cpu0" | bc) \
postgres_backends=$(echo "$(cpu_of $(backends)) - $db_cpu0" | bc)" >&2
