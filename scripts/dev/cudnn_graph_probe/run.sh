#!/usr/bin/env bash
# Builds and runs probe.c: what cuDNN's graph API makes of one fused convolution (N images of
# C channels, H x H, 3x3, stride 1), planned for the device in h100-sxm.json, with no GPU.
#
# h100-sxm.json is written by hand from the H100 SXM's published properties (132 SMs, sm_90,
# 228 KiB shared memory per block opt-in, 50 MiB L2); the field names are those cuDNN 9.19
# reads (`strings libcudnn_graph.so.9`). A capture from a real card would replace it.
#
# Runtime-compiled engines (all of those offered for a fused convolution) compile their kernel
# with NVRTC and then load it through the driver. With no driver there, this builds a stand-in
# libcuda.so.1 that answers the loading and occupancy calls with fixed values (one block per
# SM), so plans finalize; their workspace sizes and anything that depends on occupancy are
# then not the real card's. What it shows truthfully: that cuDNN accepts the graph, which
# engines it offers, and their knobs.
#
# Needs: `source deploy/cuda-toolchain.sh` first (CUDNN_LIB, CUDA_ROOT), gcc, python3.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${CUDNN_LIB:?source deploy/cuda-toolchain.sh first}" "${CUDA_ROOT:?}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
lib="$CUDNN_LIB/lib"
strings "$lib"/libcudnn_engines_runtime_compiled.so.9 "$lib"/libcudnn_graph.so.9 \
  "$lib"/libcudnn_engines_precompiled.so.9 | grep -oE '^cu[A-Z][A-Za-z0-9_]*$' | sort -u >"$work/syms"
python3 - "$work/syms" >"$work/driver.c" <<'PY'
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
    if name == "cuDNN":
        continue
    # Everything else: CUDA_ERROR_NO_DEVICE.
    print(answers.get(name, f"int {name}(void){{return 100;}}"))
PY
mkdir -p "$work/driver"
gcc -shared -fPIC -w -o "$work/driver/libcuda.so.1" "$work/driver.c"
gcc -w -O1 "$here/probe.c" -I"$CUDNN_LIB/include" -I"$CUDA_ROOT/include" -L"$lib" -lcudnn -o "$work/probe"
LD_LIBRARY_PATH="$lib:$CUDA_ROOT/lib:$work/driver" "$work/probe" "$here/h100-sxm.json" "${1:-1}" "${2:-512}" "${3:-7}" \
  2>&1 | grep -v '^Could not load symbol'
