#!/usr/bin/env bash
# Installs a CUDA build toolchain from PyPI wheels (nvcc, headers, cuBLAS, cuRAND, NVRTC, cuDNN)
# into a cache folder, so `--features cuda,cudnn` builds of the agent work on a machine with no
# GPU and no system CUDA toolkit (CI, build hosts). Nothing is installed system-wide.
#
# The toolkit must not be newer than the CUDA version the target nodes' driver supports: PTX
# from a newer nvcc fails to load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). This installs CUDA 13.0
# (driver 580 or newer) and cuDNN 9.19 by default; set FLEETMARK_CUDA_WHEELS to pin others.
#
# Usage:  source deploy/cuda-toolchain.sh        (sets CUDA_ROOT, CUDNN_LIB, CUDA_COMPUTE_CAP, PATH)
#         then: cargo build --release -p fleetmark-agent --features cudnn
# Needs:  python3 with pip, a C compiler, and `cargo fetch` run once in the workspace (the driver
#         stub below is generated from cudarc's sources).
# Cache:  $FLEETMARK_CUDA_DIR (default ~/.cache/fleetmark-cuda-13.0), about 1.1 GB once.

_fm_dir="${FLEETMARK_CUDA_DIR:-$HOME/.cache/fleetmark-cuda-13.0}"
_fm_root="$_fm_dir/x/nvidia/cu13"
_fm_wheels="${FLEETMARK_CUDA_WHEELS:-nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.5.25 nvidia-cublas==13.0.2.14 nvidia-cudnn-cu13==9.19.0.56}"
_fm_fail() { echo "cuda toolchain: $*" >&2; return 1 2>/dev/null || exit 1; }

if [ ! -x "$_fm_root/nvvm/bin/cicc" ] || [ ! -e "$_fm_dir/x/nvidia/cudnn/lib/libcudnn.so" ] || [ ! -e "$_fm_root/lib/stubs/libcuda.so" ]; then
  mkdir -p "$_fm_dir/wheels" "$_fm_dir/x" || _fm_fail "cannot create $_fm_dir"
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps -d "$_fm_dir/wheels" $_fm_wheels >&2 || _fm_fail "pip download failed"
  for w in "$_fm_dir"/wheels/*.whl; do
    python3 -m zipfile -e "$w" "$_fm_dir/x" || _fm_fail "cannot unpack $w"
  done
  chmod +x "$_fm_root"/bin/* "$_fm_root"/nvvm/bin/* 2>/dev/null
  # The wheels ship only versioned sonames; the linker wants the plain names.
  for l in cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13 cudart.so.13; do
    ln -sf "lib$l" "$_fm_root/lib/lib${l%%.so*}.so"
  done
  ln -sf libcudnn.so.9 "$_fm_dir/x/nvidia/cudnn/lib/libcudnn.so"
  # libcuda comes with the driver, which a build host lacks: link against a stub exporting the
  # driver API's names. The real libcuda.so.1 is found at run time on the GPU node.
  mkdir -p "$_fm_root/lib/stubs"
  _fm_src=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null | tail -1)
  [ -n "$_fm_src" ] || _fm_fail "no cudarc sources in the cargo registry: run 'cargo fetch' in the workspace first"
  grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$_fm_src" | sed -E 's/^\s+fn //; s/\($//' | sort -u \
    | awk '{print "void "$1"(void){}"}' > "$_fm_dir/libcuda_stub.c"
  cc -shared -fPIC -o "$_fm_root/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$_fm_dir/libcuda_stub.c" \
    || _fm_fail "cannot build the libcuda stub"
fi
export CUDA_ROOT="$_fm_root"
export CUDNN_LIB="$_fm_dir/x/nvidia/cudnn"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
case ":$PATH:" in *":$_fm_root/bin:"*) ;; *) export PATH="$_fm_root/bin:$PATH" ;; esac
