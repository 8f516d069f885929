#!/usr/bin/env bash
# Samples Postgres beside a load run (docs/reliability.md, "The soak, passed"): every INTERVAL
# seconds one line with the cluster's WAL records / full-page images / bytes, checkpoints and
# blocks written by backends, the load database's commits, blocks read, rows inserted and
# updated, the CPU ticks of Postgres processes by kind (still-running ones only), and per table
# (jobs, results, sweeps) live and dead rows, autovacuum and autoanalyze counts, size in MiB and
# heap blocks read, then the indexes with the most blocks read.
#
#   scripts/bench/pg_sampler.sh [INTERVAL] > samples.txt &     (then run scripts/loadgen.sh)
#
# PGURL (default postgres://postgres@127.0.0.1:5432); the load database is the first one named
# fleetmark_loadgen_* (the one scripts/loadgen.sh creates). Stop it with kill.
set -uo pipefail
iv=${1:-60}
PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
q() { psql -At -F, "$PGURL/$1" -c "$2"; }
while true; do
  db=$(q postgres "select datname from pg_database where datname like 'fleetmark_loadgen_%' limit 1")
  wal=$(q postgres "select wal_records, wal_fpi, wal_bytes from pg_stat_wal")
  ck=$(q postgres "select checkpoints_timed, checkpoints_req, buffers_backend from pg_stat_bgwriter")
  xa="" tabs="" idx=""
  if [ -n "$db" ]; then
    xa=$(q postgres "select xact_commit, blks_read, blks_hit, tup_inserted, tup_updated
                     from pg_stat_database where datname = '$db'")
    tabs=$(q "$db" "select relname || ':' || n_live_tup || ':' || n_dead_tup || ':' || autovacuum_count
                      || ':' || autoanalyze_count || ':' || pg_total_relation_size(t.relid) / 1048576
                      || ':' || s.heap_blks_read
                    from pg_stat_user_tables t join pg_statio_user_tables s using (relid)
                    where t.relname in ('jobs', 'results', 'sweeps')" | tr '\n' ' ')
    idx=$(q "$db" "select indexrelname || ':' || idx_blks_read from pg_statio_user_indexes
                   where idx_blks_read > 1000 order by idx_blks_read desc limit 8" | tr '\n' ' ')
  fi
  cpu=$(for p in $(pgrep -u postgres); do
      c=$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null)
      s=$(cut -d' ' -f14,15 "/proc/$p/stat" 2>/dev/null)
      [ -n "$s" ] || continue
      k=backend
      case "$c" in *autovacuum*) k=autovac ;; *walwriter*|*checkpointer*|*"background writer"*) k=bg ;; esac
      echo "$k $s"
    done | awk '{t[$1] += $2 + $3} END {for (k in t) printf "%s=%d ", k, t[k]}')
  echo "$(date +%s) wal=$wal ck=$ck xact=$xa cpu[$cpu] $tabs idx[$idx]"
  sleep "$iv"
done
