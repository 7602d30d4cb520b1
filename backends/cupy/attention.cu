// Scaled dot-product attention, FlashAttention-2 forward and backward (arrayattn cupy backend).
//
// Layout: q (B, Lq, d), k (B/groups, Lk, d), v (B/groups, Lk, dv), C-contiguous; B = batch*heads,
// query head b reads kv head b / groups (grouped-query attention). A mask (uint8, 1 = may attend)
// and a bias are read through broadcast plans: element (b, i, j) is at offs[b] + i*rs + j*cs.
// The bias is in the accumulation type (float for float16/bfloat16 inputs), as the reference adds
// it: a float32 bias is never rounded to half precision.
// causal: key j is kept for query i iff j <= i + coff.
//
// Kernels (templates, instantiated through cupy.RawModule name_expressions):
//   sdpa_fwd<T, Acc, DMAX>      CUDA cores: one block per (b, query tile of blockDim.x rows), one
//                               thread per query row; K/V tiles in shared memory; online softmax
//                               with the row state and the output accumulator in registers.
//   sdpa_fwd_wmma<T, DP>        float16/bfloat16 on tensor cores (wmma 16x16x16, float32
//                               accumulation): 4 warps x 16 query rows, S = Q K^T and O += P V by
//                               wmma; the online-softmax row state in shared memory.
//   sdpa_delta<T, Acc>          D = rowsum(dO * O) - dlse.
//   sdpa_dkdv_wmma<T, DP>       float16/bfloat16 backward on tensor cores: 4 warps x 16 key rows,
//                               S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q by wmma
//                               (P and dS rounded to T for the products, float32 accumulation).
//   sdpa_dq_wmma<T, DP>         4 warps x 16 query rows: S = Q K^T, dP = dO V^T, dQ += dS K.
//   sdpa_dkdv<T, Acc, DMAX>     one block per (kv head, key tile), one thread per key row, looping
//                               over the query heads of its group and the query tiles.
//   sdpa_dq<T, Acc, DMAX>       one block per (b, query tile), one thread per query row.
//   sdpa_dbias<T, Acc>          one thread per element of the bias as given (before broadcast).
// The backward passes own their outputs (no atomics): results are bitwise deterministic.
// Validated without a GPU only: compiled with NVRTC (sm_80, sm_90) and run as host C++ through
// tests/host_cuda/shim.h (tests/test_cupy_on_host.py).

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

typedef long long i64;

// The dynamic shared memory of every kernel, declared once (one alignment for the whole module:
// wmma tiles need 32-byte alignment, the 16-byte staging loads 16).
extern __shared__ __align__(128) unsigned char smem_raw[];

__device__ __forceinline__ float to_acc(float x, float) { return x; }
__device__ __forceinline__ double to_acc(double x, double) { return x; }
__device__ __forceinline__ float to_acc(__half x, float) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x, float) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T> __device__ __forceinline__ T from_acc(double x);
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename Acc> __device__ __forceinline__ Acc neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -__int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return -__longlong_as_double(0x7ff0000000000000LL); }

struct Plan {
    const unsigned char* mask; const i64* moffs; i64 mrs, mcs; int has_mask;
    i64 coff; int causal;
};

__device__ __forceinline__ bool keep(const Plan& pl, i64 moff, i64 i, i64 j) {
    if (pl.causal && j > i + pl.coff) return false;
    if (pl.has_mask && !pl.mask[moff + i * pl.mrs + j * pl.mcs]) return false;
    return true;
}

// ---------------------------------------------------------------------------------------------
// forward, CUDA cores
// ---------------------------------------------------------------------------------------------

