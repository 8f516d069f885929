// A standalone probe of engine/kernels/stem_pool.cu on a GPU, without the agent: checks every
// variant against a plain stem (conv + bias + ReLU, rounded) and max pool computed by naive
// kernels on the same data, then times each variant with CUDA events (median of 20 runs of 20
// launches after a warm-up). Prints one line per variant; exits 1 if any variant disagrees.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 -I engine/kernels scripts/device/stem_pool_probe.cu -o probe
//   ./probe 256 [224]  # batch size (default 256), image side (default 224; 200 or 161 give
//                      # pooled sides of 50 and 41, so the tiles at the right and bottom edges
//                      # are partial)
//
// It measures the kernel alone; whether the engine uses it is decided by the executor, which
// times it against cuDNN's stem and pool on its real buffers.

#include "stem_pool.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e_ = (x);                                                              \
        if (e_ != cudaSuccess) {                                                           \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(2);                                                                       \
        }                                                                                  \
    } while (0)

template <typename T> __device__ float tof(T v);
template <> __device__ float tof(__half v) { return __half2float(v); }
template <> __device__ float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ T fromf(float v);
template <> __device__ __half fromf(float v) { return __float2half_rn(v); }
template <> __device__ __nv_bfloat16 fromf(float v) { return __float2bfloat16_rn(v); }

// The unfused reference: s[n][r][c][k] = round(relu(sum x*w + bias)).
template <typename T>
__global__ void ref_conv(const T *x, const T *w, const float *bias, T *s, int n, int hs, int ws,
                         int oh, int ow) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long total = (long long)n * oh * ow * 64;
    if (i >= total) return;
    int k = i % 64;
    long long t = i / 64;
    int c = t % ow;
    t /= ow;
    int r = t % oh;
    int b = t / oh;
    float acc = 0;
    for (int kh = 0; kh < 4; ++kh)
        for (int kw = 0; kw < 4; ++kw)
            for (int ch = 0; ch < 16; ++ch)
                acc += tof(x[(((long long)b * hs + r + kh) * ws + c + kw) * 16 + ch]) *
                       tof(w[((k * 4 + kh) * 4 + kw) * 16 + ch]);
    s[i] = fromf<T>(fmaxf(acc + bias[k], 0.0f));
}

template <typename T>
__global__ void ref_pool(const T *s, T *y, int n, int oh, int ow, int ph, int pw) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long total = (long long)n * ph * pw * 64;
    if (i >= total) return;
    int k = i % 64;
    long long t = i / 64;
    int c = t % pw;
    t /= pw;
    int r = t % ph;
    int b = t / ph;
    float m = -INFINITY;
    for (int dy = 0; dy < 3; ++dy)
        for (int dx = 0; dx < 3; ++dx) {
            int gr = 2 * r - 1 + dy, gc = 2 * c - 1 + dx;
            if (gr < 0 || gr >= oh || gc < 0 || gc >= ow) continue;
            m = fmaxf(m, tof(s[(((long long)b * oh + gr) * ow + gc) * 64 + k]));
        }
    y[i] = fromf<T>(m);
}

template <typename T> __global__ void to_float(const T *a, float *o, long long count) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < count) o[i] = tof(a[i]);
}

template <typename T> __global__ void fill(T *a, long long count, unsigned seed, float scale, int pad_from) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= count) return;
    unsigned h = (unsigned)(i * 2654435761u) ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    float v = ((h & 0xffff) / 65535.0f - 0.5f) * scale;
    if (pad_from >= 0 && (i % 16) >= pad_from) v = 0;  // the 4 padding channels are zero
    a[i] = fromf<T>(v);
}

using Kern = void (*)(const void *, const void *, const float *, void *, int, int, int);

struct Variant {
    const char *name;
    const void *fn;
    int tph;
    int smem;
};

