#!/usr/bin/env bash
# Installs a CUDA build toolchain from PyPI wheels (nvcc, headers, cuBLAS, cuRAND, NVRTC, cuDNN)
# into a cache folder, so `--features cuda,cudnn` builds of the agent work on a machine with no
# GPU and no system CUDA toolkit (CI, build hosts, container builds). Nothing is installed
# system-wide.
#
# The toolkit must not be newer than the CUDA version the target nodes' driver supports: PTX
# from a newer nvcc fails to load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). This installs CUDA 13.0
# (driver 580 or newer) and cuDNN 9.19 by default; set FLEETMARK_CUDA_WHEELS to pin others.
#
# Usage:  source deploy/cuda-toolchain.sh        (sets CUDA_ROOT, CUDNN_LIB, CUDA_COMPUTE_CAP, PATH)
#         then: cargo build --release -p fleetmark-agent --features cudnn
#         (running it as a program, `bash deploy/cuda-toolchain.sh`, fills the cache only)
# Needs:  bash, python3 with pip, a C compiler ($CC or cc), nm, and the cudarc sources in the
#         cargo registry (the driver stub below is generated from them; `cargo fetch` is run
#         here when they are missing).
# Cache:  $FLEETMARK_CUDA_DIR (default ~/.cache/fleetmark-cuda-13.0), about 1.1 GB once.
#
# Failure: the first failing step prints "cuda toolchain: ..." and stops. Sourced from a script
# (non-interactive shell), that script exits with status 1; sourced from an interactive shell,
# the `source` returns 1 and nothing is exported. Nothing broken is left in the cache: the
# wheels are unpacked into a staging folder and moved into place only when all of them
# unpacked, and the libcuda stub is built into a temporary file and moved into place only
# after `nm -D` shows it exports every driver function cudarc links against. A cached stub
# that fails that check (for example one left by an older version of this script) is rebuilt.

_fm_err() { echo "cuda toolchain: $*" >&2; }

# Prints the driver API functions cudarc declares (one per line, sorted), from its sources.
_fm_cudarc_symbols() {
  grep -oE '^[[:space:]]+fn cu[A-Za-z0-9_]+\(' "$1" | sed -E 's/^[[:space:]]+fn //; s/\($//' | sort -u
}

# Succeeds when the shared object $1 exports (defines) every name listed in file $2.
_fm_stub_ok() {
  local missing
  [ -s "$1" ] || return 1
  missing=$(nm -D --defined-only "$1" 2>/dev/null | awk '{print $NF}' | sort -u | comm -13 - "$2")
  if [ -n "$missing" ]; then
    _fm_err "$1 lacks $(wc -l <<<"$missing") driver symbols (first: $(head -1 <<<"$missing"))"
    return 1
  fi
}

# Finds cudarc's driver bindings for the version in the workspace's Cargo.lock, running
# `cargo fetch` once when they are not in the registry yet.
_fm_find_cudarc() {
  local repo="$1" version src
  version=$(awk '/^name = "cudarc"$/ {getline; gsub(/version = |"/, ""); print; exit}' "$repo/Cargo.lock" 2>/dev/null)
  [ -n "$version" ] || { _fm_err "no cudarc in $repo/Cargo.lock"; return 1; }
  src=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$version"/src/driver/sys/mod.rs 2>/dev/null | head -1)
  if [ -z "$src" ]; then
    command -v cargo >/dev/null || { _fm_err "cudarc $version is not in the cargo registry and cargo is not on PATH: run 'cargo fetch' in $repo"; return 1; }
    echo "cuda toolchain: fetching crates (cudarc $version sources are needed for the driver stub)" >&2
    cargo fetch --manifest-path "$repo/Cargo.toml" >&2 || { _fm_err "cargo fetch failed"; return 1; }
    src=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$version"/src/driver/sys/mod.rs 2>/dev/null | head -1)
    [ -n "$src" ] || { _fm_err "cargo fetch did not bring cudarc $version's sources"; return 1; }
  fi
  echo "$src"
}

