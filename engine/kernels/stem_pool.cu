// The stem and its max pool in one kernel, for the space-to-depth stem in f16 and bf16.
//
// Why it exists: cuDNN runs the stem (a 4x4 stride-1 convolution over 16 space-to-depth
// channels, 64 outputs) at about 146 TFLOP/s on an H100 and writes its whole output (411 MB at
// batch 256 in f16), which the max pool then reads back: together 0.96 ms, a third of the
// forward pass. Here each block computes the stem's outputs under a tile of the pooled output
// on tensor cores, keeps them in shared memory, and writes only the pooled tile (a quarter of
// the bytes). The price is recomputing the conv rows and columns that neighbouring tiles share
// and rounding to whole fragments and row groups (16 rows and 16 columns of conv output per
// 7x7 pooled pixels, where the pool needs 14 x 14: about 31% more multiply-adds).
//
// The layout makes the implicit GEMM free of any gather: with 16 input channels, one filter
// tap (kh, kw) is exactly one 16-deep k-step, and the 16 conv outputs of one row segment read,
// for that tap, 16 consecutive input pixels of 16 channels: a row-major 16x16 matrix with a
// leading dimension of 16, straight out of the shared input tile. The weights (KRSC, 64 x 4 x 4
// x 16) are the column-major B operand with leading dimension 256; each warp loads the
// fragments of its 16 (or 32) output channels once per block, before looping over tiles (with
// two blocks' register budget the compiler may reload some of them from the L1 cache: the
// 32 KB of weights are read by every block).
//
// The epilogue is exact reordering of the unfused one: bias and ReLU are monotone and the bias
// is one per channel, so max over the window of relu(acc + bias) = relu(max(acc) + bias), and
// rounding to 16 bits is monotone too. Window positions outside the stem's output are skipped,
// as cuDNN's padded max pool skips them. The accumulation is f32.
//
// Layout contract (the executor checks it before launching): x is n x hs x ws pixels of 16
// channels (32 bytes each) of T, 32-byte aligned; w is 64 x 4 x 4 x 16 T (KRSC), 32-byte
// aligned; bias is 64 f32, 8-byte aligned; y is n x ph x pw pixels of 64 T, 4-byte aligned,
// where oh = hs - 3, ph = (oh - 1) / 2 + 1 (likewise for the width). Blocks of 256 threads,
// any grid (each block loops over tiles), and the dynamic shared memory Tile::SMEM; a block
// given less returns at once and writes nothing, so a launch the host sized wrongly fails the
// executor's comparison with cuDNN instead of overrunning shared memory.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <mma.h>
#include <stdint.h>

