#!/usr/bin/env bash
# Tests the deploy shell scripts as a node would run them, with stand-ins only for what this
# machine lacks (a GPU: a fake nvidia-smi on PATH; a download server: local tarballs):
#   deploy/docker/agent-select.sh   picks the agent build for the card
#   deploy/docker/entrypoint.sh     turns *_FILE secrets into variables
#   deploy/fleetmark-agent.sh       reads FLEETMARK_TOKEN_FILE
#   deploy/install-agent.sh         installs the right build, keeps the operator's settings
#   deploy/compose-secrets.sh       makes a CA and a coordinator certificate that verifies
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0 failed=0
ok() { echo "ok   $*"; passed=$((passed + 1)); }
bad() { echo "FAIL $*"; failed=$((failed + 1)); }
# expect NAME WANT_RC PATTERN -- CMD...: runs CMD, checks its status and that its output matches.
expect() {
  local name="$1" want="$2" pat="$3"; shift 4
  local out rc=0
  out=$("$@" 2>&1) || rc=$?
  if [ "$rc" = "$want" ] && grep -qE -- "$pat" <<<"$out"; then ok "$name"
  else bad "$name (rc=$rc, want $want): $out"; fi
}

# A fake nvidia-smi printing the compute capabilities in $FAKE_CAPS (one per line), or failing.
mkdir -p "$work/bin"
cat > "$work/bin/nvidia-smi" <<'SMI'
#!/bin/sh
[ -n "${FAKE_CAPS:-}" ] || { echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver" >&2; exit 9; }
case "$*" in
  *compute_cap*) printf '%s\n' $FAKE_CAPS ;;
  *-L*) echo "GPU 0: Fake (UUID: GPU-0)" ;;
esac
SMI
chmod +x "$work/bin/nvidia-smi"

# --- agent-select: builds that print which one ran, and a launcher that runs FLEETMARK_AGENT_BIN.
lx="$work/libexec"; mkdir -p "$lx"
for c in 75 86 90; do printf '#!/bin/sh\necho "ran sm%s $*"\n' "$c" > "$lx/fleetmark-agent-sm$c"; chmod +x "$lx/fleetmark-agent-sm$c"; done
printf '#!/bin/sh\nexec "$FLEETMARK_AGENT_BIN" "$@"\n' > "$work/launcher"; chmod +x "$work/launcher"
sel() { env PATH="$work/bin:$PATH" FLEETMARK_LIBEXEC="$lx" FLEETMARK_LAUNCHER="$work/launcher" "$@" "$repo/deploy/docker/agent-select.sh" --device cuda:all; }
expect "select: a T4 (7.5) gets the sm75 build" 0 '^ran sm75 --device cuda:all$' -- sel FAKE_CAPS=7.5
expect "select: an H100 (9.0) gets sm90" 0 '^ran sm90' -- sel FAKE_CAPS="9.0 9.0"
expect "select: an L4 (8.9) falls back to sm86 with a warning" 0 'warning: no sm_89 build.*ran sm86|ran sm86' -- sel FAKE_CAPS=8.9
expect "select: an L4 fallback warns" 0 'warning: no sm_89 build' -- sel FAKE_CAPS=8.9
expect "select: mixed generations are refused" 69 'different generations \(75,90\)' -- sel FAKE_CAPS="7.5 9.0"
expect "select: no driver says so" 69 'no GPU is visible' -- sel FAKE_CAPS=
expect "select: a card older than every build is refused" 69 'no agent build in this image runs on sm_70' -- sel FAKE_CAPS=7.0
expect "select: FLEETMARK_COMPUTE_CAP overrides detection" 0 '^ran sm90' -- sel FAKE_CAPS=7.5 FLEETMARK_COMPUTE_CAP=90
expect "select: a bad override is refused" 64 'not a number' -- sel FLEETMARK_COMPUTE_CAP=9.x

# --- entrypoint: *_FILE secrets.
printf 's3cret\n' > "$work/token"; : > "$work/empty"
ep() { env "$@" "$repo/deploy/docker/entrypoint.sh" sh -c 'echo "token=$FLEETMARK_TOKEN file=${FLEETMARK_TOKEN_FILE:-unset}"'; }
expect "entrypoint: FLEETMARK_TOKEN_FILE becomes FLEETMARK_TOKEN" 0 '^token=s3cret file=unset$' -- ep FLEETMARK_TOKEN_FILE="$work/token"
expect "entrypoint: both set is refused" 64 'both FLEETMARK_TOKEN and FLEETMARK_TOKEN_FILE' -- ep FLEETMARK_TOKEN=x FLEETMARK_TOKEN_FILE="$work/token"
expect "entrypoint: a missing file is refused" 66 'not a readable file' -- ep FLEETMARK_TOKEN_FILE="$work/nope"
expect "entrypoint: an empty file is refused" 66 'is empty' -- ep FLEETMARK_TOKEN_FILE="$work/empty"
expect "entrypoint: PGPASSWORD_FILE works the same" 0 '^pw=s3cret$' -- env PGPASSWORD_FILE="$work/token" "$repo/deploy/docker/entrypoint.sh" sh -c 'echo "pw=$PGPASSWORD"'