# Downloads and unpacks the wheels into $1/x, all or nothing.
_fm_install_wheels() {
  local dir="$1" stage w
  mkdir -p "$dir/wheels" || { _fm_err "cannot create $dir"; return 1; }
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps -d "$dir/wheels" $_fm_wheels >&2 || { _fm_err "pip download failed"; return 1; }
  stage=$(mktemp -d "$dir/x.staging.XXXXXX") || { _fm_err "cannot create a staging folder in $dir"; return 1; }
  for w in "$dir"/wheels/*.whl; do
    python3 -m zipfile -e "$w" "$stage" || { _fm_err "cannot unpack $w"; rm -rf "$stage"; return 1; }
  done
  local root="$stage/nvidia/cu13"
  [ -e "$root/nvvm/bin/cicc" ] && [ -e "$stage/nvidia/cudnn/lib/libcudnn.so.9" ] \
    || { _fm_err "the wheels did not contain nvvm/bin/cicc and libcudnn.so.9"; rm -rf "$stage"; return 1; }
  chmod +x "$root"/bin/* "$root"/nvvm/bin/* 2>/dev/null
  # The wheels ship only versioned sonames; the linker wants the plain names.
  local l
  for l in cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13 cudart.so.13; do
    ln -sf "lib$l" "$root/lib/lib${l%%.so*}.so" || { rm -rf "$stage"; return 1; }
  done
  ln -sf libcudnn.so.9 "$stage/nvidia/cudnn/lib/libcudnn.so" || { rm -rf "$stage"; return 1; }
  rm -rf "$dir/x" && mv "$stage" "$dir/x" || { _fm_err "cannot move the toolkit into $dir/x"; rm -rf "$stage"; return 1; }
}

# libcuda comes with the driver, which a build host lacks: link against a stub exporting the
# driver API's names. The real libcuda.so.1 is found at run time on the GPU node.
_fm_build_stub() {
  local stubs="$1" src="$2" wanted="$1/libcuda.symbols" tmp c
  mkdir -p "$stubs" || { _fm_err "cannot create $stubs"; return 1; }
  _fm_cudarc_symbols "$src" > "$wanted.tmp" || true
  # A format change in cudarc's sources would give an empty list and an empty stub.
  grep -qx cuInit "$wanted.tmp" && grep -qx cuLaunchKernel "$wanted.tmp" \
    || { _fm_err "found no driver functions (cuInit, cuLaunchKernel) in $src"; rm -f "$wanted.tmp"; return 1; }
  mv -f "$wanted.tmp" "$wanted"
  [ -e "$stubs/libcuda.so" ] && _fm_stub_ok "$stubs/libcuda.so" "$wanted" 2>/dev/null && return 0
  tmp=$(mktemp "$stubs/libcuda.so.XXXXXX") || return 1
  c="$tmp.c"
  awk '{print "void "$1"(void){}"}' "$wanted" > "$c"
  if ! "${CC:-cc}" -shared -fPIC -o "$tmp" -Wl,-soname,libcuda.so.1 "$c"; then
    _fm_err "cannot build the libcuda stub with ${CC:-cc}"; rm -f "$tmp" "$c"; return 1
  fi
  rm -f "$c"
  _fm_stub_ok "$tmp" "$wanted" || { _fm_err "the freshly built stub is incomplete; not caching it"; rm -f "$tmp"; return 1; }
  chmod 755 "$tmp" && mv -f "$tmp" "$stubs/libcuda.so" || { rm -f "$tmp"; return 1; }
}

_fm_main() {
  local dir="${FLEETMARK_CUDA_DIR:-$HOME/.cache/fleetmark-cuda-13.0}"
  local root="$dir/x/nvidia/cu13" repo src tool
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
  for tool in python3 nm "${CC:-cc}"; do
    command -v "$tool" >/dev/null || { _fm_err "$tool is not installed"; return 1; }
  done
  if [ ! -x "$root/nvvm/bin/cicc" ] || [ ! -e "$dir/x/nvidia/cudnn/lib/libcudnn.so" ]; then
    _fm_install_wheels "$dir" || return 1
  fi
  src=$(_fm_find_cudarc "$repo") || return 1
  _fm_build_stub "$root/lib/stubs" "$src" || return 1
  _fm_out_root="$root"
  _fm_out_cudnn="$dir/x/nvidia/cudnn"
}

_fm_wheels="${FLEETMARK_CUDA_WHEELS:-nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.5.25 nvidia-cublas==13.0.2.14 nvidia-cudnn-cu13==9.19.0.56}"
_fm_rc=0
_fm_main || _fm_rc=$?
unset -f _fm_err _fm_cudarc_symbols _fm_stub_ok _fm_find_cudarc _fm_install_wheels _fm_build_stub _fm_main
unset _fm_wheels
if [ "$_fm_rc" -ne 0 ]; then
  unset _fm_rc _fm_out_root _fm_out_cudnn
  # Interactive shells get their prompt back; scripts that sourced this stop here.
  case $- in
    *i*) return 1 ;;
    *) exit 1 ;;
  esac
fi
export CUDA_ROOT="$_fm_out_root"
export CUDNN_LIB="$_fm_out_cudnn"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
case ":$PATH:" in *":$CUDA_ROOT/bin:"*) ;; *) export PATH="$CUDA_ROOT/bin:$PATH" ;; esac
unset _fm_rc _fm_out_root _fm_out_cudnn