template <typename T, typename Acc, int DMAX>
__global__ void sdpa_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         int nb, int lq, int lk, int d, int dv, int groups, int bk, Acc scale,
                         const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
                         const Acc* bias, const i64* boffs, i64 brs, i64 bcs, int has_bias,
                         int causal, i64 coff, T* __restrict__ out, Acc* __restrict__ lse) {
    Acc* ks = reinterpret_cast<Acc*>(smem_raw);
    Acc* vs = ks + (i64)bk * d;
    const int bq = blockDim.x;
    const int nqt = (lq + bq - 1) / bq;
    const int bh = blockIdx.x / nqt;
    const int i0 = (blockIdx.x % nqt) * bq;
    const int tid = threadIdx.x;
    const int i = i0 + tid;
    const int kvh = bh / groups;
    const bool valid = i < lq;
    const Plan pl{mask, moffs, mrs, mcs, has_mask, coff, causal};
    const i64 moff = has_mask ? moffs[bh] : 0;
    const i64 boff = has_bias ? boffs[bh] : 0;
    const Acc zero = Acc(0), ninf = neg_inf<Acc>();

    Acc qi[DMAX], acc[DMAX];
    for (int c = 0; c < d; ++c) qi[c] = valid ? to_acc(q[((i64)bh * lq + i) * d + c], Acc()) : zero;
    for (int c = 0; c < dv; ++c) acc[c] = zero;
    Acc m = ninf, l = zero;
    const int last = min(i0 + bq, lq) - 1;
    for (int j0 = 0; j0 < lk; j0 += bk) {
        if (causal && (i64)j0 > last + coff) break;  // uniform: every later tile is past the diagonal
        const int nk = min(bk, lk - j0);
        __syncthreads();
        for (int e = tid; e < nk * d; e += bq)
            ks[e] = to_acc(k[((i64)kvh * lk + j0) * d + e], Acc());
        for (int e = tid; e < nk * dv; e += bq)
            vs[e] = to_acc(v[((i64)kvh * lk + j0) * dv + e], Acc());
        __syncthreads();
        if (!valid) continue;
        Acc mt = ninf;
        for (int r = 0; r < nk; ++r) {
            const int j = j0 + r;
            if (!keep(pl, moff, i, j)) continue;
            Acc x = zero;
            for (int c = 0; c < d; ++c) x += qi[c] * ks[r * d + c];
            x *= scale;
            if (has_bias) x += bias[boff + i * brs + j * bcs];
            mt = x > mt ? x : mt;
        }
        const Acc m_new = m > mt ? m : mt;
        const Acc m_use = m_new == ninf ? zero : m_new;
        const Acc corr = acc_exp(m - m_use);
        l *= corr;
        for (int c = 0; c < dv; ++c) acc[c] *= corr;
        for (int r = 0; r < nk; ++r) {  // second sweep: p = exp(s - m) (s recomputed from shared)
            const int j = j0 + r;
            if (!keep(pl, moff, i, j)) continue;
            Acc x = zero;
            for (int c = 0; c < d; ++c) x += qi[c] * ks[r * d + c];
            x *= scale;
            if (has_bias) x += bias[boff + i * brs + j * bcs];
            const Acc p = acc_exp(x - m_use);
            l += p;
            for (int c = 0; c < dv; ++c) acc[c] += p * vs[r * dv + c];
        }
        m = m_new;
    }
    if (!valid) return;
    if (l == zero) {
        for (int c = 0; c < dv; ++c) out[((i64)bh * lq + i) * dv + c] = from_acc<T>(zero);
        lse[(i64)bh * lq + i] = -ninf;
    } else {
        const Acc inv = Acc(1) / l;
        for (int c = 0; c < dv; ++c) out[((i64)bh * lq + i) * dv + c] = from_acc<T>(acc[c] * inv);
        lse[(i64)bh * lq + i] = m + acc_log(l);
    }
}

// ---------------------------------------------------------------------------------------------
// forward, tensor cores (float16 / bfloat16 storage, float32 accumulation)
// ---------------------------------------------------------------------------------------------

namespace wm = nvcuda::wmma;

#define WMMA_BQ 64
#define WMMA_BK 32
#define WMMA_WARPS 4

// dst (rows x DP) = rows [0, rows) of the row-major (n_valid x width) matrix at src, zero padded
// (rows at or past n_valid, columns at or past width). Called by the whole block.
template <typename T, int DP>
__device__ __forceinline__ void stage_tile(T* dst, const T* src, int rows, int n_valid, int width) {
    const T zero = from_acc<T>(0.0f);
    for (int e = threadIdx.x; e < rows * DP; e += blockDim.x) {
        const int r = e / DP, c = e % DP;
        dst[e] = (r < n_valid && c < width) ? src[(i64)r * width + c] : zero;
    }
}

__device__ __forceinline__ void zero_fill(float* p, int n) {
    for (int e = threadIdx.x; e < n; e += blockDim.x) p[e] = 0.0f;
}

