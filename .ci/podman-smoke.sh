#!/usr/bin/env bash
# Builds the `fleetmark` image with Podman and runs a sweep through containers made from it:
# a coordinator, a CPU agent and the CLI, on the host's Postgres.
#
# Nothing can be pulled from an image registry here, so the base is bootstrapped from Debian's
# packages (mmdebstrap, bookworm minbase) and the image is built with BINARIES=prebuilt from the
# workspace's own build of the three binaries (the same glibc as the base). Podman's defaults do
# not run on this machine: crun cannot raise RLIMIT_NOFILE/NPROC to Podman's defaults (so lower
# limits are passed), and it refuses the hybrid cgroup layout (so Podman runs in a private mount
# namespace without the cgroup2 mount, with --cgroups=disabled; nothing changes outside it).
# Postgres and Grafana images cannot be had here, so the compose file itself is not run: the
# coordinator container uses the host's Postgres, over the host network (loopback only).
#
# Status: the image build and running containers from it were tried by hand and work (with
# stand-in binaries); the sweep part below has not yet been run to the end, so this script is
# not part of .ci/check-deploy.sh until it has.
#
# Usage: .ci/podman-smoke.sh    (needs: podman, mmdebstrap, psql, Postgres on 127.0.0.1:5432,
#                                cargo; about a minute once the base and the binaries exist)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
cache="${FLEETMARK_DEPLOY_CACHE:-$HOME/.cache/fleetmark-deploy}"
base="$cache/bookworm-minbase.tar"
pg="${FLEETMARK_SMOKE_PG:-postgres://postgres@127.0.0.1:5432}"
step() { echo; echo "=== podman smoke: $* ($(date -u +%H:%M:%S))"; }

step "tools"
need=()
command -v podman >/dev/null || need+=(podman)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
mkdir -p "$cache"
if [ ! -s "$base" ]; then
  step "bootstrapping a Debian bookworm base from Debian's packages"
  mmdebstrap --quiet --variant=minbase --include=ca-certificates,passwd bookworm "$base.tmp" http://deb.debian.org/debian
  mv "$base.tmp" "$base"
fi

step "the binaries (cargo build)"
cargo build -q -p fleetmark-coordinator -p fleetmark -p fleetmark-agent
rm -rf prebuilt && mkdir prebuilt
bin="${CARGO_TARGET_DIR:-target}/debug"
cp "$bin/fleetmark-coordinator" "$bin/fleetmark" "$bin/fleetmark-agent" prebuilt/

db="fleetmark_smoke_$$"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
psql -q "$pg/postgres" -c "CREATE DATABASE $db"
cleanup() {
  psql -q "$pg/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$repo/prebuilt"
}
trap cleanup EXIT

step "image build and sweep (inside a private mount namespace)"
export FM_DB_URL="$pg/$db" FM_PORT="$port" FM_BASE="$base"
unshare -m --propagation private bash -euo pipefail -c '
umount /sys/fs/cgroup/unified 2>/dev/null || true
lim=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
run=(podman run --cgroups=disabled --network host "${lim[@]}")
podman import -q "$FM_BASE" localhost/fleetmark-base:bookworm >/dev/null
podman build -q --isolation chroot --network host "${lim[@]}" \
  --build-arg BINARIES=prebuilt --build-arg RUNTIME_IMAGE=localhost/fleetmark-base:bookworm \
  -f deploy/docker/fleetmark.Dockerfile -t localhost/fleetmark:smoke . >/dev/null
echo "built localhost/fleetmark:smoke"
names=(fm-smoke-coord-$$ fm-smoke-agent-$$)
trap "podman rm -f ${names[*]} >/dev/null 2>&1 || true" EXIT
# The coordinator: the image entrypoint, its database URL given as a file (DATABASE_URL_FILE).
printf "%s" "$FM_DB_URL" > /tmp/fm-smoke-db-url-$$
chmod 644 /tmp/fm-smoke-db-url-$$
"${run[@]}" -d --name "${names[0]}" -v /tmp/fm-smoke-db-url-$$:/run/secrets/database_url:ro \
  -e DATABASE_URL_FILE=/run/secrets/database_url -e FLEETMARK_LISTEN=127.0.0.1:$FM_PORT \
  localhost/fleetmark:smoke >/dev/null
"${run[@]}" -d --name "${names[1]}" --entrypoint /usr/local/bin/fleetmark-agent localhost/fleetmark:smoke \
  --coordinator http://127.0.0.1:$FM_PORT --device cpu --name smoke-cpu >/dev/null
cli() { "${run[@]}" --rm --entrypoint /usr/local/bin/fleetmark localhost/fleetmark:smoke --coordinator http://127.0.0.1:$FM_PORT "$@"; }
ok=""
for _ in $(seq 1 60); do
  if cli agents --format json 2>/dev/null | grep -q smoke-cpu; then ok=1; break; fi
  sleep 1
done
[ -n "$ok" ] || { podman logs "${names[0]}" | tail -20; podman logs "${names[1]}" | tail -20; echo "the agent never registered"; exit 1; }
echo "agent smoke-cpu registered through the coordinator container"
sweep=$(cli submit --name smoke --batch 1,2 --precision f32 --gpu cpu --image-size 32 --warmup 1 \
  --warmup-duration 0s --min-iterations 3 --min-duration 0s --max-duration 20s | tail -1)
echo "submitted sweep $sweep"
cli watch "$sweep" >/dev/null
results=$(cli results "$sweep" --format json)
n=$(python3 -c "import json,sys; r=json.loads(sys.argv[1]); r=r if isinstance(r,list) else r.get(\"results\",[]); print(len(r))" "$results")
[ "$n" = 2 ] || { echo "expected 2 results, got $n: $results"; exit 1; }
echo "sweep finished with $n results"
# The agent runs as the image user and can write its state folder (the undelivered-results spool).
podman exec "${names[1]}" sh -c "id -u; touch \$XDG_STATE_HOME/probe && echo state-writable"
rm -f /tmp/fm-smoke-db-url-$$
'
step "podman smoke passed"
