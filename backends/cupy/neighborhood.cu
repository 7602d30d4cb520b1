// Windowed local attention (neighbourhood attention 1-D/2-D, HaloNet), fused forward and
// deterministic backward (arrayattn cupy backend).
//
// Maps are (B, H, W, c), C-contiguous, B = batch*heads. The windows are separable per-axis int32
// tables (arrayattn._reference.neighborhood, packed by backends/numba_cuda/neighborhood.py):
//   ytab (3, Ky, H), xtab (3, Kx, W): [0] key position, [1] in-image flag, [2] relative row;
//   inverse neighbourhood (for dK/dV): ptr (L+1) and pairs (2, n) = (query position, slot);
//   relative-row CSR (for the table gradients): ptr (T+1) and pairs (2, n) = (position, slot).
// Query (i, j), slot (a, c) reads key (ytab[0,a,i], xtab[0,c,j]) with logit
//   s = scale q.k (0 for a padded key) + q.r_h[ry] + q.r_w[rx] + bias[ry, rx];
// out-of-image slots are excluded unless zero_mode (then they are zero keys/values that stay in
// the softmax). The bias and the tables r_h, r_w are read through broadcast plans: element
// (b, r, c) is at offs[b] + r*rs + c*cs (never materialised per head).
//
// Kernels (templates, instantiated through cupy.RawModule name_expressions):
//   na_fwd<T, Acc, DMAX, SH>   one thread per query pixel, online softmax over its Ky*Kx slots.
//   na_dq<T, Acc, DMAX, SH>    one thread per query pixel: D = dO.O, dl = P (dO.v - D), dq; stores
//                              dl per slot (with a bias) and its per-y/per-x-slot sums (with
//                              tables).
//   na_dkdv<T, Acc, DMAX, SH>  one thread per key pixel, gathering over its inverse neighbourhood
//                              and recomputing P and dl from the saved logsumexp.
// A thread's row vectors (the output accumulator; dq; dk and dv) are registers or shared memory
// (TVec, the SH argument), never local memory.
//   na_dbias<Acc>           one thread per element of the bias as given.
//   na_dtable<T, Acc>       one thread per element of r_h or r_w as given.
// Every output has a single writer (no atomics): results are bitwise deterministic.

#include "_common.cuh"

// A broadcast table (relative bias, r_h or r_w) of one head: element (r, c) at base[r*rs + c*cs].
// Tables are in the accumulation type (float32 for half-precision maps), as the reference reads
// them: a float32 table is never rounded to the maps' dtype.
template <typename Acc>
struct NaTab {
    const Acc* base; i64 rs, cs; int on;
};

template <typename Acc>
__device__ __forceinline__ NaTab<Acc> na_tab(const Acc* flat, const i64* offs, i64 rs, i64 cs,
                                              int on, i64 b) {
    NaTab<Acc> t;
    t.on = on;
    t.base = on ? flat + offs[b] : flat;
    t.rs = rs;
    t.cs = cs;
    return t;
}

template <typename T, typename Acc>
__device__ __forceinline__ Acc na_dot(const T* a, const T* b, int n) {
    Acc s = Acc(0);
    for (int c = 0; c < n; ++c) s += to_acc(a[c], Acc()) * to_acc(b[c], Acc());
    return s;
}

// the logit of query row qp (d values) against key row kp, relative rows (ry, rx)
template <typename T, typename Acc>
__device__ __forceinline__ Acc na_logit(const T* qp, const T* kp, int d, bool ok, int ry, int rx,
                                        Acc scale, const NaTab<Acc>& bias, const NaTab<Acc>& rh,
                                        const NaTab<Acc>& rw) {
    Acc s = Acc(0);
    if (ok) s = na_dot<T, Acc>(qp, kp, d) * scale;
    if (rh.on) {
        Acc t = Acc(0);
        for (int c = 0; c < d; ++c)
            t += to_acc(qp[c], Acc()) * rh.base[ry * rh.rs + c * rh.cs];
        s += t;
    }
    if (rw.on) {
        Acc t = Acc(0);
        for (int c = 0; c < d; ++c)
            t += to_acc(qp[c], Acc()) * rw.base[rx * rw.rs + c * rw.cs];
        s += t;
    }
    if (bias.on) s += bias.base[ry * bias.rs + rx * bias.cs];
    return s;
}