template <typename T, int DP>
__global__ void __launch_bounds__(128)
sdpa_fwd_wmma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
              int nb, int lq, int lk, int d, int dv, int groups, float scale,
              const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
              const float* bias, const i64* boffs, i64 brs, i64 bcs, int has_bias,
              int causal, i64 coff, T* __restrict__ out, float* __restrict__ lse) {
    // shared: Q (BQ x DP) T | K (BK x DP) T | V (BK x DP) T | S (BQ x BK) float |
    //         P (BQ x BK) T | O (BQ x DP) float | m, l, corr (BQ) float
    T* qs = reinterpret_cast<T*>(smem_raw);
    T* ks = qs + WMMA_BQ * DP;
    T* vs = ks + WMMA_BK * DP;
    float* ss = reinterpret_cast<float*>(vs + WMMA_BK * DP);
    T* ps = reinterpret_cast<T*>(ss + WMMA_BQ * WMMA_BK);
    float* os = reinterpret_cast<float*>(ps + WMMA_BQ * WMMA_BK);
    float* row_m = os + WMMA_BQ * DP;
    float* row_l = row_m + WMMA_BQ;
    float* row_c = row_l + WMMA_BQ;

    const int nqt = (lq + WMMA_BQ - 1) / WMMA_BQ;
    const int bh = blockIdx.x / nqt;
    const int i0 = (blockIdx.x % nqt) * WMMA_BQ;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int kvh = bh / groups;
    const Plan pl{mask, moffs, mrs, mcs, has_mask, coff, causal};
    const i64 moff = has_mask ? moffs[bh] : 0;
    const i64 boff = has_bias ? boffs[bh] : 0;
    const float ninf = neg_inf<float>();

    stage_tile<T, DP>(qs, q + ((i64)bh * lq + i0) * d, WMMA_BQ, lq - i0, d);
    zero_fill(os, WMMA_BQ * DP);
    for (int r = tid; r < WMMA_BQ; r += blockDim.x) { row_m[r] = ninf; row_l[r] = 0.0f; }
    const int last = min(i0 + WMMA_BQ, lq) - 1;
    const int wr = warp * 16;  // first row of this warp inside the tile

    for (int j0 = 0; j0 < lk; j0 += WMMA_BK) {
        if (causal && (i64)j0 > last + coff) break;
        __syncthreads();
        stage_tile<T, DP>(ks, k + ((i64)kvh * lk + j0) * d, WMMA_BK, lk - j0, d);
        stage_tile<T, DP>(vs, v + ((i64)kvh * lk + j0) * dv, WMMA_BK, lk - j0, dv);
        __syncthreads();
        // S (16 x BK per warp) = Q_w K^T
        for (int n = 0; n < WMMA_BK / 16; ++n) {
            wm::fragment<wm::accumulator, 16, 16, 16, float> sf;
            wm::fill_fragment(sf, 0.0f);
            for (int kk = 0; kk < DP / 16; ++kk) {
                wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> af;
                wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::col_major> bf;
                wm::load_matrix_sync(af, qs + wr * DP + kk * 16, DP);
                wm::load_matrix_sync(bf, ks + n * 16 * DP + kk * 16, DP);
                wm::mma_sync(sf, af, bf, sf);
            }
            wm::store_matrix_sync(ss + wr * WMMA_BK + n * 16, sf, WMMA_BK, wm::mem_row_major);
        }
        __syncwarp();
        // scale, bias, mask (all lanes), then the online softmax of one row per lane (16 lanes)
        for (int e = lane; e < 16 * WMMA_BK; e += 32) {
            const int r = wr + e / WMMA_BK, c = e % WMMA_BK;
            const i64 i = i0 + r, j = j0 + c;
            float x = ninf;
            if (i < lq && j < lk && keep(pl, moff, i, j)) {
                x = ss[r * WMMA_BK + c] * scale;
                if (has_bias) x += bias[boff + i * brs + j * bcs];
            }
            ss[r * WMMA_BK + c] = x;
        }
        __syncwarp();
        if (lane < 16) {
            const int r = wr + lane;
            float mt = ninf;
            for (int c = 0; c < WMMA_BK; ++c) mt = fmaxf(mt, ss[r * WMMA_BK + c]);
            const float m_old = row_m[r];
            const float m_new = fmaxf(m_old, mt);
            const float m_use = m_new == ninf ? 0.0f : m_new;
            const float corr = expf(m_old - m_use);
            float tot = 0.0f;
            for (int c = 0; c < WMMA_BK; ++c) {
                const T p = from_acc<T>(expf(ss[r * WMMA_BK + c] - m_use));
                ps[r * WMMA_BK + c] = p;
                tot += to_acc(p, 0.0f);  // l sums the probabilities actually multiplied with V
            }
            row_l[r] = row_l[r] * corr + tot;
            row_m[r] = m_new;
            row_c[r] = corr;
        }
        __syncwarp();
        for (int e = lane; e < 16 * DP; e += 32) os[wr * DP + e] *= row_c[wr + e / DP];
        __syncwarp();
        // O_w += P_w V
        for (int n = 0; n < DP / 16; ++n) {
            wm::fragment<wm::accumulator, 16, 16, 16, float> of;
            wm::load_matrix_sync(of, os + wr * DP + n * 16, DP, wm::mem_row_major);
            for (int kk = 0; kk < WMMA_BK / 16; ++kk) {
                wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> af;
                wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::row_major> bf;
                wm::load_matrix_sync(af, ps + wr * WMMA_BK + kk * 16, WMMA_BK);
                wm::load_matrix_sync(bf, vs + kk * 16 * DP + n * 16, DP);
                wm::mma_sync(of, af, bf, of);
            }
            wm::store_matrix_sync(os + wr * DP + n * 16, of, DP, wm::mem_row_major);
        }
    }
    __syncthreads();
    for (int e = tid; e < WMMA_BQ * dv; e += blockDim.x) {
        const int r = e / dv, c = e % dv;
        const int i = i0 + r;
        if (i >= lq) continue;
        const float l = row_l[r];
        out[((i64)bh * lq + i) * dv + c] = from_acc<T>(l == 0.0f ? 0.0f : os[r * DP + c] / l);
    }
    for (int r = tid; r < WMMA_BQ; r += blockDim.x) {
        const int i = i0 + r;
        if (i >= lq) continue;
        const float l = row_l[r];
        lse[(i64)bh * lq + i] = l == 0.0f ? -ninf : row_m[r] + logf(l);
    }
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

template <typename T, typename Acc>
__global__ void sdpa_delta(const T* __restrict__ dout, const T* __restrict__ o, const Acc* dlse,
                           int has_dlse, i64 rows, int dv, Acc* __restrict__ delta) {
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows) return;
    Acc acc = Acc(0);
    for (int c = 0; c < dv; ++c) acc += to_acc(dout[t * dv + c], Acc()) * to_acc(o[t * dv + c], Acc());
    if (has_dlse) acc -= dlse[t];
    delta[t] = acc;
}

