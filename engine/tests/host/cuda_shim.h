// Just enough of CUDA's C++ dialect to compile a kernel source for the host, where the test
// plays the grid with a loop over blockIdx and threadIdx. Used by engine/tests/maxpool_on_host.rs.
#pragma once
#include <cstdint>

#define __global__
#define __device__
#define __forceinline__ inline

struct uint4 {
    unsigned x, y, z, w;
};

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

static Dim3 gridDim, blockDim, blockIdx, threadIdx;

template <typename T> inline T __ldg(const T *p) { return *p; }
