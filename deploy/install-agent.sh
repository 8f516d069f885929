#!/usr/bin/env bash
# Turns a fresh Ubuntu GPU machine into a Fleetmark agent: the NVIDIA driver (only when none
# works and --install-driver is given), the CUDA 13 runtime libraries and cuDNN 9 (PyPI wheels,
# the versions deploy/cuda-toolchain.sh builds against), the agent build for the card found
# (`nvidia-smi --query-gpu=compute_cap`), and with --systemd the hardened service unit.
# cloud-init (deploy/cloud-init/agent.yaml), SkyPilot and dstack (deploy/skypilot, deploy/dstack)
# run this.
#
# Settings (environment, or /etc/fleetmark/install.env):
#   FLEETMARK_AGENT_URL   where the packaged agent is (deploy/build-agents.sh's tarballs), with
#                         {cap} standing for the compute capability: https://host/fleetmark-agent-0.1.0-sm{cap}.tar.xz
#                         (a local path works too)
#   FLEETMARK_COMPUTE_CAP skip the detection (75 T4, 80 A100, 86 A10/A10G, 89 L4/L40S, 90 H100/H200)
#   FLEETMARK_ROOT        install under this folder instead of / (for tests)
#   FLEETMARK_SKIP_CUDA_LIBS=1  do not fetch the runtime wheels (they are on the loader path already)
# Usage: install-agent.sh [--install-driver] [--systemd]
set -euo pipefail

install_driver=0
systemd=0
for arg in "$@"; do
  case "$arg" in
    --install-driver) install_driver=1 ;;
    --systemd) systemd=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "install-agent: unknown argument $arg (try --help)" >&2; exit 64 ;;
  esac
done

root="${FLEETMARK_ROOT:-}"
# shellcheck source=/dev/null
[ -r "$root/etc/fleetmark/install.env" ] && . "$root/etc/fleetmark/install.env"
die() { echo "install-agent: $*" >&2; exit 1; }
say() { echo "install-agent: $*" >&2; }
wheels="nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.5.25 nvidia-cublas==13.0.2.14 nvidia-cudnn-cu13==9.19.0.56"

# 1. The driver.
if ! nvidia-smi -L >/dev/null 2>&1; then
  [ "$install_driver" = 1 ] || die "nvidia-smi does not work: install the NVIDIA driver (580 or newer), or pass --install-driver"
  say "installing the NVIDIA 580 server driver"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q ubuntu-drivers-common
  ubuntu-drivers install --gpgpu nvidia:580-server
  apt-get install -y -q nvidia-utils-580-server
  modprobe nvidia || die "the driver is installed but its module does not load: reboot, then run this again"
  nvidia-smi -L >/dev/null || die "nvidia-smi still fails after installing the driver"
fi

# 2. The generation.
cap="${FLEETMARK_COMPUTE_CAP:-}"
if [ -z "$cap" ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | tr -d ' .' | sort -u)
  [ "$(wc -l <<<"$cap")" -eq 1 ] || die "GPUs of several generations ($(tr '\n' ' ' <<<"$cap")): set FLEETMARK_COMPUTE_CAP and run one agent per generation"
fi
case "$cap" in 75|80|86|89|90) ;; *) die "no agent build for compute capability '$cap' (builds: 75 80 86 89 90)" ;; esac
say "GPU generation sm_$cap"

# 3. The agent.
url="${FLEETMARK_AGENT_URL:-}"
[ -n "$url" ] || die "set FLEETMARK_AGENT_URL (deploy/build-agents.sh's tarball, with {cap} for the generation)"
url="${url//\{cap\}/$cap}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
case "$url" in
  http://*|https://*) curl -fsSL --retry 3 -o "$tmp/agent.tar.xz" "$url" || die "cannot download $url" ;;
  *) cp "$url" "$tmp/agent.tar.xz" || die "cannot read $url" ;;
esac
mkdir -p "$tmp/x" && tar -xJf "$tmp/agent.tar.xz" -C "$tmp/x" || die "$url is not a tar.xz archive"
top=$(ls "$tmp/x")
[ "$(wc -l <<<"$top")" -eq 1 ] && [ -x "$tmp/x/$top/bin/fleetmark-agent" ] && [ -x "$tmp/x/$top/libexec/fleetmark-agent" ] \
  || die "$url does not hold one fleetmark-agent-*/{bin,libexec}/fleetmark-agent folder"
case "$top" in *-sm"$cap") ;; *) die "$url holds $top, not a build for sm_$cap" ;; esac
mkdir -p "$root/opt"
rm -rf "${root:?}/opt/$top.new" && mv "$tmp/x/$top" "$root/opt/$top.new"
rm -rf "${root:?}/opt/$top" && mv "$root/opt/$top.new" "$root/opt/$top"
ln -sfn "$top" "$root/opt/fleetmark-agent"
say "installed $top in $root/opt/fleetmark-agent"

# 4. The CUDA runtime libraries and cuDNN.
libs="$root/opt/fleetmark-cuda"
if [ "${FLEETMARK_SKIP_CUDA_LIBS:-0}" != 1 ] && [ ! -e "$libs/.complete" ]; then
  say "fetching the CUDA 13 runtime and cuDNN 9 wheels"
  command -v pip3 >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-pip; }
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps -d "$tmp/wheels" $wheels || die "pip download failed"
  rm -rf "$libs.new" && mkdir -p "$libs.new"
  for w in "$tmp"/wheels/*.whl; do python3 -m zipfile -e "$w" "$libs.new" || die "cannot unpack $w"; done
  touch "$libs.new/.complete"
  rm -rf "$libs" && mv "$libs.new" "$libs"
fi
ld_path=$( (find "$libs" -type d -name lib -path '*nvidia*' 2>/dev/null || true) | sort | tr '\n' ':')

# 5. Settings the unit reads; the operator's own lines (coordinator, name, price) are kept.
mkdir -p "$root/etc/fleetmark"
env_file="$root/etc/fleetmark/agent.env"
touch "$env_file"
sed -i '/^LD_LIBRARY_PATH=/d' "$env_file"
echo "LD_LIBRARY_PATH=${ld_path%:}" >> "$env_file"
grep -q '^FLEETMARK_DEVICE=' "$env_file" || echo "FLEETMARK_DEVICE=cuda:all" >> "$env_file"
# No secret lives here (the token is /etc/fleetmark/agent.token), so foreground runs can read it.
chmod 644 "$env_file"

# 6. The service.
if [ "$systemd" = 1 ]; then
  unit="$root/opt/fleetmark-agent/share/fleetmark-agent.service"
  [ -r "$unit" ] || die "$unit is missing from the agent package"
  install -D -m 644 "$unit" "$root/etc/systemd/system/fleetmark-agent.service"
  if [ -z "$root" ]; then
    systemctl daemon-reload
    systemctl enable --now fleetmark-agent
    say "fleetmark-agent.service started: journalctl -u fleetmark-agent -f"
  fi
fi