// p_ij = exp(scale q_i.k_j + b_ij - lse_i); 0 where masked (an empty row has lse = +inf)
template <typename Acc>
__device__ __forceinline__ Acc prob(Acc dot, i64 i, i64 j, Acc scale, Acc lse_i, const Plan& pl,
                                    i64 moff, const Acc* bias, i64 boff, i64 brs, i64 bcs,
                                    int has_bias) {
    if (!keep(pl, moff, i, j)) return Acc(0);
    Acc x = dot * scale;
    if (has_bias) x += bias[boff + i * brs + j * bcs];
    return acc_exp(x - lse_i);
}

template <typename T, typename Acc, int DMAX>
__global__ void sdpa_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const T* __restrict__ dout, const Acc* __restrict__ lse,
                          const Acc* __restrict__ delta, int nb, int lq, int lk, int d, int dv,
                          int groups, int bi, Acc scale,
                          const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
                          const Acc* bias, const i64* boffs, i64 brs, i64 bcs, int has_bias,
                          int causal, i64 coff, T* __restrict__ dk, T* __restrict__ dvv) {
    // blockDim.x key rows per block; query tiles of bi rows staged in shared memory
    Acc* qs = reinterpret_cast<Acc*>(smem_raw);
    Acc* dos = qs + (i64)bi * d;
    Acc* ls = dos + (i64)bi * dv;
    Acc* dl = ls + bi;
    const int bj = blockDim.x;
    const int nkt = (lk + bj - 1) / bj;
    const int kvh = blockIdx.x / nkt;
    const int j0 = (blockIdx.x % nkt) * bj;
    const int tid = threadIdx.x;
    const int j = j0 + tid;
    const bool valid = j < lk;
    const Plan pl{mask, moffs, mrs, mcs, has_mask, coff, causal};
    const Acc zero = Acc(0);
    Acc kj[DMAX], vj[DMAX], dkj[DMAX], dvj[DMAX];
    for (int c = 0; c < d; ++c) { kj[c] = valid ? to_acc(k[((i64)kvh * lk + j) * d + c], Acc()) : zero; dkj[c] = zero; }
    for (int c = 0; c < dv; ++c) { vj[c] = valid ? to_acc(v[((i64)kvh * lk + j) * dv + c], Acc()) : zero; dvj[c] = zero; }
    for (int g = 0; g < groups; ++g) {
        const int bh = kvh * groups + g;
        const i64 moff = has_mask ? moffs[bh] : 0;
        const i64 boff = has_bias ? boffs[bh] : 0;
        for (int i0 = 0; i0 < lq; i0 += bi) {
            const int ni = min(bi, lq - i0);
            if (causal && (i64)j0 > i0 + ni - 1 + coff) continue;  // uniform over the block
            __syncthreads();
            for (int e = tid; e < ni * d; e += bj) qs[e] = to_acc(q[((i64)bh * lq + i0) * d + e], Acc());
            for (int e = tid; e < ni * dv; e += bj) dos[e] = to_acc(dout[((i64)bh * lq + i0) * dv + e], Acc());
            for (int e = tid; e < ni; e += bj) { ls[e] = lse[(i64)bh * lq + i0 + e]; dl[e] = delta[(i64)bh * lq + i0 + e]; }
            __syncthreads();
            if (!valid) continue;
            for (int r = 0; r < ni; ++r) {
                Acc x = zero;
                for (int c = 0; c < d; ++c) x += qs[r * d + c] * kj[c];
                const Acc p = prob<Acc>(x, i0 + r, j, scale, ls[r], pl, moff, bias, boff, brs, bcs, has_bias);
                if (p == zero) continue;
                Acc dp = zero;
                for (int c = 0; c < dv; ++c) { dvj[c] += p * dos[r * dv + c]; dp += dos[r * dv + c] * vj[c]; }
                const Acc ds = p * (dp - dl[r]);
                for (int c = 0; c < d; ++c) dkj[c] += ds * qs[r * d + c];
            }
        }
    }
    if (!valid) return;
    for (int c = 0; c < d; ++c) dk[((i64)kvh * lk + j) * d + c] = from_acc<T>(dkj[c] * scale);
    for (int c = 0; c < dv; ++c) dvv[((i64)kvh * lk + j) * dv + c] = from_acc<T>(dvj[c]);
}