# --- the launcher reads FLEETMARK_TOKEN_FILE (and still checks the binary).
printf '#!/bin/sh\necho "agent token=$FLEETMARK_TOKEN"\n' > "$work/agent-bin"; chmod +x "$work/agent-bin"
expect "launcher: token from file" 0 '^agent token=s3cret$' -- env FLEETMARK_AGENT_BIN="$work/agent-bin" FLEETMARK_TOKEN_FILE="$work/token" "$repo/deploy/fleetmark-agent.sh"
expect "launcher: both set is refused" 64 'set only one' -- env FLEETMARK_AGENT_BIN="$work/agent-bin" FLEETMARK_TOKEN=x FLEETMARK_TOKEN_FILE="$work/token" "$repo/deploy/fleetmark-agent.sh"

# --- install-agent: packaged builds as deploy/build-agents.sh lays them out.
for c in 75 90; do
  d="$work/pkg/fleetmark-agent-0.1.0-sm$c"; mkdir -p "$d/bin" "$d/libexec" "$d/share"
  cp deploy/fleetmark-agent.sh "$d/bin/fleetmark-agent"; cp "$work/agent-bin" "$d/libexec/fleetmark-agent"
  cp deploy/fleetmark-agent.service "$d/share/"
  tar -C "$work/pkg" -cJf "$work/pkg/fleetmark-agent-0.1.0-sm$c.tar.xz" "$(basename "$d")"
done
r="$work/root"; mkdir -p "$r/etc/fleetmark"
printf 'FLEETMARK_COORDINATOR=https://coord:7070\nLD_LIBRARY_PATH=/old\n' > "$r/etc/fleetmark/agent.env"
inst() { env PATH="$work/bin:$PATH" FLEETMARK_ROOT="$r" FLEETMARK_SKIP_CUDA_LIBS=1 "$@" "$repo/deploy/install-agent.sh" --systemd; }
expect "install: a T4 gets the sm75 package and the unit" 0 'installed fleetmark-agent-0.1.0-sm75' -- \
  inst FAKE_CAPS=7.5 FLEETMARK_AGENT_URL="$work/pkg/fleetmark-agent-0.1.0-sm{cap}.tar.xz"
if [ "$(readlink "$r/opt/fleetmark-agent")" = fleetmark-agent-0.1.0-sm75 ] \
  && cmp -s "$r/etc/systemd/system/fleetmark-agent.service" deploy/fleetmark-agent.service \
  && grep -qx 'FLEETMARK_COORDINATOR=https://coord:7070' "$r/etc/fleetmark/agent.env" \
  && [ "$(grep -c '^LD_LIBRARY_PATH=' "$r/etc/fleetmark/agent.env")" = 1 ] \
  && ! grep -q '/old' "$r/etc/fleetmark/agent.env"; then ok "install: link, unit and settings in place, operator's lines kept"
else bad "install: layout: $(ls -l "$r/opt"; cat "$r/etc/fleetmark/agent.env")"; fi
expect "install: without a driver it stops and names the fix" 1 'install the NVIDIA driver' -- \
  inst FAKE_CAPS= FLEETMARK_AGENT_URL="$work/pkg/x-sm{cap}.tar.xz"
expect "install: a package for the wrong generation is refused" 1 'not a build for sm_90' -- \
  inst FAKE_CAPS=9.0 FLEETMARK_AGENT_URL="$work/pkg/fleetmark-agent-0.1.0-sm75.tar.xz"
[ "$(readlink "$r/opt/fleetmark-agent")" = fleetmark-agent-0.1.0-sm75 ] && ok "install: a refused package leaves the installed one" \
  || bad "install: the refused package replaced the link"
expect "install: an unknown generation is refused" 1 "compute capability '70'" -- \
  inst FAKE_CAPS=7.0 FLEETMARK_AGENT_URL="$work/pkg/x-sm{cap}.tar.xz"

# --- compose-secrets: the certificate verifies against the CA and names the coordinator.
s="$work/secrets"
expect "compose-secrets: writes the secrets" 0 'secrets in' -- env FLEETMARK_SECRETS_DIR="$s" deploy/compose-secrets.sh node1.example.org
if openssl verify -CAfile "$s/tls/ca.crt" "$s/tls/coordinator.crt" >/dev/null \
  && openssl x509 -in "$s/tls/coordinator.crt" -noout -ext subjectAltName | grep -q 'DNS:coordinator, DNS:localhost, IP Address:127.0.0.1, DNS:node1.example.org'; then
  ok "compose-secrets: the certificate verifies and names coordinator, localhost, 127.0.0.1 and the host given"
else bad "compose-secrets: certificate"; fi
before=$(cat "$s/db-password")
env FLEETMARK_SECRETS_DIR="$s" deploy/compose-secrets.sh >/dev/null 2>&1
[ "$(cat "$s/db-password")" = "$before" ] && ok "compose-secrets: a second run keeps the secrets" || bad "compose-secrets: secrets changed"

echo "deploy scripts: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
