#!/usr/bin/env bash
# Builds one CUDA agent per GPU generation, each packaged with its launcher:
#   dist/fleetmark-agent-<version>-sm<cap>/{bin/fleetmark-agent, libexec/fleetmark-agent,
#                                          share/fleetmark-agent.service}
#   dist/fleetmark-agent-<version>-sm<cap>.tar.xz
# Candle compiles its kernels for one compute capability per build (and sm_90 code loads only on
# Hopper), so a T4 node needs the sm75 build and an H100 the sm90 one.
#
# Usage: deploy/build-agents.sh [CAP ...]     (default: 75 80 86 89 90)
#   75 = T4, 80 = A100, 86 = A10/A10G, 89 = L4/L40S, 90 = H100/H200
# The toolkit (CUDA 13.0 from deploy/cuda-toolchain.sh) must not be newer than what the nodes'
# driver supports (driver 580 or newer for CUDA 13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
caps=("$@")
[ ${#caps[@]} -gt 0 ] || caps=(75 80 86 89 90)
cargo fetch
# shellcheck source=/dev/null
source deploy/cuda-toolchain.sh
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p dist
for cap in "${caps[@]}"; do
  echo "building fleetmark-agent for sm_${cap}" >&2
  CUDA_COMPUTE_CAP=$cap CARGO_TARGET_DIR="target/cuda-sm$cap" \
    cargo build --release -p fleetmark-agent --features cudnn
  out="dist/fleetmark-agent-$version-sm$cap"
  rm -rf "$out" && mkdir -p "$out/bin" "$out/libexec" "$out/share"
  cp "target/cuda-sm$cap/release/fleetmark-agent" "$out/libexec/fleetmark-agent"
  strip "$out/libexec/fleetmark-agent"
  cp deploy/fleetmark-agent.sh "$out/bin/fleetmark-agent"
  cp deploy/fleetmark-agent.service "$out/share/"
  tar -C dist -cJf "$out.tar.xz" "$(basename "$out")"
  echo "wrote $out.tar.xz" >&2
done
