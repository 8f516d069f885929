#!/usr/bin/env bash
# The whole system on one GPU machine (issue 12): PostgreSQL (from a bundle made by
# postgres-bundle.sh, run as an unprivileged user), a coordinator, one agent serving every GPU
# and the CLI; a sweep for the node's GPU kind; the agent SIGKILLed mid-sweep and restarted; then
# the database asked whether any job ran twice or any result was lost or duplicated.
#
#   scripts/device/coordinator_on_gpu.sh BIN_DIR OUTDIR [DEVICE]
#
# BIN_DIR holds fleetmark-agent-cuda.xz (or fleetmark-agent.xz), fleetmark-coordinator.xz,
# fleetmark.xz and pg.tar.xz (from postgres-bundle.sh). Tokens are made with
# `fleetmark-coordinator token create` straight in the database: admin for the CLI, agent for
# the agent.
# DEVICE defaults to cuda:all. Everything lands in OUTDIR (log.txt, db.txt).
set -uo pipefail
bin=${1:?usage: coordinator_on_gpu.sh BIN_DIR OUTDIR [DEVICE]}
out=${2:?usage: coordinator_on_gpu.sh BIN_DIR OUTDIR [DEVICE]}
device=${3:-cuda:all}
PRECISIONS=${PRECISIONS:-f16,bf16,f32}
BATCHES=${BATCHES:-1,16,64,256}
KILL_AFTER=${KILL_AFTER:-3}
mkdir -p "$out" /tmp/fm
exec > >(tee -a "$out/log.txt") 2>&1
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
for b in fleetmark-agent fleetmark-coordinator fleetmark; do
  f=$bin/$b.xz
  [ "$b" = fleetmark-agent ] && [ -f "$bin/fleetmark-agent-cuda.xz" ] && f=$bin/fleetmark-agent-cuda.xz
  xz -dc "$f" > "/tmp/fm/$b" && chmod +x "/tmp/fm/$b" || { echo "missing $f"; exit 1; }
done
port=5544; api=127.0.0.1:7171
url=http://$api; db=postgres://postgres@127.0.0.1:$port/postgres

step "postgres, as an unprivileged user"
mkdir -p /tmp/pg && tar xJf "$bin/pg.tar.xz" -C /tmp/pg
id pg >/dev/null 2>&1 || useradd -M pg
mkdir -p /tmp/pgdata && chown pg /tmp/pgdata
B=$(echo /tmp/pg/usr/lib/postgresql/*/bin)
runuser -u pg -- env LD_LIBRARY_PATH=/tmp/pg/libs "$B/initdb" -D /tmp/pgdata/d -U postgres -A trust >/tmp/pgdata/initdb.log 2>&1 \
  || { cat /tmp/pgdata/initdb.log; exit 1; }
runuser -u pg -- env LD_LIBRARY_PATH=/tmp/pg/libs "$B/pg_ctl" -D /tmp/pgdata/d \
  -o "-p $port -k /tmp -c listen_addresses=127.0.0.1" -l /tmp/pgdata/log -w start || exit 1
psql() { env LD_LIBRARY_PATH=/tmp/pg/libs "$B/psql" "$db" -X -q "$@"; }

step "tokens (straight in the database): an admin for the CLI, an agent token for the agent"
token=$(/tmp/fm/fleetmark-coordinator token create --role admin --name gpu-run --database-url "$db") \
  || { echo "cannot create the admin token"; exit 1; }
agent_token=$(/tmp/fm/fleetmark-coordinator token create --role agent --name gpu-node --database-url "$db") \
  || { echo "cannot create the agent token"; exit 1; }

step "coordinator"
/tmp/fm/fleetmark-coordinator --listen "$api" --database-url "$db" \
  --lease 10s --heartbeat 500ms --reap-interval 500ms > /tmp/fm/coordinator.log 2>&1 &
coord=$!
cli() { /tmp/fm/fleetmark --coordinator "$url" --token "$token" "$@"; }
for _ in $(seq 100); do cli sweeps >/dev/null 2>&1 && break; sleep 0.2; done
cli sweeps >/dev/null || { cat /tmp/fm/coordinator.log; exit 1; }

start_agent() {
  /tmp/fm/fleetmark-agent --coordinator "$url" --token "$agent_token" --device "$device" \
    --name gpu-node >> "/tmp/fm/agent-$1.log" 2>&1 &
  agent=$!
  echo "agent $1 pid $agent"
}
step "one agent, --device $device"
start_agent 1
for _ in $(seq 150); do cli agents 2>/dev/null | grep -q online && break; sleep 0.2; done
cli agents

kind=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | grep -oE 'h100|h200|a100|l4|t4' | head -1)
step "a sweep for the node's kind ($kind): batches $BATCHES, precisions $PRECISIONS"
cat > /tmp/fm/sweep.toml <<TOML
name = "issue-12 $kind through a coordinator"
batch_sizes = [$BATCHES]
precisions = [$(echo "$PRECISIONS" | sed 's/[^,]*/"&"/g')]
gpus = ["$kind"]
engine = "fused"
[measurement]
warmup_iterations = 10
warmup_duration = "300ms"
min_iterations = 50
min_duration = "1s"
max_duration = "30s"
TOML
sweep=$(cli submit --file /tmp/fm/sweep.toml) || exit 1
echo "sweep $sweep"
q() { psql -At -c "$1"; }

step "SIGKILL the agent once $KILL_AFTER jobs have succeeded and one is running"
for _ in $(seq 600); do
  done_n=$(q "SELECT count(*) FROM jobs WHERE sweep_id='$sweep' AND state='succeeded'")
  run_n=$(q "SELECT count(*) FROM jobs WHERE sweep_id='$sweep' AND state='running'")
  [ "$done_n" -ge "$KILL_AFTER" ] && [ "$run_n" -ge 1 ] && break
  sleep 0.2
done
q "SELECT seq, state, attempt, phase FROM jobs WHERE sweep_id='$sweep' AND state='running'"
kill -9 "$agent"; echo "killed agent pid $agent at $(date -u +%H:%M:%S.%N)"
q "SELECT 'leased jobs at kill:', count(*) FROM jobs WHERE sweep_id='$sweep' AND state='running'"

step "restart the agent"
start_agent 2
for _ in $(seq 1200); do
  st=$(q "SELECT state FROM sweeps WHERE id='$sweep'")
  case "$st" in completed|failed|cancelled) break ;; esac
  sleep 0.25