#define NA_PLAN_ARGS(A)                                                                        \
    const A *bflat, const i64 *boffs, i64 brs, i64 bcs, int has_bias, const A *hflat,          \
        const i64 *hoffs, i64 hrs, i64 hcs, int has_rh, const A *wflat, const i64 *woffs,      \
        i64 wrs, i64 wcs, int has_rw

#define NA_PLANS(b)                                                                            \
    const NaTab<Acc> bias = na_tab(bflat, boffs, brs, bcs, has_bias, b);                       \
    const NaTab<Acc> rh = na_tab(hflat, hoffs, hrs, hcs, has_rh, b);                           \
    const NaTab<Acc> rw = na_tab(wflat, woffs, wrs, wcs, has_rw, b)

template <typename T, typename Acc, int DMAX, bool SH>
__global__ void na_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       int nb, int h, int w, int d, int dv, const int* __restrict__ ytab, int ky,
                       const int* __restrict__ xtab, int kx, int zero_mode, Acc scale,
                       NA_PLAN_ARGS(Acc), T* __restrict__ out, Acc* __restrict__ lse) {
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (i64)nb * h * w) return;
    const i64 b = t / ((i64)h * w);
    const int i = (int)((t / w) % h), j = (int)(t % w);
    const i64 base = b * h * w;
    NA_PLANS(b);
    using V = TVec<Acc, DMAX, SH>;
    V acc(reinterpret_cast<Acc*>(smem_raw));
    tv_for<V>(dv, [&](int c) { acc[c] = Acc(0); });
    Acc m = -pos_inf<Acc>(), l = Acc(0);
    for (int a = 0; a < ky; ++a) {
        const int yy = ytab[a * h + i], oky = ytab[(ky + a) * h + i], ry = ytab[(2 * ky + a) * h + i];
        for (int c2 = 0; c2 < kx; ++c2) {
            const int xx = xtab[c2 * w + j];
            const bool ok = oky && xtab[(kx + c2) * w + j];
            if (!ok && !zero_mode) continue;
            const i64 kn = base + (i64)yy * w + xx;
            const Acc s = na_logit<T, Acc>(q + t * d, k + kn * d, d, ok, ry,
                                           xtab[(2 * kx + c2) * w + j], scale, bias, rh, rw);
            // p = 0 exactly; while m is still -inf, exp(s - m) would be exp(-inf + inf) = NaN
            if (s == -pos_inf<Acc>()) continue;
            if (s > m) {  // online softmax: rescale what was accumulated under the old maximum
                const Acc corr = acc_exp(m - s);
                l *= corr;
                tv_for<V>(dv, [&](int c) { acc[c] *= corr; });
                m = s;
            }
            const Acc p = acc_exp(s - m);
            l += p;
            if (ok) tv_for<V>(dv, [&](int c) { acc[c] += p * to_acc(v[kn * dv + c], Acc()); });
        }
    }
    if (l == Acc(0)) {
        tv_for<V>(dv, [&](int c) { out[t * dv + c] = from_acc<T>(Acc(0)); });
        lse[t] = pos_inf<Acc>();
    } else {
        tv_for<V>(dv, [&](int c) { out[t * dv + c] = from_acc<T>(acc[c] / l); });
        lse[t] = m + acc_log(l);
    }
}