template <typename T, typename Acc, int DMAX>
__global__ void sdpa_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ dout, const Acc* __restrict__ lse,
                        const Acc* __restrict__ delta, int nb, int lq, int lk, int d, int dv,
                        int groups, int bk, Acc scale,
                        const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
                        const Acc* bias, const i64* boffs, i64 brs, i64 bcs, int has_bias,
                        int causal, i64 coff, T* __restrict__ dq) {
    Acc* ks = reinterpret_cast<Acc*>(smem_raw);
    Acc* vs = ks + (i64)bk * d;
    const int bq = blockDim.x;
    const int nqt = (lq + bq - 1) / bq;
    const int bh = blockIdx.x / nqt;
    const int i0 = (blockIdx.x % nqt) * bq;
    const int tid = threadIdx.x;
    const int i = i0 + tid;
    const int kvh = bh / groups;
    const bool valid = i < lq;
    const Plan pl{mask, moffs, mrs, mcs, has_mask, coff, causal};
    const i64 moff = has_mask ? moffs[bh] : 0;
    const i64 boff = has_bias ? boffs[bh] : 0;
    const Acc zero = Acc(0);
    Acc qi[DMAX], doi[DMAX], dqi[DMAX];
    for (int c = 0; c < d; ++c) { qi[c] = valid ? to_acc(q[((i64)bh * lq + i) * d + c], Acc()) : zero; dqi[c] = zero; }
    for (int c = 0; c < dv; ++c) doi[c] = valid ? to_acc(dout[((i64)bh * lq + i) * dv + c], Acc()) : zero;
    const Acc lse_i = valid ? lse[(i64)bh * lq + i] : zero;
    const Acc dl = valid ? delta[(i64)bh * lq + i] : zero;
    const int last = min(i0 + bq, lq) - 1;
    for (int j0 = 0; j0 < lk; j0 += bk) {
        if (causal && (i64)j0 > last + coff) break;
        const int nk = min(bk, lk - j0);
        __syncthreads();
        for (int e = tid; e < nk * d; e += bq) ks[e] = to_acc(k[((i64)kvh * lk + j0) * d + e], Acc());
        for (int e = tid; e < nk * dv; e += bq) vs[e] = to_acc(v[((i64)kvh * lk + j0) * dv + e], Acc());
        __syncthreads();
        if (!valid) continue;
        for (int r = 0; r < nk; ++r) {
            Acc x = zero;
            for (int c = 0; c < d; ++c) x += qi[c] * ks[r * d + c];
            const Acc p = prob<Acc>(x, i, j0 + r, scale, lse_i, pl, moff, bias, boff, brs, bcs, has_bias);
            if (p == zero) continue;
            Acc dp = zero;
            for (int c = 0; c < dv; ++c) dp += doi[c] * vs[r * dv + c];
            const Acc ds = p * (dp - dl);
            for (int c = 0; c < d; ++c) dqi[c] += ds * ks[r * d + c];
        }
    }
    if (!valid) return;
    for (int c = 0; c < d; ++c) dq[((i64)bh * lq + i) * d + c] = from_acc<T>(dqi[c] * scale);
}

