#!/usr/bin/env bash
# Checks the deploy files as far as a machine without GPUs or a container runtime allows
# (deploy/README.md lists what stays unverified). Installs what it needs from Debian and PyPI,
# once (later runs reuse it). Called by .ci/run; runs alone too: bash .ci/check-deploy.sh
#
#   - every YAML/JSON/TOML file under deploy/ and dashboards/ parses; the compose file against
#     the compose specification (check-jsonschema), the Kubernetes manifests against the
#     Kubernetes 1.37 schemas in strict mode (kubernetes-validate), the cloud-init user data with
#     `cloud-init schema`, the SkyPilot and dstack tasks with those tools' own parsers where they
#     install, and what no schema covers with .ci/check_deploy.py
#   - the systemd units: `systemd-analyze verify` (no warnings) and `systemd-analyze security`
#     exposure below 5
#   - the shell scripts: .ci/test-deploy-scripts.sh and .ci/test-cuda-toolchain.sh
#   - each validator is shown a broken file once and must reject it
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
step() { echo; echo "=== deploy: $* ($(date -u +%H:%M:%S))"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step "tools (Debian: systemd, cloud-init, openssl, xz-utils, binutils; PyPI: kubernetes-validate, check-jsonschema)"
need=()
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v cloud-init >/dev/null || need+=(cloud-init)
command -v openssl >/dev/null || need+=(openssl)
command -v xz >/dev/null || need+=(xz-utils)
command -v nm >/dev/null || need+=(binutils)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
venv="${FLEETMARK_DEPLOY_VENV:-$HOME/.cache/fleetmark-deploy-venv}"
if ! "$venv/bin/python" -c 'import kubernetes_validate, check_jsonschema, yaml' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check kubernetes-validate==1.37.0 check-jsonschema==0.39.0 PyYAML
fi
py="$venv/bin/python"

step "structure: every file parses; secrets, mounts, images and launch recipes hang together"
secrets="$work/secrets"
FLEETMARK_SECRETS_DIR="$secrets" deploy/compose-secrets.sh 2>/dev/null
"$py" .ci/check_deploy.py "$repo" "$secrets" | grep -v '^ok' || true
"$py" .ci/check_deploy.py "$repo" "$secrets" >/dev/null

step "compose: deploy/compose.yaml against the compose specification"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
sed 's/^    image: docker.io\/library\/postgres:17/    image: [postgres]/' deploy/compose.yaml > "$work/bad-compose.yaml"
if "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$work/bad-compose.yaml" >/dev/null 2>&1; then
  echo "the compose check accepted a broken file"; exit 1
fi

step "kubernetes: strict validation against the 1.37 schemas"
k8s=(deploy/k8s/namespace.yaml deploy/k8s/coordinator.yaml deploy/k8s/agents.yaml deploy/k8s/secrets.example.yaml)
"$venv/bin/kubernetes-validate" --strict --quiet "${k8s[@]}"
echo "${#k8s[@]} files valid"
sed 's/^  replicas: 2/  replicas: 2\n  replica: 2/' deploy/k8s/coordinator.yaml > "$work/bad-k8s.yaml"
if "$venv/bin/kubernetes-validate" --strict --quiet "$work/bad-k8s.yaml" >/dev/null 2>&1; then
  echo "the Kubernetes check accepted a broken file"; exit 1
fi

step "cloud-init: deploy/cloud-init/agent.yaml"
cloud-init schema --config-file deploy/cloud-init/agent.yaml
printf '#cloud-config\nruncmd: 5\n' > "$work/bad-ci.yaml"
if cloud-init schema --config-file "$work/bad-ci.yaml" >/dev/null 2>&1; then
  echo "cloud-init schema accepted a broken file"; exit 1
fi

step "systemd: verify and security exposure"
root="$work/root"
mkdir -p "$root/usr/local/bin" "$root/opt/fleetmark-agent/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp deploy/*.service "$root/etc/systemd/system/"
install -m 755 /dev/null "$root/usr/local/bin/fleetmark-coordinator"
install -m 755 /dev/null "$root/opt/fleetmark-agent/bin/fleetmark-agent"
out=$(systemd-analyze verify --root="$root" fleetmark-coordinator.service fleetmark-agent.service 2>&1) || true
if [ -n "$out" ]; then echo "$out"; echo "systemd-analyze verify complained"; exit 1; fi
echo "systemd-analyze verify: no warnings"
echo 'ProtectSytem=strict' >> "$root/etc/systemd/system/fleetmark-agent.service"
out=$(systemd-analyze verify --root="$root" fleetmark-agent.service 2>&1) || true
[ -n "$out" ] || { echo "systemd-analyze verify accepted a unit with a misspelt key"; exit 1; }
for unit in deploy/fleetmark-coordinator.service deploy/fleetmark-agent.service; do
  line=$(systemd-analyze security --offline=true "$unit" 2>&1 | grep 'Overall exposure level')
  echo "$line"
  score=$(sed -E 's/.*: ([0-9.]+) .*/\1/' <<<"$line")
  awk -v s="$score" 'BEGIN { exit !(s < 5.0) }' || { echo "$unit: exposure $score is not below 5"; exit 1; }
  grep -q "rates this unit $score " "$unit" || { echo "$unit: its comment does not quote the measured $score"; exit 1; }
done

step "launchers: SkyPilot and dstack parse their tasks (when their packages install)"
launchers="${FLEETMARK_LAUNCHERS_VENV:-$HOME/.cache/fleetmark-launchers-venv}"
if [ "${FLEETMARK_SKIP_LAUNCHERS:-0}" != 1 ] && ! "$launchers/bin/python" -c 'import sky, dstack' 2>/dev/null; then
  python3 -m venv "$launchers"
  timeout 900 "$launchers/bin/pip" install -q --disable-pip-version-check skypilot==0.14.1 dstack==0.22.5 >/dev/null 2>&1 || echo "skypilot/dstack did not install: their own parsers were not run"
fi
if "$launchers/bin/python" -c 'import sky, dstack' 2>/dev/null; then
  "$launchers/bin/python" .ci/check_launchers.py deploy/skypilot/agent.yaml deploy/dstack/agent.dstack.yml
else
  echo "UNVERIFIED: SkyPilot and dstack parsers not available (structure checked above)"
fi

step "scripts"
bash .ci/test-deploy-scripts.sh
bash .ci/test-cuda-toolchain.sh

step "deploy checks done"