namespace stem_pool {

using namespace nvcuda;

constexpr int CIN = 16;    // space-to-depth channels: one k-step per filter tap
constexpr int KS = 4;      // the filter is KS x KS
constexpr int TAPS = KS * KS;
constexpr int COUT = 64;   // the stem's output channels: four 16-wide fragments
constexpr int OUT_LD = COUT + 8;  // floats per conv pixel in shared memory: rows 32 B apart in banks
constexpr int TPW = 7;     // pooled columns per block
constexpr int CC = 16;     // conv columns per block: 2 * TPW + 1 = 15, rounded up to a fragment
constexpr int IC = CC + KS - 1;  // input columns per block
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;

// TPH pooled rows per tile; conv rows in groups of RG (a warp computes RG conv rows at once,
// so each A fragment it loads serves up to min(RG, KS) of them).
template <int TPH, int RG> struct Tile {
    static constexpr int CR = 2 * TPH + 1;                // conv rows the pool needs
    static constexpr int CRP = (CR + RG - 1) / RG * RG;   // conv rows computed
    static constexpr int IR = CRP + KS - 1;               // input rows per tile
    static constexpr int IN_BYTES = IR * IC * CIN * 2;
    static constexpr int OUT_BYTES = CR * CC * OUT_LD * 4;
    static constexpr int SMEM = 2 * IN_BYTES + OUT_BYTES;  // two input tiles: the next one loads
};

template <typename T> struct Pair;
template <> struct Pair<__half> {
    using T2 = __half2;
    static __device__ __forceinline__ T2 from(float a, float b) {
        return __floats2half2_rn(a, b);
    }
};
template <> struct Pair<__nv_bfloat16> {
    using T2 = __nv_bfloat162;
    static __device__ __forceinline__ T2 from(float a, float b) {
        return __floats2bfloat162_rn(a, b);
    }
};

// bf16 tensor-core fragments need sm_80; built for an older GPU, the bf16 kernels are empty
// (such a GPU is never given bf16 work: the agent refuses it).
template <typename T> struct Supported {
    static constexpr bool value = true;
};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
template <> struct Supported<__nv_bfloat16> {
    static constexpr bool value = false;
};
#endif

struct Geometry {
    int hs, ws, oh, ow, ph, pw, tiles_x, tiles_y, tiles;
};

// Starts copying tile `tile`'s input (zero outside the image) into `dst`, 16 bytes per copy.
template <typename T, int TPH, int RG>
__device__ __forceinline__ void load_input(const T *__restrict__ x, T *dst, int tile,
                                           const Geometry &g) {
    using TileT = Tile<TPH, RG>;
    const int bx = tile % g.tiles_x;
    const int rest = tile / g.tiles_x;
    const int by = rest % g.tiles_y;
    const long long n = rest / g.tiles_y;
    const int r0 = 2 * by * TPH - 1;
    const int c0 = 2 * bx * TPW - 1;
    const uint4 *x4 = reinterpret_cast<const uint4 *>(x);
    uint4 *t4 = reinterpret_cast<uint4 *>(dst);
    for (int i = threadIdx.x; i < TileT::IR * IC * 2; i += THREADS) {
        const int v = i & 1;
        const int p = i >> 1;
        const int gr = r0 + p / IC;
        const int gc = c0 + p % IC;
        const bool inside = gr >= 0 && gr < g.hs && gc >= 0 && gc < g.ws;
        // Outside the image the copy reads nothing (source size 0) and fills 16 zero bytes.
        const uint4 *src = inside ? x4 + ((n * g.hs + gr) * g.ws + gc) * 2 + v : x4;
        __pipeline_memcpy_async(t4 + i, src, 16, inside ? 0 : 16);
    }
    __pipeline_commit();
}

// NFW: 16-channel fragments per warp (1 or 2). The 8 warps split the 4 fragments of output
// channels into 4 / NFW groups, and the row groups of the tile among the warps of a group.
template <typename T, int TPH, int NFW, int RG>
__device__ __forceinline__ void run(const T *__restrict__ x, const T *__restrict__ w,
                                    const float *__restrict__ bias, T *__restrict__ y,
                                    const Geometry g) {
    using TileT = Tile<TPH, RG>;
    constexpr int CR = TileT::CR;
    constexpr int CRP = TileT::CRP;
    unsigned dynamic_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_smem));
    if (dynamic_smem < static_cast<unsigned>(TileT::SMEM)) return;
    constexpr int NGROUPS = 4 / NFW;
    constexpr int MGROUPS = WARPS / NGROUPS;
    extern __shared__ __align__(128) unsigned char smem[];
    // Two input tiles: `cur` is computed on while the next one loads into the other.
    auto in_tiles = [&](int which) {
        return reinterpret_cast<T *>(smem + which * TileT::IN_BYTES);
    };
    float *out_tile = reinterpret_cast<float *>(smem + 2 * TileT::IN_BYTES);

    const int warp = threadIdx.x / 32;
    const int ngroup = warp % NGROUPS;
    const int mgroup = warp / NGROUPS;

    // This warp's weights, for every tile the block computes.
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[NFW][TAPS];
#pragma unroll
    for (int f = 0; f < NFW; ++f) {
#pragma unroll
        for (int t = 0; t < TAPS; ++t) {
            wmma::load_matrix_sync(b[f][t], w + (ngroup * NFW + f) * 16 * TAPS * CIN + t * CIN,
                                   TAPS * CIN);
        }
    }

    int cur = 0;
    if (blockIdx.x < g.tiles) load_input<T, TPH, RG>(x, in_tiles(0), blockIdx.x, g);
    for (int tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
        // This tile's input has landed (each thread waits for its own copies; the barrier for
        // everyone's), and the previous tile's pool is done with the output tile.
        __pipeline_wait_prior(0);
        __syncthreads();
        const int next = tile + gridDim.x;
        if (next < g.tiles) load_input<T, TPH, RG>(x, in_tiles(cur ^ 1), next, g);
        const T *in_tile = in_tiles(cur);

        for (int r = mgroup * RG; r < CRP; r += MGROUPS * RG) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[RG][NFW];
#pragma unroll
            for (int j = 0; j < RG; ++j)
#pragma unroll
                for (int f = 0; f < NFW; ++f) wmma::fill_fragment(acc[j][f], 0.0f);
            // Input row r + ii feeds conv row r + j through filter row kh = ii - j.
#pragma unroll
            for (int ii = 0; ii < RG + KS - 1; ++ii) {
#pragma unroll
                for (int kw = 0; kw < KS; ++kw) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                    wmma::load_matrix_sync(a, in_tile + ((r + ii) * IC + kw) * CIN, CIN);
#pragma unroll
                    for (int j = 0; j < RG; ++j) {
                        const int kh = ii - j;
                        if (kh < 0 || kh >= KS) continue;
#pragma unroll
                        for (int f = 0; f < NFW; ++f)
                            wmma::mma_sync(acc[j][f], a, b[f][kh * KS + kw], acc[j][f]);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < RG; ++j) {
                if (r + j >= CR) continue;  // rounding to whole groups: the pool needs no more
#pragma unroll
                for (int f = 0; f < NFW; ++f) {
                    wmma::store_matrix_sync(out_tile + (r + j) * CC * OUT_LD +
                                                (ngroup * NFW + f) * 16,
                                            acc[j][f], OUT_LD, wmma::mem_row_major);
                }
            }
        }
        __syncthreads();

        // The pool: one thread per (pooled pixel, pair of channels); a warp writes one
        // pixel's 64 channels (128 contiguous bytes).
        using T2 = typename Pair<T>::T2;
        const int bx = tile % g.tiles_x;
        const int rest = tile / g.tiles_x;
        const int pr0 = (rest % g.tiles_y) * TPH;
        const int pc0 = bx * TPW;
        const long long n = rest / g.tiles_y;
        for (int i = threadIdx.x; i < TPH * TPW * (COUT / 2); i += THREADS) {
            const int cp = i % (COUT / 2);
            const int p = i / (COUT / 2);
            const int pj = p % TPW;
            const int pi = p / TPW;
            const int gpi = pr0 + pi;
            const int gpj = pc0 + pj;
            if (gpi >= g.ph || gpj >= g.pw) continue;
            float mx = -INFINITY;
            float my = -INFINITY;
#pragma unroll
            for (int dy = 0; dy < 3; ++dy) {
                const int gr = 2 * gpi - 1 + dy;
                if (gr < 0 || gr >= g.oh) continue;
#pragma unroll
                for (int dx = 0; dx < 3; ++dx) {
                    const int gc = 2 * gpj - 1 + dx;
                    if (gc < 0 || gc >= g.ow) continue;
                    const float2 v = *reinterpret_cast<const float2 *>(
                        out_tile + ((2 * pi + dy) * CC + (2 * pj + dx)) * OUT_LD + 2 * cp);
                    mx = fmaxf(mx, v.x);
                    my = fmaxf(my, v.y);
                }
            }
            const float2 bb = *reinterpret_cast<const float2 *>(bias + 2 * cp);
            const T2 out = Pair<T>::from(fmaxf(mx + bb.x, 0.0f), fmaxf(my + bb.y, 0.0f));
            *reinterpret_cast<T2 *>(y + ((n * g.ph + gpi) * g.pw + gpj) * COUT + 2 * cp) = out;
        }
        cur ^= 1;
    }
    __pipeline_wait_prior(0);
}

