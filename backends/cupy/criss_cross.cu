// Criss-cross attention (CCNet), fused forward and deterministic backward (arrayattn cupy backend).
//
// Maps are (B, H, W, c), C-contiguous. Pixel u = (y, x) attends to the W keys of its row and the
// H - 1 other keys of its column (one joint softmax); key index n < W is (y, n), n >= W is
// (n - W, x) with n - W != y. One thread per pixel in every kernel; dK/dV gather over the queries
// that see a key (its row and its column), so there are no atomics. A thread's row vectors are
// registers or shared memory (TVec, the SH argument), never local memory.

#include "_common.cuh"

// the n-th key of pixel (y, x); false for the skipped self key of the column part
__device__ __forceinline__ bool cc_key(int n, int y, int x, int w, int& yy, int& xx) {
    if (n < w) { yy = y; xx = n; return true; }
    yy = n - w; xx = x;
    return yy != y;
}

template <typename T, typename Acc>
__device__ __forceinline__ Acc cc_dot(const T* a, i64 ia, const T* b, i64 ib, int n) {
    Acc s = Acc(0);
    for (int c = 0; c < n; ++c) s += to_acc(a[ia + c], Acc()) * to_acc(b[ib + c], Acc());
    return s;
}

// Row vectors (TVec, _common.cuh): out accumulator (dv) | dq (d) | dk (d), dv (dv).

template <typename T, typename Acc, int DMAX, bool SH>
__global__ void cc_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       int nb, int h, int w, int d, int dv, Acc scale, T* __restrict__ out,
                       Acc* __restrict__ lse) {
    using V = TVec<Acc, DMAX, SH>;
    V acc(reinterpret_cast<Acc*>(smem_raw));
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (i64)nb * h * w) return;
    const i64 b = t / ((i64)h * w);
    const int y = (int)((t / w) % h), x = (int)(t % w);
    const i64 base = b * h * w;
    tv_for<V>(dv, [&](int c) { acc[c] = Acc(0); });
    Acc m = -pos_inf<Acc>();
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
        const Acc p = acc_exp(cc_dot<T, Acc>(q, t * d, k, kn * d, d) * scale - m);
        l += p;
        tv_for<V>(dv, [&](int c) { acc[c] += p * to_acc(v[kn * dv + c], Acc()); });
    }
    tv_for<V>(dv, [&](int c) { out[t * dv + c] = from_acc<T>(acc[c] / l); });
    lse[t] = m + acc_log(l);
}

template <typename T, typename Acc>
__global__ void cc_delta(const T* __restrict__ dout, const T* __restrict__ o, i64 npix, int dv,
                         Acc* __restrict__ delta) {
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= npix) return;
    delta[t] = cc_dot<T, Acc>(dout, t * dv, o, t * dv, dv);
}

template <typename T, typename Acc, int DMAX, bool SH>
__global__ void cc_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const T* __restrict__ dout, const Acc* __restrict__ lse,
                      const Acc* __restrict__ delta, int nb, int h, int w, int d, int dv,
                      Acc scale, T* __restrict__ dq) {
    using V = TVec<Acc, DMAX, SH>;
    V g(reinterpret_cast<Acc*>(smem_raw));
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (i64)nb * h * w) return;
    const i64 b = t / ((i64)h * w);
    const int y = (int)((t / w) % h), x = (int)(t % w);
    const i64 base = b * h * w;
    tv_for<V>(d, [&](int c) { g[c] = Acc(0); });
    int yy, xx;
    for (int n = 0; n < w + h; ++n) {
        if (!cc_key(n, y, x, w, yy, xx)) continue;
        const i64 kn = base + (i64)yy * w + xx;
        const Acc p = acc_exp(cc_dot<T, Acc>(q, t * d, k, kn * d, d) * scale - lse[t]);
        const Acc ds = p * (cc_dot<T, Acc>(dout, t * dv, v, kn * dv, dv) - delta[t]);
        tv_for<V>(d, [&](int c) { g[c] += ds * to_acc(k[kn * d + c], Acc()); });
    }
    tv_for<V>(d, [&](int c) { dq[t * d + c] = from_acc<T>(g[c] * scale); });
}

template <typename T, typename Acc, int DMAX, bool SH>
__global__ void cc_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ dout, const Acc* __restrict__ lse,
                        const Acc* __restrict__ delta, int nb, int h, int w, int d, int dv,
                        Acc scale, T* __restrict__ dk, T* __restrict__ dvv) {
    using V = TVec<Acc, DMAX, SH>;
    Acc* vec = reinterpret_cast<Acc*>(smem_raw);
    V gk(vec), gv(vec + (i64)d * blockDim.x);
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;  // the key pixel
    if (t >= (i64)nb * h * w) return;
    const i64 b = t / ((i64)h * w);
    const int y = (int)((t / w) % h), x = (int)(t % w);
    const i64 base = b * h * w;
    tv_for<V>(d, [&](int c) { gk[c] = Acc(0); });
    tv_for<V>(dv, [&](int c) { gv[c] = Acc(0); });
    int yy, xx;
    for (int n = 0; n < w + h; ++n) {  // the queries that see this key: same index set
        if (!cc_key(n, y, x, w, yy, xx)) continue;
        const i64 u = base + (i64)yy * w + xx;
        const Acc p = acc_exp(cc_dot<T, Acc>(q, u * d, k, t * d, d) * scale - lse[u]);
        const Acc ds = p * (cc_dot<T, Acc>(dout, u * dv, v, t * dv, dv) - delta[u]);
        tv_for<V>(dv, [&](int c) { gv[c] += p * to_acc(dout[u * dv + c], Acc()); });
        tv_for<V>(d, [&](int c) { gk[c] += ds * to_acc(q[u * d + c], Acc()); });
    }
    tv_for<V>(d, [&](int c) { dk[t * d + c] = from_acc<T>(gk[c] * scale); });
    tv_for<V>(dv, [&](int c) { dvv[t * dv + c] = from_acc<T>(gv[c]); });
}
