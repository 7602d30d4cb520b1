// Criss-cross attention (CCNet), fused forward and deterministic backward (arrayattn cupy backend).
//
// Maps are (B, H, W, c), C-contiguous. Pixel u = (y, x) attends to the W keys of its row and the
// H - 1 other keys of its column (one joint softmax); key index n < W is (y, n), n >= W is
// (n - W, x) with n - W != y. One thread per pixel in every kernel; dK/dV gather over the queries
// that see a key (its row and its column), so there are no atomics.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef long long i64;

__device__ __forceinline__ float cc_acc(float x, float) { return x; }
__device__ __forceinline__ double cc_acc(double x, double) { return x; }
__device__ __forceinline__ float cc_acc(__half x, float) { return __half2float(x); }
__device__ __forceinline__ float cc_acc(__nv_bfloat16 x, float) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T cc_out(float x);
template <> __device__ __forceinline__ float cc_out<float>(float x) { return x; }
template <> __device__ __forceinline__ __half cc_out<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 cc_out<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T> __device__ __forceinline__ T cc_out(double x);
template <> __device__ __forceinline__ double cc_out<double>(double x) { return x; }
__device__ __forceinline__ float cc_exp(float x) { return expf(x); }
__device__ __forceinline__ double cc_exp(double x) { return exp(x); }
__device__ __forceinline__ float cc_log(float x) { return logf(x); }
__device__ __forceinline__ double cc_log(double x) { return log(x); }

// the n-th key of pixel (y, x); false for the skipped self key of the column part
__device__ __forceinline__ bool cc_key(int n, int y, int x, int w, int& yy, int& xx) {
    if (n < w) { yy = y; xx = n; return true; }
    yy = n - w; xx = x;
    return yy != y;
}

template <typename T, typename Acc>
__device__ __forceinline__ Acc cc_dot(const T* a, i64 ia, const T* b, i64 ib, int n) {
    Acc s = Acc(0);
    for (int c = 0; c < n; ++c) s += cc_acc(a[ia + c], Acc()) * cc_acc(b[ib + c], Acc());
    return s;
}

template <typename T, typename Acc, int DMAX>
__global__ void cc_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       int nb, int h, int w, int d, int dv, Acc scale, T* __restrict__ out,
                       Acc* __restrict__ lse) {
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (i64)nb * h * w) return;
    const i64 b = t / ((i64)h * w);
    const int y = (int)((t / w) % h), x = (int)(t % w);
    const i64 base = b * h * w;
    Acc acc[DMAX];
    for (int c = 0; c < dv; ++c) acc[c] = Acc(0);
    Acc m = -Acc(__int_as_float(0x7f800000));  // -inf
    int yy, xx;
    for (int n = 0; n < w + h; ++n) {
        if (!cc_key(n, y, x, w, yy, xx)) continue;
        const Acc s = cc_dot<T, Acc>(q, t * d, k, (base + (i64)yy * w + xx) * d, d) * scale;
        m = s > m ? s : m;
    }
    Acc l = Acc(0);
    for (int n = 0; n < w + h; ++n) {
        if (!cc_key(n, y, x, w, yy, xx)) continue;
        const i64 kn = base + (i64)yy * w + xx;
        const Acc p = cc_exp(cc_dot<T, Acc>(q, t * d, k, kn * d, d) * scale - m);
        l += p;
        for (int c = 0; c < dv; ++c) acc[c] += p * cc_acc(v[kn * dv + c], Acc());
    }
    for (int c = 0; c < dv; ++c) out[t * dv + c] = cc_out<T>(acc[c] / l);
    lse[t] = m + cc_log(l);
}

template <typename T, typename Acc>
__global__ void cc_delta(const T* __restrict__ dout, const T* __restrict__ o, i64 npix, int dv,
                         Acc* __restrict__ delta) {
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= npix) return;
    delta[t] = cc_dot<T, Acc>(dout, t * dv, o, t * dv, dv);
}

template <typename T, typename Acc, int DMAX>
__global__ void cc_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const T* __restrict__ dout, const Acc* __restrict__ lse,
                      const Acc* __restrict__ delta, int nb, int h, int w, int d, int dv,
                      Acc scale, T* __restrict__ dq) {
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (i64)nb * h * w) return;
    const i64 b = t / ((i64)h * w);
    const int y = (int)((t / w) % h), x = (int)(t % w);
    const i64 base = b * h * w;
    Acc g[DMAX];
    for (int c = 0; c < d; ++c) g[c] = Acc(0);
    int yy, xx;
    for (int n = 0; n < w + h; ++n) {
        if (!cc_key(n, y, x, w, yy, xx)) continue;
        const i64 kn = base + (i64)yy * w + xx;
        const Acc p = cc_exp(cc_dot<T, Acc>(q, t * d, k, kn * d, d) * scale - lse[t]);
        const Acc ds = p * (cc_dot<T, Acc>(dout, t * dv, v, kn * dv, dv) - delta[t]);
        for (int c = 0; c < d; ++c) g[c] += ds * cc_acc(k[kn * d + c], Acc());
    }
    for (int c = 0; c < d; ++c) dq[t * d + c] = cc_out<T>(g[c] * scale);
}

template <typename T, typename Acc, int DMAX>
__global__ void cc_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ dout, const Acc* __restrict__ lse,
                        const Acc* __restrict__ delta, int nb, int h, int w, int d, int dv,
                        Acc scale, T* __restrict__ dk, T* __restrict__ dvv) {
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;  // the key pixel
    if (t >= (i64)nb * h * w) return;
    const i64 b = t / ((i64)h * w);
    const int y = (int)((t / w) % h), x = (int)(t % w);
    const i64 base = b * h * w;
    Acc gk[DMAX], gv[DMAX];
    for (int c = 0; c < d; ++c) gk[c] = Acc(0);
    for (int c = 0; c < dv; ++c) gv[c] = Acc(0);
    int yy, xx;
    for (int n = 0; n < w + h; ++n) {  // the queries that see this key: same index set
        if (!cc_key(n, y, x, w, yy, xx)) continue;
        const i64 u = base + (i64)yy * w + xx;
        const Acc p = cc_exp(cc_dot<T, Acc>(q, u * d, k, t * d, d) * scale - lse[u]);
        const Acc ds = p * (cc_dot<T, Acc>(dout, u * dv, v, t * dv, dv) - delta[u]);
        for (int c = 0; c < dv; ++c) gv[c] += p * cc_acc(dout[u * dv + c], Acc());
        for (int c = 0; c < d; ++c) gk[c] += ds * cc_acc(q[u * d + c], Acc());
    }
    for (int c = 0; c < d; ++c) dk[t * d + c] = cc_out<T>(gk[c] * scale);
    for (int c = 0; c < dv; ++c) dvv[t * dv + c] = cc_out<T>(gv[c]);
}
