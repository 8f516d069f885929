#!/usr/bin/env bash
# Writes the secrets deploy/compose.yaml reads, into deploy/secrets/ (git-ignored), keeping any
# that exist: a database password, a Grafana admin password, and a private CA with a
# certificate for the coordinator (names: coordinator, localhost, 127.0.0.1, and the host names
# given as arguments, for agents that dial this host from elsewhere).
# `fleetmark-coordinator tls init DIR` makes the same three TLS files; this uses openssl so it
# runs before any image is built.
# Usage: deploy/compose-secrets.sh [HOSTNAME|IP ...]
set -euo pipefail
dir="${FLEETMARK_SECRETS_DIR:-$(dirname "$0")/secrets}"
mkdir -p "$dir/tls"
chmod 700 "$dir"
umask 077
secret() { [ -s "$1" ] || openssl rand -hex 24 | tr -d '\n' > "$1"; }
secret "$dir/db-password"
secret "$dir/grafana-admin-password"
tls="$dir/tls"
if [ ! -s "$tls/ca.crt" ] || [ ! -s "$tls/coordinator.crt" ] || [ ! -s "$tls/coordinator.key" ]; then
  san="DNS:coordinator,DNS:localhost,IP:127.0.0.1"
  for h in "$@"; do
    if [[ "$h" =~ ^[0-9.]+$|: ]]; then san="$san,IP:$h"; else san="$san,DNS:$h"; fi
  done
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=fleetmark compose CA" -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=coordinator" \
    -keyout "$tls/coordinator.key" -out "$tls/coordinator.csr" 2>/dev/null
  openssl x509 -req -in "$tls/coordinator.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" \
    -CAcreateserial -days 825 -out "$tls/coordinator.crt" \
    -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$san") 2>/dev/null
  rm -f "$tls/coordinator.csr" "$tls/ca.srl"
fi
# The containers run as uid 65532 (fleetmark) or their images' users; compose secrets are
# bind-mounted, so they must be readable by those users.
chmod 644 "$dir"/db-password "$dir"/grafana-admin-password "$tls"/coordinator.crt "$tls"/coordinator.key "$tls"/ca.crt
[ -e "$dir/agent.token" ] || : > "$dir/agent.token"
echo "secrets in $dir (create the agent token with: docker compose -f deploy/compose.yaml run --rm coordinator token create --role agent > $dir/agent.token)" >&2
