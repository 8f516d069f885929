#!/usr/bin/env bash
# Builds OUTDIR/libcuda.so.1, a stand-in for the NVIDIA driver library on a machine without a
# GPU, so that cuDNN can finish planning for a device described in JSON ("deviceless"
# planning, cuDNN >= 9.8): its runtime-compiled engines compile a kernel with NVRTC and then
# load it through the driver before a plan finalizes.
#
# Every driver function that cuDNN's libraries name, and every one cudarc links against (from
# the toolchain's link stub, so a Rust test binary loads with it), is defined. The calls plan
# finalization makes to load a module and size its launch answer with fixed values: a module
# and kernel handle that point nowhere, 1024 threads and 128 registers per kernel, one block
# per SM. Everything else returns CUDA_ERROR_NO_DEVICE (100). Nothing can run on it; plans made
# with it are for looking at (which engines, which knobs), not for their workspace sizes.
#
# Usage: stand_in_driver.sh OUTDIR   (after `source deploy/cuda-toolchain.sh`: CUDNN_LIB,
#        CUDA_ROOT). Needs gcc, python3, nm, strings.
set -euo pipefail
out=${1:?usage: stand_in_driver.sh OUTDIR}
: "${CUDNN_LIB:?source deploy/cuda-toolchain.sh first}" "${CUDA_ROOT:?}"
mkdir -p "$out"
lib="$CUDNN_LIB/lib"
syms=$(mktemp)
src=$(mktemp --suffix=.c)
trap 'rm -f "$syms" "$src"' EXIT
{
  strings "$lib"/libcudnn_engines_runtime_compiled.so.9 "$lib"/libcudnn_graph.so.9 \
    "$lib"/libcudnn_engines_precompiled.so.9 | grep -oE '^cu[A-Z][A-Za-z0-9_]*$'
  nm -D --defined-only "$CUDA_ROOT/lib/stubs/libcuda.so" | awk '{print $NF}' | grep -E '^cu[A-Z]'
} | sort -u >"$syms"
python3 - "$syms" >"$src" <<'PY'
import sys
answers = {
    "cuInit": "int cuInit(unsigned f){return 0;}",
    "cuDriverGetVersion": "int cuDriverGetVersion(int*v){*v=13000;return 0;}",
    "cuLibraryLoadData": "int cuLibraryLoadData(void**l,const void*c,void*a,void*b,unsigned n,void*o,void*p,unsigned m){*l=(void*)0x1000;return 0;}",
    "cuLibraryUnload": "int cuLibraryUnload(void*l){return 0;}",
    "cuLibraryGetKernel": "int cuLibraryGetKernel(void**k,void*l,const char*n){*k=(void*)0x2000;return 0;}",
    "cuLibraryGetModule": "int cuLibraryGetModule(void**m,void*l){*m=(void*)0x3000;return 0;}",
    "cuKernelGetFunction": "int cuKernelGetFunction(void**f,void*k){*f=(void*)0x4000;return 0;}",
    "cuModuleGetFunction": "int cuModuleGetFunction(void**f,void*m,const char*n){*f=(void*)0x4000;return 0;}",
    "cuModuleLoadData": "int cuModuleLoadData(void**m,const void*d){*m=(void*)0x3000;return 0;}",
    "cuModuleUnload": "int cuModuleUnload(void*m){return 0;}",
    "cuFuncGetAttribute": "int cuFuncGetAttribute(int*v,int a,void*f){*v=a==0?1024:a==4?128:0;return 0;}",
    "cuKernelGetAttribute": "int cuKernelGetAttribute(int*v,int a,void*k,int d){*v=a==0?1024:a==4?128:0;return 0;}",
    "cuFuncSetAttribute": "int cuFuncSetAttribute(void*f,int a,int v){return 0;}",
    "cuKernelSetAttribute": "int cuKernelSetAttribute(int a,int v,void*k,int d){return 0;}",
    "cuFuncSetCacheConfig": "int cuFuncSetCacheConfig(void*f,int c){return 0;}",
    "cuOccupancyMaxActiveBlocksPerMultiprocessor": "int cuOccupancyMaxActiveBlocksPerMultiprocessor(int*n,void*f,int b,unsigned long s){*n=1;return 0;}",
    "cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags": "int cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int*n,void*f,int b,unsigned long s,unsigned g){*n=1;return 0;}",
    "cuOccupancyMaxActiveClusters": "int cuOccupancyMaxActiveClusters(int*n,void*f,void*c){*n=1;return 0;}",
    "cuCtxGetCurrent": "int cuCtxGetCurrent(void**c){*c=(void*)0x5000;return 0;}",
    "cuCtxGetDevice": "int cuCtxGetDevice(int*d){*d=0;return 0;}",
    "cuDeviceGet": "int cuDeviceGet(int*d,int o){*d=0;return 0;}",
    "cuDeviceGetCount": "int cuDeviceGetCount(int*n){*n=1;return 0;}",
}
for name in open(sys.argv[1]).read().split():
    # Everything not answered above: CUDA_ERROR_NO_DEVICE.
    print(answers.get(name, f"int {name}(void){{return 100;}}"))
PY
gcc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$out/libcuda.so.1" "$src"