template <typename T, typename Acc>
__global__ void sdpa_dbias(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           const T* __restrict__ dout, const Acc* __restrict__ lse,
                           const Acc* __restrict__ delta, int nb, int lq, int lk, int d, int dv,
                           int groups, Acc scale,
                           const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
                           const Acc* bias, const i64* boffs, i64 brs, i64 bcs,
                           int causal, i64 coff, i64 size, i64 nrows, i64 ncols, Acc* __restrict__ dbias) {
    const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= size) return;
    const Plan pl{mask, moffs, mrs, mcs, has_mask, coff, causal};
    const i64 rc = nrows * ncols;
    const i64 head = e - e % rc, r = (e % rc) / ncols, cc = e % ncols;
    const i64 ilo = nrows > 1 ? r : 0, ihi = nrows > 1 ? r + 1 : lq;
    const i64 jlo = ncols > 1 ? cc : 0, jhi = ncols > 1 ? cc + 1 : lk;
    Acc acc = Acc(0);
    for (int bh = 0; bh < nb; ++bh) {
        if (boffs[bh] != head) continue;
        const int kvh = bh / groups;
        const i64 moff = has_mask ? moffs[bh] : 0;
        for (i64 i = ilo; i < ihi; ++i) {
            const Acc lse_i = lse[(i64)bh * lq + i];
            for (i64 j = jlo; j < jhi; ++j) {
                Acc x = Acc(0);
                for (int c = 0; c < d; ++c)
                    x += to_acc(q[((i64)bh * lq + i) * d + c], Acc()) * to_acc(k[((i64)kvh * lk + j) * d + c], Acc());
                const Acc p = prob<Acc>(x, i, j, scale, lse_i, pl, moff, bias, boffs[bh], brs, bcs, 1);
                if (p == Acc(0)) continue;
                Acc dp = Acc(0);
                for (int c = 0; c < dv; ++c)
                    dp += to_acc(dout[((i64)bh * lq + i) * dv + c], Acc()) * to_acc(v[((i64)kvh * lk + j) * dv + c], Acc());
                acc += p * (dp - delta[(i64)bh * lq + i]);
            }
        }
    }
    dbias[e] = acc;
}

// ---------------------------------------------------------------------------------------------
// backward, tensor cores (float16 / bfloat16 storage, float32 accumulation)
// ---------------------------------------------------------------------------------------------

// C_w (16 x n, float, row-major, ldc) = [C_w +] A_w (16 x kdim, T, row-major, lda) B, where B
// (kdim x n) is row-major with ldb (B_ROW) or given as its transpose, n x kdim row-major with ldb.
// n and kdim are multiples of 16; every pointer is 32-byte aligned, lda/ldb multiples of 16.
template <typename T, bool B_ROW>
__device__ __forceinline__ void warp_mma(float* c, int ldc, const T* a, int lda, const T* b, int ldb,
                                         int n, int kdim, bool accumulate) {
    for (int nn = 0; nn < n / 16; ++nn) {
        wm::fragment<wm::accumulator, 16, 16, 16, float> cf;
        if (accumulate) wm::load_matrix_sync(cf, c + nn * 16, ldc, wm::mem_row_major);
        else wm::fill_fragment(cf, 0.0f);
        for (int kk = 0; kk < kdim / 16; ++kk) {
            wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> af;
            wm::load_matrix_sync(af, a + kk * 16, lda);
            if constexpr (B_ROW) {
                wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::row_major> bf;
                wm::load_matrix_sync(bf, b + kk * 16 * ldb + nn * 16, ldb);
                wm::mma_sync(cf, af, bf, cf);
            } else {
                wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::col_major> bf;
                wm::load_matrix_sync(bf, b + nn * 16 * ldb + kk * 16, ldb);
                wm::mma_sync(cf, af, bf, cf);
            }
        }
        wm::store_matrix_sync(c + nn * 16, cf, ldc, wm::mem_row_major);
    }
}

#define WMMA_KEYS 64  // key rows per block of sdpa_dkdv_wmma (16 per warp)
#define WMMA_QB 32    // query rows per staged tile of sdpa_dkdv_wmma