template <typename T, typename Acc, int DMAX, bool SH>
__global__ void na_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const T* __restrict__ o, const T* __restrict__ dout,
                      const Acc* __restrict__ lse, int nb, int h, int w, int d, int dv,
                      const int* __restrict__ ytab, int ky, const int* __restrict__ xtab, int kx,
                      int zero_mode, Acc scale, NA_PLAN_ARGS(Acc), T* __restrict__ dq,
                      Acc* __restrict__ delta, Acc* __restrict__ dlst, Acc* __restrict__ suma,
                      Acc* __restrict__ sumc) {
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (i64)nb * h * w) return;
    const i64 b = t / ((i64)h * w);
    const int i = (int)((t / w) % h), j = (int)(t % w);
    const i64 base = b * h * w;
    NA_PLANS(b);
    using V = TVec<Acc, DMAX, SH>;
    V g(reinterpret_cast<Acc*>(smem_raw));
    tv_for<V>(d, [&](int c) { g[c] = Acc(0); });
    const Acc big_d = na_dot<T, Acc>(dout + t * dv, o + t * dv, dv);
    delta[t] = big_d;
    const Acc lu = lse[t];
    if (has_rh)
        for (int a = 0; a < ky; ++a) suma[t * ky + a] = Acc(0);
    if (has_rw)
        for (int c2 = 0; c2 < kx; ++c2) sumc[t * kx + c2] = Acc(0);
    for (int a = 0; a < ky; ++a) {
        const int yy = ytab[a * h + i], oky = ytab[(ky + a) * h + i], ry = ytab[(2 * ky + a) * h + i];
        for (int c2 = 0; c2 < kx; ++c2) {
            const int xx = xtab[c2 * w + j];
            const bool ok = oky && xtab[(kx + c2) * w + j];
            const i64 slot = t * ky * kx + a * kx + c2;
            if ((!ok && !zero_mode) || lu == pos_inf<Acc>()) {
                if (has_bias) dlst[slot] = Acc(0);
                continue;
            }
            const i64 kn = base + (i64)yy * w + xx;
            const Acc s = na_logit<T, Acc>(q + t * d, k + kn * d, d, ok, ry,
                                           xtab[(2 * kx + c2) * w + j], scale, bias, rh, rw);
            const Acc p = acc_exp(s - lu);
            const Acc dp = ok ? na_dot<T, Acc>(dout + t * dv, v + kn * dv, dv) : Acc(0);
            const Acc dl = p * (dp - big_d);
            if (has_bias) dlst[slot] = dl;
            if (has_rh) suma[t * ky + a] += dl;
            if (has_rw) sumc[t * kx + c2] += dl;
            if (ok) {
                const Acc f = dl * scale;
                tv_for<V>(d, [&](int c) { g[c] += f * to_acc(k[kn * d + c], Acc()); });
            }
        }
    }
    if (has_rh)
        for (int a = 0; a < ky; ++a) {
            const Acc f = suma[t * ky + a];
            const int ry = ytab[(2 * ky + a) * h + i];
            tv_for<V>(d, [&](int c) { g[c] += f * rh.base[ry * rh.rs + c * rh.cs]; });
        }
    if (has_rw)
        for (int c2 = 0; c2 < kx; ++c2) {
            const Acc f = sumc[t * kx + c2];
            const int rx = xtab[(2 * kx + c2) * w + j];
            tv_for<V>(d, [&](int c) { g[c] += f * rw.base[rx * rw.rs + c * rw.cs]; });
        }
    tv_for<V>(d, [&](int c) { dq[t * d + c] = from_acc<T>(g[c]); });
}

