#!/usr/bin/env bash
# Tests deploy/cuda-toolchain.sh without downloading the 1.1 GB toolkit: each case uses its own
# temporary cache folder (FLEETMARK_CUDA_DIR), never the shared ~/.cache/fleetmark-cuda-13.0.
# A fake toolkit layout stands in for the wheels where the case is about the libcuda stub; the
# pip case points pip at a closed loopback port so it fails at once.
set -euo pipefail
cd "$(dirname "$0")/.."
script="$PWD/deploy/cuda-toolchain.sh"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fails=0
pass() { echo "ok   $*"; }
fail() { echo "FAIL $*"; fails=$((fails + 1)); }

# A cache folder with a fake toolkit (so only the stub step runs).
fake_toolkit() {
  local d="$work/$1"
  mkdir -p "$d/x/nvidia/cu13/nvvm/bin" "$d/x/nvidia/cu13/bin" "$d/x/nvidia/cudnn/lib"
  printf '#!/bin/sh\n' > "$d/x/nvidia/cu13/nvvm/bin/cicc" && chmod +x "$d/x/nvidia/cu13/nvvm/bin/cicc"
  touch "$d/x/nvidia/cudnn/lib/libcudnn.so"
  echo "$d"
}
stub_files() { ls "$1/x/nvidia/cu13/lib/stubs/" 2>/dev/null | grep -v '^libcuda.symbols$' || true; }

# Sources the script from a non-interactive bash, then echoes a marker: a failure must stop
# the sourcing script before the marker.
source_it() { # ENV... -- prints combined output, returns bash's status
  env "$@" bash -c 'source "$0"; echo "CARRIED-ON CUDA_ROOT=$CUDA_ROOT"' "$script" 2>&1
}

# 1. pip cannot download: stops, nothing unpacked.
d="$work/pip"; mkdir -p "$d"
set +e
out=$(source_it FLEETMARK_CUDA_DIR="$d" FLEETMARK_CUDA_WHEELS="nvidia-cuda-nvcc==13.0.88" \
  PIP_INDEX_URL=http://127.0.0.1:9/simple PIP_RETRIES=0 PIP_TIMEOUT=2 PIP_NO_INPUT=1 \
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_FIND_LINKS= PIP_NO_CACHE_DIR=1); rc=$?
set -e
if [ $rc -ne 0 ] && ! grep -q CARRIED-ON <<<"$out" && grep -q "pip download failed" <<<"$out" \
  && [ ! -e "$d/x" ] && [ -z "$(ls -d "$d"/x.staging.* 2>/dev/null)" ]; then
  pass "pip failure stops the sourcing script and unpacks nothing"
else fail "pip failure (rc=$rc): $out"; fi

# 2. The same failure from an interactive shell returns 1 from `source` and exports nothing.
set +e
out=$(env FLEETMARK_CUDA_DIR="$d" FLEETMARK_CUDA_WHEELS="nvidia-cuda-nvcc==13.0.88" \
  PIP_INDEX_URL=http://127.0.0.1:9/simple PIP_RETRIES=0 PIP_TIMEOUT=2 PIP_NO_INPUT=1 \
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
  bash --norc --noprofile -i -c 'source "$0"; echo "rc=$? CUDA_ROOT=${CUDA_ROOT:-unset}"' "$script" 2>/dev/null)
set -e
if grep -q "rc=1 CUDA_ROOT=unset" <<<"$out"; then pass "interactive source returns 1 and exports nothing"
else fail "interactive source: $out"; fi

# 3. No cudarc sources and no cargo: stops with the fix named, no stub cached.
d=$(fake_toolkit nocargo)
set +e
out=$(source_it FLEETMARK_CUDA_DIR="$d" CARGO_HOME="$work/empty-cargo" PATH=/usr/bin:/bin); rc=$?
set -e
if [ $rc -ne 0 ] && ! grep -q CARRIED-ON <<<"$out" && grep -q "cargo fetch" <<<"$out" && [ -z "$(stub_files "$d")" ]; then
  pass "missing cudarc sources stop the script, nothing cached"
else fail "missing cudarc (rc=$rc): $out"; fi

# 4. cudarc sources in an unexpected format (no driver functions): no empty stub is cached.
d=$(fake_toolkit emptysrc)
ver=$(awk '/^name = "cudarc"$/ {getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)
mkdir -p "$work/cargo/registry/src/x/cudarc-$ver/src/driver/sys"
echo "// nothing here" > "$work/cargo/registry/src/x/cudarc-$ver/src/driver/sys/mod.rs"
set +e
out=$(source_it FLEETMARK_CUDA_DIR="$d" CARGO_HOME="$work/cargo"); rc=$?
set -e
if [ $rc -ne 0 ] && ! grep -q CARRIED-ON <<<"$out" && grep -q "found no driver functions" <<<"$out" && [ -z "$(stub_files "$d")" ]; then
  pass "sources without driver functions give no stub"
else fail "empty sources (rc=$rc): $out"; fi

# The real cudarc sources (fetched with cargo when missing) for the remaining cases.
real_cargo="${CARGO_HOME:-$HOME/.cargo}"
ls "$real_cargo"/registry/src/*/"cudarc-$ver"/src/driver/sys/mod.rs >/dev/null 2>&1 || cargo fetch >&2

# 5. The compiler fails: stops, no stub and no temporary files are left.
d=$(fake_toolkit badcc)
set +e
out=$(source_it FLEETMARK_CUDA_DIR="$d" CC=false); rc=$?
set -e
if [ $rc -ne 0 ] && ! grep -q CARRIED-ON <<<"$out" && grep -q "cannot build the libcuda stub" <<<"$out" && [ -z "$(stub_files "$d")" ]; then
  pass "a failing compiler leaves nothing cached"
else fail "failing compiler (rc=$rc): $out; left: $(stub_files "$d")"; fi

# 6. A broken stub already in the cache (as older versions left it) is rebuilt, and the new one
#    exports every driver function cudarc declares.
d=$(fake_toolkit healing)
mkdir -p "$d/x/nvidia/cu13/lib/stubs"
echo 'void cuInit(void){}' > "$work/broken.c"
cc -shared -fPIC -o "$d/x/nvidia/cu13/lib/stubs/libcuda.so" "$work/broken.c"
set +e
out=$(source_it FLEETMARK_CUDA_DIR="$d"); rc=$?
set -e
stub="$d/x/nvidia/cu13/lib/stubs/libcuda.so"
syms=$(nm -D --defined-only "$stub" 2>/dev/null || true)
n=$(grep -c ' cu' <<<"$syms" || true)
if [ $rc -eq 0 ] && grep -q "CARRIED-ON CUDA_ROOT=$d/x/nvidia/cu13" <<<"$out" \
  && grep -q ' cuLaunchKernel$' <<<"$syms" && [ "$n" -gt 100 ] \
  && [ "$(stub_files "$d")" = "libcuda.so" ]; then
  pass "a broken cached stub is replaced by one exporting $n driver functions"
else fail "healing (rc=$rc, $n symbols): $out"; fi

# 7. Sourcing again keeps the good stub as it is.
before=$(stat -c %Y.%i "$stub")
set +e
out=$(source_it FLEETMARK_CUDA_DIR="$d"); rc=$?
set -e
if [ $rc -eq 0 ] && [ "$(stat -c %Y.%i "$stub")" = "$before" ]; then pass "a good stub is kept"
else fail "second source (rc=$rc): $out"; fi

[ "$fails" -eq 0 ] || { echo "$fails case(s) failed"; exit 1; }
echo "cuda-toolchain.sh: all cases passed"