template <typename T, int DP>
__global__ void __launch_bounds__(128)
sdpa_dkdv_wmma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const T* __restrict__ dout, const float* __restrict__ lse,
               const float* __restrict__ delta, int nb, int lq, int lk, int d, int dv, int groups,
               float scale,
               const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
               const float* bias, const i64* boffs, i64 brs, i64 bcs, int has_bias,
               int causal, i64 coff, T* __restrict__ dk, T* __restrict__ dvv) {
    // shared: K, V (KEYS x DP) T | Q, dO (QB x DP) T | S^T then dP^T (KEYS x QB) float |
    //         P^T (KEYS x QB) float | P^T then dS^T (KEYS x QB) T | dK, dV (KEYS x DP) float |
    //         lse, D (QB) float
    T* ks = reinterpret_cast<T*>(smem_raw);
    T* vs = ks + WMMA_KEYS * DP;
    T* qs = vs + WMMA_KEYS * DP;
    T* dos = qs + WMMA_QB * DP;
    float* st = reinterpret_cast<float*>(dos + WMMA_QB * DP);
    float* pf = st + WMMA_KEYS * WMMA_QB;
    T* pt = reinterpret_cast<T*>(pf + WMMA_KEYS * WMMA_QB);
    float* dks = reinterpret_cast<float*>(pt + WMMA_KEYS * WMMA_QB);
    float* dvs = dks + WMMA_KEYS * DP;
    float* ls = dvs + WMMA_KEYS * DP;
    float* dl = ls + WMMA_QB;

    const int nkt = (lk + WMMA_KEYS - 1) / WMMA_KEYS;
    const int kvh = blockIdx.x / nkt;
    const int j0 = (blockIdx.x % nkt) * WMMA_KEYS;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wr = warp * 16;  // first key row of this warp inside the tile
    const Plan pl{mask, moffs, mrs, mcs, has_mask, coff, causal};

    stage_tile<T, DP>(ks, k + ((i64)kvh * lk + j0) * d, WMMA_KEYS, lk - j0, d);
    stage_tile<T, DP>(vs, v + ((i64)kvh * lk + j0) * dv, WMMA_KEYS, lk - j0, dv);
    zero_fill(dks, 2 * WMMA_KEYS * DP);  // dK and dV
    for (int g = 0; g < groups; ++g) {
        const int bh = kvh * groups + g;
        const i64 moff = has_mask ? moffs[bh] : 0;
        const i64 boff = has_bias ? boffs[bh] : 0;
        for (int i0 = 0; i0 < lq; i0 += WMMA_QB) {
            const int ni = min(WMMA_QB, lq - i0);
            if (causal && (i64)j0 > i0 + ni - 1 + coff) continue;  // uniform over the block
            __syncthreads();  // the previous tile's products are done with Q and dO
            stage_tile<T, DP>(qs, q + ((i64)bh * lq + i0) * d, WMMA_QB, ni, d);
            stage_tile<T, DP>(dos, dout + ((i64)bh * lq + i0) * dv, WMMA_QB, ni, dv);
            for (int r = tid; r < WMMA_QB; r += blockDim.x) {
                ls[r] = r < ni ? lse[(i64)bh * lq + i0 + r] : 0.0f;
                dl[r] = r < ni ? delta[(i64)bh * lq + i0 + r] : 0.0f;
            }
            __syncthreads();
            warp_mma<T, false>(st + wr * WMMA_QB, WMMA_QB, ks + wr * DP, DP, qs, DP, WMMA_QB, DP, false);
            __syncwarp();
            // P^T = exp(scale S^T + bias - lse) where kept, 0 elsewhere (padding included)
            for (int e = lane; e < 16 * WMMA_QB; e += 32) {
                const int r = wr + e / WMMA_QB, c = e % WMMA_QB;
                const i64 i = i0 + c, j = j0 + r;
                const float p = (c < ni && j < lk)
                    ? prob<float>(st[r * WMMA_QB + c], i, j, scale, ls[c], pl, moff, bias, boff, brs, bcs, has_bias)
                    : 0.0f;
                pf[r * WMMA_QB + c] = p;
                pt[r * WMMA_QB + c] = from_acc<T>(p);
            }
            __syncwarp();
            warp_mma<T, true>(dvs + wr * DP, DP, pt + wr * WMMA_QB, WMMA_QB, dos, DP, DP, WMMA_QB, true);
            warp_mma<T, false>(st + wr * WMMA_QB, WMMA_QB, vs + wr * DP, DP, dos, DP, WMMA_QB, DP, false);
            __syncwarp();
            for (int e = lane; e < 16 * WMMA_QB; e += 32) {
                const int r = wr + e / WMMA_QB, c = e % WMMA_QB;
                const float p = pf[r * WMMA_QB + c];
                pt[r * WMMA_QB + c] = from_acc<T>(p == 0.0f ? 0.0f : p * (st[r * WMMA_QB + c] - dl[c]));
            }
            __syncwarp();
            warp_mma<T, true>(dks + wr * DP, DP, pt + wr * WMMA_QB, WMMA_QB, qs, DP, DP, WMMA_QB, true);
        }
    }
    __syncthreads();
    for (int e = tid; e < WMMA_KEYS * DP; e += blockDim.x) {
        const int r = e / DP, c = e % DP;
        const int j = j0 + r;
        if (j >= lk) continue;
        if (c < d) dk[((i64)kvh * lk + j) * d + c] = from_acc<T>(dks[e] * scale);
        if (c < dv) dvv[((i64)kvh * lk + j) * dv + c] = from_acc<T>(dvs[e]);
    }
}