template <typename T, typename Acc, int DMAX, bool SH>
__global__ void na_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ dout, const Acc* __restrict__ lse,
                        const Acc* __restrict__ delta, int nb, int h, int w, int d, int dv,
                        const int* __restrict__ ytab, int ky, const int* __restrict__ xtab, int kx,
                        const int* __restrict__ yptr, const int* __restrict__ yinv, int ny,
                        const int* __restrict__ xptr, const int* __restrict__ xinv, int nx,
                        Acc scale, NA_PLAN_ARGS(Acc), T* __restrict__ dk, T* __restrict__ dvv) {
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;  // the key pixel (yy, xx)
    if (t >= (i64)nb * h * w) return;
    const i64 b = t / ((i64)h * w);
    const int yy = (int)((t / w) % h), xx = (int)(t % w);
    const i64 base = b * h * w;
    NA_PLANS(b);
    using V = TVec<Acc, DMAX, SH>;
    Acc* vec = reinterpret_cast<Acc*>(smem_raw);
    V gk(vec), gv(vec + (i64)d * blockDim.x);
    tv_for<V>(d, [&](int c) { gk[c] = Acc(0); });
    tv_for<V>(dv, [&](int c) { gv[c] = Acc(0); });
    for (int u = yptr[yy]; u < yptr[yy + 1]; ++u) {
        const int i = yinv[u], a = yinv[ny + u];
        const int ry = ytab[(2 * ky + a) * h + i];
        for (int z = xptr[xx]; z < xptr[xx + 1]; ++z) {
            const int j = xinv[z], c2 = xinv[nx + z];
            const i64 qn = base + (i64)i * w + j;
            const Acc lu = lse[qn];
            if (lu == pos_inf<Acc>()) continue;
            const Acc s = na_logit<T, Acc>(q + qn * d, k + t * d, d, true, ry,
                                           xtab[(2 * kx + c2) * w + j], scale, bias, rh, rw);
            const Acc p = acc_exp(s - lu);
            const Acc dl = p * (na_dot<T, Acc>(dout + qn * dv, v + t * dv, dv) - delta[qn]);
            tv_for<V>(d, [&](int c) { gk[c] += dl * to_acc(q[qn * d + c], Acc()); });
            tv_for<V>(dv, [&](int c) { gv[c] += p * to_acc(dout[qn * dv + c], Acc()); });
        }
    }
    tv_for<V>(d, [&](int c) { dk[t * d + c] = from_acc<T>(gk[c] * scale); });
    tv_for<V>(dv, [&](int c) { dvv[t * dv + c] = from_acc<T>(gv[c]); });
}

// d(rel_bias): one thread per element e of the bias data (..., Ty, Tx), C-contiguous.
template <typename Acc>
__global__ void na_dbias(const Acc* __restrict__ dlst, int nb, int h, int w, int ky, int kx,
                         const int* __restrict__ yrptr, const int* __restrict__ yrel, int nyr,
                         const int* __restrict__ xrptr, const int* __restrict__ xrel, int nxr,
                         const i64* __restrict__ boffs, i64 nrows, i64 ncols, i64 size,
                         Acc* __restrict__ dbias) {
    const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= size) return;
    const i64 rc = nrows * ncols;
    const i64 head = e - e % rc;
    const int ty = (int)((e % rc) / ncols), tx = (int)(e % ncols);
    Acc acc = Acc(0);
    for (int b = 0; b < nb; ++b) {
        if (boffs[b] != head) continue;
        for (int u = yrptr[ty]; u < yrptr[ty + 1]; ++u) {
            const int i = yrel[u], a = yrel[nyr + u];
            for (int z = xrptr[tx]; z < xrptr[tx + 1]; ++z) {
                const i64 qn = ((i64)b * h + i) * w + xrel[z];
                acc += dlst[qn * ky * kx + a * kx + xrel[nxr + z]];
            }
        }
    }
    dbias[e] = acc;
}

// d(r_h) (axis 0) or d(r_w) (axis 1): one thread per element e of the table data (..., T, d).
// sums (B, H, W, K) holds the per-slot sums of dl along the other axis.
template <typename T, typename Acc>
__global__ void na_dtable(const T* __restrict__ q, const Acc* __restrict__ sums, int nb, int h,
                          int w, int d, int kslots, int axis, const int* __restrict__ rptr,
                          const int* __restrict__ rel, int nr, const i64* __restrict__ offs,
                          i64 nrows, i64 ncols, i64 size, Acc* __restrict__ dtab) {
    const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= size) return;
    const i64 rc = nrows * ncols;
    const i64 head = e - e % rc;
    const int row = (int)((e % rc) / ncols), c = (int)(e % ncols);
    Acc acc = Acc(0);
    for (int b = 0; b < nb; ++b) {
        if (offs[b] != head) continue;
        for (int u = rptr[row]; u < rptr[row + 1]; ++u) {
            const int pos = rel[u], slot = rel[nr + u];
            const int other = axis == 0 ? w : h;
            for (int o = 0; o < other; ++o) {
                const i64 qn = axis == 0 ? ((i64)b * h + pos) * w + o : ((i64)b * h + o) * w + pos;
                acc += sums[qn * kslots + slot] * to_acc(q[qn * d + c], Acc());
            }
        }
    }
    dtab[e] = acc;
}
