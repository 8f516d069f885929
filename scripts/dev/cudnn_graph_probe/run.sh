#!/usr/bin/env bash
# Builds and runs probe.c: what cuDNN's graph API makes of one fused convolution (N images of
# C channels, H x H, 3x3, stride 1), planned for the device in
# engine/testdata/h100-sxm-deviceprop.json, with no GPU.
#
# engine/testdata/h100-sxm-deviceprop.json is written by hand from the H100 SXM's published properties (132 SMs, sm_90,
# 228 KiB shared memory per block opt-in, 50 MiB L2); the field names are those cuDNN 9.19
# reads (`strings libcudnn_graph.so.9`). A capture from a real card would replace it.
#
# Runtime-compiled engines (all of those offered for a fused convolution) compile their kernel
# with NVRTC and then load it through the driver: stand_in_driver.sh provides one (see there).
# What the probe shows truthfully: that cuDNN accepts the graph, which engines it offers, and
# their knobs; not workspace sizes or anything that depends on occupancy.
#
# Needs: `source deploy/cuda-toolchain.sh` first (CUDNN_LIB, CUDA_ROOT), gcc, python3.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${CUDNN_LIB:?source deploy/cuda-toolchain.sh first}" "${CUDA_ROOT:?}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
lib="$CUDNN_LIB/lib"
"$here/stand_in_driver.sh" "$work/driver"
gcc -w -O1 "$here/probe.c" -I"$CUDNN_LIB/include" -I"$CUDA_ROOT/include" -L"$lib" -lcudnn -o "$work/probe"
LD_LIBRARY_PATH="$lib:$CUDA_ROOT/lib:$work/driver" "$work/probe" "$here/../../../engine/testdata/h100-sxm-deviceprop.json" "${1:-1}" "${2:-512}" "${3:-7}" \
  2>&1 | grep -v '^Could not load symbol'