template <typename T>
int probe(const char *prec, int n, int size, const Variant *vars, int nv) {
    const int oh = (size - 1) / 2 + 1, hs = oh + 3, ws = hs, ow = oh;
    const int ph = (oh - 1) / 2 + 1, pw = ph;
    const long long xin = (long long)n * hs * ws * 16, sn = (long long)n * oh * ow * 64,
                    yn = (long long)n * ph * pw * 64;
    T *x, *w, *s, *yr, *y;
    float *bias, *fr, *fy;
    CK(cudaMalloc(&x, xin * sizeof(T)));
    CK(cudaMalloc(&w, 64 * 256 * sizeof(T)));
    CK(cudaMalloc(&s, sn * sizeof(T)));
    CK(cudaMalloc(&yr, yn * sizeof(T)));
    CK(cudaMalloc(&y, yn * sizeof(T)));
    CK(cudaMalloc(&bias, 64 * sizeof(float)));
    CK(cudaMalloc(&fr, yn * sizeof(float)));
    CK(cudaMalloc(&fy, yn * sizeof(float)));
    auto blocks = [](long long c) { return (unsigned)((c + 255) / 256); };
    fill<T><<<blocks(xin), 256>>>(x, xin, 1u, 4.0f, 12);
    fill<T><<<blocks(64 * 256), 256>>>(w, 64 * 256, 2u, 0.5f, 12);
    std::vector<float> hb(64);
    for (int k = 0; k < 64; ++k) hb[k] = 0.1f * ((k * 37) % 11) - 0.5f;
    CK(cudaMemcpy(bias, hb.data(), 64 * sizeof(float), cudaMemcpyHostToDevice));
    ref_conv<T><<<blocks(sn), 256>>>(x, w, bias, s, n, hs, ws, oh, ow);
    ref_pool<T><<<blocks(yn), 256>>>(s, yr, n, oh, ow, ph, pw);
    to_float<T><<<blocks(yn), 256>>>(yr, fr, yn);
    CK(cudaDeviceSynchronize());
    std::vector<float> ref(yn), got(yn);
    CK(cudaMemcpy(ref.data(), fr, yn * sizeof(float), cudaMemcpyDeviceToHost));
    int bad_total = 0;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int v = 0; v < nv; ++v) {
        const Variant &var = vars[v];
        CK(cudaFuncSetAttribute(var.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, var.smem));
        int per_sm = 0, sms = 0;
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, var.fn, 256, var.smem));
        CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
        const int tiles = ((pw + 6) / 7) * ((ph + var.tph - 1) / var.tph) * n;
        const int grid = std::min(tiles, sms * per_sm);
        Kern k = (Kern)var.fn;
        CK(cudaMemset(y, 0xff, yn * sizeof(T)));
        k<<<grid, 256, var.smem>>>(x, w, bias, y, hs, ws, n);
        CK(cudaGetLastError());
        to_float<T><<<blocks(yn), 256>>>(y, fy, yn);
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(got.data(), fy, yn * sizeof(float), cudaMemcpyDeviceToHost));
        long long bad = 0, first = -1;
        double maxrel = 0;
        for (long long i = 0; i < yn; ++i) {
            double d = std::fabs((double)got[i] - ref[i]);
            double tol = 1e-2 * std::max(1.0, (double)std::fabs(ref[i]));
            if (!(d <= tol)) {
                if (first < 0) first = i;
                ++bad;
            }
            maxrel = std::max(maxrel, d / std::max(1e-3, (double)std::fabs(ref[i])));
        }
        std::vector<float> times;
        for (int warm = 0; warm < 10; ++warm) k<<<grid, 256, var.smem>>>(x, w, bias, y, hs, ws, n);
        for (int rep = 0; rep < 20; ++rep) {
            CK(cudaEventRecord(e0));
            for (int it = 0; it < 20; ++it) k<<<grid, 256, var.smem>>>(x, w, bias, y, hs, ws, n);
            CK(cudaEventRecord(e1));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            times.push_back(ms / 20);
        }
        std::sort(times.begin(), times.end());
        double flop = 2.0 * n * oh * ow * 64 * 256;
        printf("%s b%d s%d %-24s %d/SM %s bad=%lld first=%lld maxrel=%.2e  p50 %.4f ms  min %.4f ms  %.0f useful TFLOP/s\n",
               prec, n, size, var.name, per_sm, bad ? "FAIL" : "ok", bad, first, maxrel, times[10], times[0],
               flop / (times[10] * 1e-3) / 1e12);
        if (bad) {
            printf("   got %g want %g at %lld\n", got[first], ref[first], first);
            ++bad_total;
        }
    }
    cudaFree(x); cudaFree(w); cudaFree(s); cudaFree(yr); cudaFree(y); cudaFree(bias); cudaFree(fr); cudaFree(fy);
    return bad_total;
}

#define V(P, NAME, TPH, RG) \
    {#NAME, (const void *)stem_pool_##P##_##NAME, TPH, stem_pool::Tile<TPH, RG>::SMEM}
#define VS(P)                                                                              \
    {V(P, r7_n1_g4, 7, 4), V(P, r7_n2_g4, 7, 4), V(P, r14_n2_g4, 14, 4)}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 256;
    int size = argc > 2 ? atoi(argv[2]) : 224;
    Variant f16[] = VS(f16);
    Variant bf16[] = VS(bf16);
    int bad = probe<__half>("f16", n, size, f16, 3) + probe<__nv_bfloat16>("bf16", n, size, bf16, 3);
    return bad ? 1 : 0;
}