done
echo "sweep state: $st"
cli results "$sweep" || true

step "the database: every job once, every result once"
{
  echo "-- jobs by state and attempt"
  psql -c "SELECT state, attempt, count(*) FROM jobs WHERE sweep_id='$sweep' GROUP BY 1,2 ORDER BY 1,2"
  echo "-- jobs, results per job, and the devices that answered"
  psql -c "SELECT j.seq, j.spec->>'precision' AS prec, j.spec->>'batch_size' AS batch, j.state, j.attempt,
                  count(r.id) AS results, min(r.device) AS device,
                  min(r.hardware_name) AS card,
                  min((r.record->'telemetry'->'sm_clock_mhz'->>'mean')::float)::int AS sm_mhz,
                  round(min(r.images_per_sec)) AS img_s
           FROM jobs j LEFT JOIN results r ON r.job_id = j.id WHERE j.sweep_id='$sweep'
           GROUP BY j.id ORDER BY j.seq"
  echo "-- totals: jobs, results, distinct jobs with a result, jobs with more than one result, succeeded jobs without a result"
  psql -c "SELECT (SELECT count(*) FROM jobs WHERE sweep_id='$sweep') AS jobs,
                  (SELECT count(*) FROM results WHERE sweep_id='$sweep') AS results,
                  (SELECT count(DISTINCT job_id) FROM results WHERE sweep_id='$sweep') AS jobs_with_result,
                  (SELECT count(*) FROM (SELECT job_id FROM results WHERE sweep_id='$sweep' GROUP BY job_id HAVING count(*) > 1) d) AS duplicated,
                  (SELECT count(*) FROM jobs j WHERE sweep_id='$sweep' AND state='succeeded'
                     AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = j.id)) AS lost"
} | tee "$out/db.txt"
echo "--- agent 1 log (tail)"; tail -5 /tmp/fm/agent-1.log
echo "--- agent 2 log (tail)"; tail -5 /tmp/fm/agent-2.log
kill "$agent" "$coord" 2>/dev/null
runuser -u pg -- env LD_LIBRARY_PATH=/tmp/pg/libs "$B/pg_ctl" -D /tmp/pgdata/d -m fast stop >/dev/null 2>&1