// The kernel body where T has tensor-core fragments on the GPU built for; none elsewhere (a
// discarded `if constexpr` branch of a template is not instantiated).
template <typename T, int TPH, int NFW, int RG>
__device__ __forceinline__ void entry(const T *__restrict__ x, const T *__restrict__ w,
                                      const float *__restrict__ bias, T *__restrict__ y,
                                      const Geometry g) {
    if constexpr (Supported<T>::value) run<T, TPH, NFW, RG>(x, w, bias, y, g);
}

}  // namespace stem_pool

// The kernels' C signature: (x, w, bias, y, hs, ws, n). The rest of the geometry follows
// from those, so a caller cannot pass an inconsistent one.
#define STEM_POOL_KERNEL(NAME, T, TPH, NFW, RG, MINB)                                          \
    extern "C" __global__ void __launch_bounds__(stem_pool::THREADS, MINB)                     \
        NAME(const T *__restrict__ x, const T *__restrict__ w, const float *__restrict__ bias, \
             T *__restrict__ y, int hs, int ws, int n) {                                       \
        stem_pool::Geometry g;                                                                 \
        g.hs = hs;                                                                             \
        g.ws = ws;                                                                             \
        g.oh = hs - (stem_pool::KS - 1);                                                       \
        g.ow = ws - (stem_pool::KS - 1);                                                       \
        g.ph = (g.oh - 1) / 2 + 1;                                                             \
        g.pw = (g.ow - 1) / 2 + 1;                                                             \
        g.tiles_x = (g.pw + stem_pool::TPW - 1) / stem_pool::TPW;                              \
        g.tiles_y = (g.ph + TPH - 1) / TPH;                                                    \
        g.tiles = g.tiles_x * g.tiles_y * n;                                                   \
        stem_pool::entry<T, TPH, NFW, RG>(x, w, bias, y, g);                                   \
    }

// Pooled rows per tile (7 or 14), 16-channel fragments per warp (1 or 2), conv rows per warp
// pass (2 or 4), and the blocks per SM the registers are budgeted for. The executor times
// the variants and keeps the fastest.
// (On an H100 the other shapes tried, 2 conv rows per pass, one fragment with 14 pooled rows,
// one conv row per pass, were slower: scripts/device/stem_pool_probe.cu.) The list is
// mirrored by STEM_POOL_VARIANTS in engine/src/fused/planner.rs.
#define STEM_POOL_VARIANTS(P, T)                                 \
    STEM_POOL_KERNEL(stem_pool_##P##_r7_n1_g4, T, 7, 1, 4, 2)    \
    STEM_POOL_KERNEL(stem_pool_##P##_r7_n2_g4, T, 7, 2, 4, 1)    \
    STEM_POOL_KERNEL(stem_pool_##P##_r14_n2_g4, T, 14, 2, 4, 1)

STEM_POOL_VARIANTS(f16, __half)
STEM_POOL_VARIANTS(bf16, __nv_bfloat16)
