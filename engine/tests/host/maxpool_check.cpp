// engine/kernels/maxpool.cu compiled for the host and checked against a plain max pool over
// decoded values, on random bit patterns (every finite value, subnormals, +-0 and +-inf; no
// NaN, which the kernel does not order as cuDNN does). Prints one line per case and exits 1 on
// the first output that is wrong, or that is not one of its window's stored values.
#include "cuda_shim.h"

#include "../../kernels/maxpool.cu"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

static float f32_of(uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
static float bf16_of(uint16_t b) { return f32_of(uint32_t(b) << 16); }
static float f16_of(uint16_t b) {
    const int sign = b >> 15, exp = (b >> 10) & 0x1f, man = b & 0x3ff;
    float v = exp == 0    ? std::ldexp(float(man), -24)
              : exp == 31 ? INFINITY
                          : std::ldexp(float(man | 0x400), exp - 25);
    return sign ? -v : v;
}

static bool is_nan16(uint16_t b, bool bf) {
    return bf ? ((b & 0x7f80) == 0x7f80 && (b & 0x7f)) : ((b & 0x7c00) == 0x7c00 && (b & 0x3ff));
}
static bool is_nan32(uint32_t b) { return (b & 0x7f800000u) == 0x7f800000u && (b & 0x7fffffu); }

using Kernel = void (*)(const uint4 *, uint4 *, int, int, int, int, int, int);

template <typename U>
static int check(const char *name, Kernel kernel, float (*decode)(U), bool (*nan)(U), int n, int h,
                 int w, int c, unsigned blocks_cap, unsigned seed) {
    const int lanes = 16 / sizeof(U), vecs = c / lanes;
    const int oh = (h - 1) / 2 + 1, ow = (w - 1) / 2 + 1;
    std::mt19937 rng(seed);
    std::vector<U> x(size_t(n) * h * w * c);
    for (auto &v : x) {
        do {
            v = U(rng());
        } while (nan(v));
    }
    std::vector<U> y(size_t(n) * oh * ow * c, U(0x5a5a5a5a));
    const long long total = (long long)n * oh * ow * vecs;
    blockDim.x = 256;
    long long blocks = (total + 255) / 256;
    gridDim.x = unsigned(blocks < blocks_cap ? blocks : blocks_cap);
    for (blockIdx.x = 0; blockIdx.x < gridDim.x; ++blockIdx.x)
        for (threadIdx.x = 0; threadIdx.x < blockDim.x; ++threadIdx.x)
            kernel(reinterpret_cast<const uint4 *>(x.data()), reinterpret_cast<uint4 *>(y.data()), n,
                   h, w, vecs, oh, ow);
    for (int b = 0; b < n; ++b)
        for (int oy = 0; oy < oh; ++oy)
            for (int ox = 0; ox < ow; ++ox)
                for (int ch = 0; ch < c; ++ch) {
                    float best = -INFINITY;
                    bool stored = false;
                    const U got = y[((size_t(b) * oh + oy) * ow + ox) * c + ch];
                    for (int iy = oy * 2 - 1; iy <= oy * 2 + 1; ++iy)
                        for (int ix = ox * 2 - 1; ix <= ox * 2 + 1; ++ix) {
                            if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                            const U v = x[((size_t(b) * h + iy) * w + ix) * c + ch];
                            best = std::fmax(best, decode(v));
                            stored |= v == got;
                        }
                    if (decode(got) != best || !stored) {
                        std::printf("FAIL %s %dx%dx%dx%d grid %u: at (%d,%d,%d,%d) got %g, want %g%s\n",
                                    name, n, h, w, c, gridDim.x, b, oy, ox, ch, decode(got), best,
                                    stored ? "" : " (not a stored value)");
                        return 1;
                    }
                }
    std::printf("ok %s %dx%dx%dx%d -> %dx%d, grid %u\n", name, n, h, w, c, oh, ow, gridDim.x);
    return 0;
}

static float f16_dec(uint16_t b) { return f16_of(b); }
static float bf16_dec(uint16_t b) { return bf16_of(b); }
static float f32_dec(uint32_t b) { return f32_of(b); }
static bool f16_nan(uint16_t b) { return is_nan16(b, false); }
static bool bf16_nan(uint16_t b) { return is_nan16(b, true); }
static bool f32_nan(uint32_t b) { return is_nan32(b); }

int main() {
    int bad = 0;
    // The stem's pool at a small batch, odd sizes, narrow channels, and a capped grid (the
    // kernel's loop then covers the rest).
    const int shapes[][4] = {{2, 112, 112, 64}, {1, 33, 31, 64}, {3, 7, 9, 16}, {1, 1, 1, 8},
                             {1, 2, 3, 8}};
    for (auto s : shapes) {
        for (unsigned cap : {1u << 20, 3u}) {
            bad |= check<uint16_t>("f16", maxpool3s2_nhwc_b16, f16_dec, f16_nan, s[0], s[1], s[2],
                                   s[3], cap, 1);
            bad |= check<uint16_t>("bf16", maxpool3s2_nhwc_b16, bf16_dec, bf16_nan, s[0], s[1], s[2],
                                   s[3], cap, 2);
            bad |= check<uint32_t>("f32", maxpool3s2_nhwc_b32, f32_dec, f32_nan, s[0], s[1], s[2],
                                   s[3], cap, 3);
        }
    }
    return bad;
}
