// The fused path's own 3x3 stride-2 max pool (padding 1) over NHWC activations.
//
// Why it exists: after the stem, cuDNN's NHWC max pool reads the stem's whole output (411 MB
// at batch 256 in f16) at about a third of an H200's memory bandwidth. This kernel moves
// 16 bytes per thread per load (8 f16/bf16 lanes or 4 f32 lanes of one pixel), so the threads
// of one pixel read its channels in one coalesced run, and the overlapping windows of
// neighbouring outputs are served by the caches.
//
// Values are compared through an order-preserving key of their bits, so one kernel serves f16,
// bf16 and f32 without converting anything: a max of stored values is a stored value, bit for
// bit. For sign-magnitude floats, `bits | sign` (non-negative) and `~bits` (negative) order as
// unsigned integers the way the floats order; +0 ranks above -0. NaNs are not treated as
// such: one with the sign bit clear ranks above +inf, one with it set below -inf. The input
// here is a ReLU's output, and the executor uses the kernel only after its output matched
// cuDNN's on the real buffers.
//
// engine/tests/maxpool_on_host.rs compiles this file for the host (a loop plays the grid) and
// checks it against a plain max pool, so its indexing and ordering are tested without a GPU.
//
// Layout contract (the executor checks it before using the kernel): x is n*h*w pixels of
// `vecs` 16-byte vectors each, y is n*oh*ow pixels of the same width, both 16-byte aligned.

#include <stdint.h>

template <typename U> struct Bits;
template <> struct Bits<uint16_t> {
    static constexpr uint16_t SIGN = 0x8000u;
};
template <> struct Bits<uint32_t> {
    static constexpr uint32_t SIGN = 0x80000000u;
};

template <typename U> __device__ __forceinline__ U to_key(U b) {
    return (b & Bits<U>::SIGN) ? static_cast<U>(~b) : static_cast<U>(b | Bits<U>::SIGN);
}

template <typename U> __device__ __forceinline__ U from_key(U k) {
    return (k & Bits<U>::SIGN) ? static_cast<U>(k & ~Bits<U>::SIGN) : static_cast<U>(~k);
}

// One output vector per loop step. I is the index type: 32-bit where the output's vector count
// fits, since 64-bit division and remainder are emulated in software on the GPU and there are
// five of each per step.
template <typename U, typename I>
__device__ __forceinline__ void maxpool3s2_as(const uint4 *__restrict__ x, uint4 *__restrict__ y,
                                              I n, I h, I w, I vecs, I oh, I ow) {
    constexpr int LANES = 16 / sizeof(U);
    const I total = n * oh * ow * vecs;
    const I step = static_cast<I>(gridDim.x) * blockDim.x;
    for (I i = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
        const I v = i % vecs;
        I t = i / vecs;
        const I ox = t % ow;
        t /= ow;
        const I oy = t % oh;
        const I b = t / oh;
        U best[LANES];
#pragma unroll
        for (int l = 0; l < LANES; ++l) best[l] = 0;  // the lowest key: every real value beats it
        const I y0 = oy * 2 - 1;
        const I x0 = ox * 2 - 1;
#pragma unroll
        for (int dy = 0; dy < 3; ++dy) {
            const I iy = y0 + dy;
            if (iy < 0 || iy >= h) continue;
#pragma unroll
            for (int dx = 0; dx < 3; ++dx) {
                const I ix = x0 + dx;
                if (ix < 0 || ix >= w) continue;
                union {
                    uint4 vec;
                    U lane[LANES];
                } in;
                // Pixel indices fit I (they are below n*h*w, and h*w < 4*oh*ow); the element
                // offset is taken in 64 bits, as the input may pass 2^31 vectors.
                const long long pixel = static_cast<long long>((b * h + iy) * w + ix);
                in.vec = __ldg(&x[pixel * vecs + v]);
#pragma unroll
                for (int l = 0; l < LANES; ++l) {
                    const U k = to_key(in.lane[l]);
                    best[l] = k > best[l] ? k : best[l];
                }
            }
        }
        union {
            uint4 vec;
            U lane[LANES];
        } out;
#pragma unroll
        for (int l = 0; l < LANES; ++l) out.lane[l] = from_key(best[l]);
        y[i] = out.vec;
    }
}

template <typename U>
__device__ __forceinline__ void maxpool3s2(const uint4 *__restrict__ x, uint4 *__restrict__ y,
                                           int n, int h, int w, int vecs, int oh, int ow) {
    // Every index the 32-bit loop forms stays below twice the grid's thread count plus the
    // total, so both must leave room under 2^31.
    const long long total = static_cast<long long>(n) * oh * ow * vecs;
    const long long threads = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long input = static_cast<long long>(n) * h * w;
#ifdef MAXPOOL_WIDE_INDEX  // the host test's second build, so both loops are tested
    const bool narrow = false;
#else
    const bool narrow = total + 2 * threads < (1LL << 31) && input < (1LL << 31);
#endif
    if (narrow) {
        maxpool3s2_as<U, int>(x, y, n, h, w, vecs, oh, ow);
    } else {
        maxpool3s2_as<U, long long>(x, y, n, h, w, vecs, oh, ow);
    }
}

// f16 and bf16: eight 16-bit lanes per vector.
extern "C" __global__ void maxpool3s2_nhwc_b16(const uint4 *__restrict__ x, uint4 *__restrict__ y,
                                               int n, int h, int w, int vecs, int oh, int ow) {
    maxpool3s2<uint16_t>(x, y, n, h, w, vecs, oh, ow);
}

// f32: four 32-bit lanes per vector.
extern "C" __global__ void maxpool3s2_nhwc_b32(const uint4 *__restrict__ x, uint4 *__restrict__ y,
                                               int n, int h, int w, int vecs, int oh, int ow) {
    maxpool3s2<uint32_t>(x, y, n, h, w, vecs, oh, ow);
}