template <typename T, int DP>
__global__ void __launch_bounds__(128)
sdpa_dq_wmma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
             const T* __restrict__ dout, const float* __restrict__ lse,
             const float* __restrict__ delta, int nb, int lq, int lk, int d, int dv, int groups,
             float scale,
             const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
             const float* bias, const i64* boffs, i64 brs, i64 bcs, int has_bias,
             int causal, i64 coff, T* __restrict__ dq) {
    // shared: Q, dO (BQ x DP) T | K, V (BK x DP) T | S, dP (BQ x BK) float | dS (BQ x BK) T |
    //         dQ (BQ x DP) float | lse, D (BQ) float
    T* qs = reinterpret_cast<T*>(smem_raw);
    T* dos = qs + WMMA_BQ * DP;
    T* ks = dos + WMMA_BQ * DP;
    T* vs = ks + WMMA_BK * DP;
    float* ss = reinterpret_cast<float*>(vs + WMMA_BK * DP);
    float* dps = ss + WMMA_BQ * WMMA_BK;
    T* dss = reinterpret_cast<T*>(dps + WMMA_BQ * WMMA_BK);
    float* dqs = reinterpret_cast<float*>(dss + WMMA_BQ * WMMA_BK);
    float* ls = dqs + WMMA_BQ * DP;
    float* dl = ls + WMMA_BQ;

    const int nqt = (lq + WMMA_BQ - 1) / WMMA_BQ;
    const int bh = blockIdx.x / nqt;
    const int i0 = (blockIdx.x % nqt) * WMMA_BQ;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wr = warp * 16;
    const int kvh = bh / groups;
    const Plan pl{mask, moffs, mrs, mcs, has_mask, coff, causal};
    const i64 moff = has_mask ? moffs[bh] : 0;
    const i64 boff = has_bias ? boffs[bh] : 0;

    stage_tile<T, DP>(qs, q + ((i64)bh * lq + i0) * d, WMMA_BQ, lq - i0, d);
    stage_tile<T, DP>(dos, dout + ((i64)bh * lq + i0) * dv, WMMA_BQ, lq - i0, dv);
    zero_fill(dqs, WMMA_BQ * DP);
    for (int r = tid; r < WMMA_BQ; r += blockDim.x) {
        const bool in = i0 + r < lq;
        ls[r] = in ? lse[(i64)bh * lq + i0 + r] : 0.0f;
        dl[r] = in ? delta[(i64)bh * lq + i0 + r] : 0.0f;
    }
    const int last = min(i0 + WMMA_BQ, lq) - 1;
    for (int j0 = 0; j0 < lk; j0 += WMMA_BK) {
        if (causal && (i64)j0 > last + coff) break;
        __syncthreads();  // Q, dO, lse, D staged; the previous tile's products are done with K, V
        stage_tile<T, DP>(ks, k + ((i64)kvh * lk + j0) * d, WMMA_BK, lk - j0, d);
        stage_tile<T, DP>(vs, v + ((i64)kvh * lk + j0) * dv, WMMA_BK, lk - j0, dv);
        __syncthreads();
        warp_mma<T, false>(ss + wr * WMMA_BK, WMMA_BK, qs + wr * DP, DP, ks, DP, WMMA_BK, DP, false);
        warp_mma<T, false>(dps + wr * WMMA_BK, WMMA_BK, dos + wr * DP, DP, vs, DP, WMMA_BK, DP, false);
        __syncwarp();
        // dS = P (dP - D), P = exp(scale S + bias - lse) where kept, 0 elsewhere
        for (int e = lane; e < 16 * WMMA_BK; e += 32) {
            const int r = wr + e / WMMA_BK, c = e % WMMA_BK;
            const i64 i = i0 + r, j = j0 + c;
            const float p = (i < lq && j < lk)
                ? prob<float>(ss[r * WMMA_BK + c], i, j, scale, ls[r], pl, moff, bias, boff, brs, bcs, has_bias)
                : 0.0f;
            const float ds = p == 0.0f ? 0.0f : p * (dps[r * WMMA_BK + c] - dl[r]);
            dss[r * WMMA_BK + c] = from_acc<T>(ds);
        }
        __syncwarp();
        warp_mma<T, true>(dqs + wr * DP, DP, dss + wr * WMMA_BK, WMMA_BK, ks, DP, DP, WMMA_BK, true);
    }
    __syncthreads();
    for (int e = tid; e < WMMA_BQ * DP; e += blockDim.x) {
        const int r = e / DP, c = e % DP;
        const int i = i0 + r;
        if (i < lq && c < d) dq[((i64)bh * lq + i) * d + c] = from_acc<T>(dqs[e] * scale);
    }
}
