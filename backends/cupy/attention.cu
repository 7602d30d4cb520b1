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
//   sdpa_fwd<T, Acc, DMAX, SH>  CUDA cores: one block per (b, query tile of blockDim.x rows), one
//                               thread per query row; K/V tiles in shared memory; online softmax,
//                               each logit computed once (kept in a shared tile for the exp pass).
//   sdpa_fwd_wmma<T, DP>        float16/bfloat16 on tensor cores (wmma 16x16x16, float32
//                               accumulation): 4 warps x 16 query rows; S = Q K^T and O += P V by
//                               wmma, the output accumulator kept in fragments across key tiles.
//   sdpa_delta<T, Acc>          D = rowsum(dO * O) - dlse.
//   sdpa_dkdv_wmma<T, DP>       float16/bfloat16 backward on tensor cores: 4 warps x 16 key rows,
//                               S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q by wmma
//                               (P and dS rounded to T for the products, float32 accumulation;
//                               dK, dV in fragments).
//   sdpa_dq_wmma<T, DP>         4 warps x 16 query rows: S = Q K^T, dP = dO V^T, dQ += dS K.
//   sdpa_dkdv<T, Acc, DMAX, SH> one block per (kv head, key tile), one thread per key row, looping
//                               over the query heads of its group and the query tiles.
//   sdpa_dq<T, Acc, DMAX, SH>   one block per (b, query tile), one thread per query row.
//   sdpa_dbias_reduce<Acc>      the bias gradient: the dQ kernels emit each block's dS tile summed
//                               over what the bias broadcasts inside the block (rows, columns);
//                               this sums those partials over the query heads (and query tiles)
//                               that read each bias element, a deterministic tree per element.
// The row vectors of the CUDA-core kernels are TVecs (_common.cuh): registers or shared memory,
// never local memory. The backward passes own their outputs (no atomics): results are bitwise
// deterministic. Validated without a GPU only: compiled with NVRTC (sm_80, sm_90) and run as host
// C++ through tests/host_cuda/shim.h (tests/test_cupy_on_host.py).

#include "_common.cuh"
#include <mma.h>

struct Plan {
    const unsigned char* mask; const i64* moffs; i64 mrs, mcs; int has_mask;
    i64 coff; int causal;
};

__device__ __forceinline__ bool keep(const Plan& pl, i64 moff, i64 i, i64 j) {
    if (pl.causal && j > i + pl.coff) return false;
    if (pl.has_mask && !pl.mask[moff + i * pl.mrs + j * pl.mcs]) return false;
    return true;
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

// ---------------------------------------------------------------------------------------------
// bias gradient: partials emitted by the dQ kernels, then reduced
// ---------------------------------------------------------------------------------------------
//
// A dQ block (query head bh, query tile qt of `rows` rows starting at i0) writes its dS, summed
// over what the bias broadcasts inside the block, into the partials part, laid out (bh - bh0, PR,
// PC): PR = lq rows where the bias has rows (db_rows), else one row per query tile (nqt);
// PC = lk columns where the bias has columns (db_cols), else 1. Keys skipped by causality keep
// the zeros part was allocated with.

// One key tile of dS: ds(t, r) at tile[t * rs + r * cs] for the block's rows t < rows (a power of
// two; rows past lq hold 0) and keys r < nk. Called by the whole block.
template <typename Acc>
__device__ void ds_tile_out(Acc* tile, int rs, int cs, int rows, int nk, int j0, Acc* rowsum,
                            Acc* part, int db_rows, int db_cols, i64 bhl, int qt, int nqt, int i0,
                            int lq, int lk) {
    const int tid = threadIdx.x, nt = blockDim.x;
    __syncthreads();  // the tile is complete
    if (db_cols && db_rows) {
        for (int e = tid; e < rows * nk; e += nt) {  // consecutive threads, consecutive keys
            const int t = e / nk, r = e % nk;
            if (i0 + t < lq) part[(bhl * lq + i0 + t) * lk + j0 + r] = tile[t * rs + r * cs];
        }
    } else if (db_cols) {  // the bias broadcasts rows: a tree over the tile's rows
        for (int s = rows / 2; s > 0; s /= 2) {
            for (int e = tid; e < s * nk; e += nt) {
                const int t = e / nk, r = e % nk;
                tile[t * rs + r * cs] += tile[(t + s) * rs + r * cs];
            }
            __syncthreads();
        }
        for (int r = tid; r < nk; r += nt) part[(bhl * nqt + qt) * lk + j0 + r] = tile[r * cs];
    } else {  // the bias broadcasts columns: each row's sum, in key order across the tiles
        for (int t = tid; t < rows; t += nt) {
            Acc s = Acc(0);
            for (int r = 0; r < nk; ++r) s += tile[t * rs + r * cs];
            rowsum[t] += s;
        }
    }
    __syncthreads();  // the tile may be overwritten
}

// After the last key tile, where the bias broadcasts columns: the row sums (a tree over the rows
// where it broadcasts rows too). Called by the whole block.
template <typename Acc>
__device__ void ds_rows_out(Acc* rowsum, int rows, Acc* part, int db_rows, i64 bhl, int qt,
                            int nqt, int i0, int lq) {
    const int tid = threadIdx.x, nt = blockDim.x;
    __syncthreads();
    if (db_rows) {
        for (int t = tid; t < rows; t += nt)
            if (i0 + t < lq) part[bhl * lq + i0 + t] = rowsum[t];
        return;
    }
    for (int s = rows / 2; s > 0; s /= 2) {
        for (int t = tid; t < s; t += nt) rowsum[t] += rowsum[t + s];
        __syncthreads();
    }
    if (tid == 0) part[bhl * nqt + qt] = rowsum[0];
}

// dbias[e] (the bias as given, C-contiguous (heads, nrows, ncols), e < size) = the sum of the
// partials that read element e: every query head of e's bias head (hptr/hbh: CSR over the bias
// heads of the query heads of this launch's chunk, chunk-local) and, where the bias broadcasts
// rows, every query tile. `lanes` threads per element (a power of two dividing blockDim.x) each
// sum a fixed strided subset, then a tree in shared memory: the same order on every run.
// accumulate: add to dbias (a later chunk of query heads) instead of overwriting it.
template <typename Acc>
__global__ void sdpa_dbias_reduce(const Acc* __restrict__ part, i64 pr_n, i64 pc_n, int db_rows,
                                  int db_cols, const int* __restrict__ hptr,
                                  const int* __restrict__ hbh, i64 nrows, i64 ncols, i64 size,
                                  int lanes, int accumulate, Acc* __restrict__ dbias) {
    Acc* sh = reinterpret_cast<Acc*>(smem_raw);
    const int tid = threadIdx.x;
    const int lane = tid % lanes;
    const i64 e = (i64)blockIdx.x * (blockDim.x / lanes) + tid / lanes;
    Acc s = Acc(0);
    if (e < size) {
        const i64 head = e / (nrows * ncols), r = (e / ncols) % nrows, c = e % ncols;
        const int h0 = hptr[head];
        const i64 per = db_rows ? 1 : pr_n;  // partial rows per query head
        const i64 n = (i64)(hptr[head + 1] - h0) * per;
        for (i64 u = lane; u < n; u += lanes) {
            const i64 bhl = hbh[h0 + u / per];
            const i64 pr = db_rows ? r : u % per;
            s += part[(bhl * pr_n + pr) * pc_n + (db_cols ? c : 0)];
        }
    }
    sh[tid] = s;
    for (int w = lanes / 2; w > 0; w /= 2) {
        __syncthreads();
        if (lane < w) sh[tid] += sh[tid + w];
    }
    if (lane == 0 && e < size) dbias[e] = (accumulate ? dbias[e] : Acc(0)) + sh[tid];
}

// ---------------------------------------------------------------------------------------------
// forward, CUDA cores
// ---------------------------------------------------------------------------------------------

template <typename T, typename Acc, int DMAX, bool SH>
__global__ void sdpa_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         int nb, int lq, int lk, int d, int dv, int groups, int bk, Acc scale,
                         const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
                         const Acc* bias, const i64* boffs, i64 brs, i64 bcs, int has_bias,
                         int causal, i64 coff, T* __restrict__ out, Acc* __restrict__ lse) {
    // shared: K (bk x d) | V (bk x dv) | the logits of the tile (bk x bq, s[r * bq + t]) |
    //         [SH: the q rows (d x bq) | the output accumulators (dv x bq)]
    using V = TVec<Acc, DMAX, SH>;
    const int bq = blockDim.x;
    Acc* ks = reinterpret_cast<Acc*>(smem_raw);
    Acc* vs = ks + (i64)bk * d;
    Acc* st = vs + (i64)bk * dv;
    Acc* vec = st + (i64)bk * bq;
    V qi(vec), acc(vec + (i64)d * bq);
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
    const Acc zero = Acc(0), ninf = -pos_inf<Acc>();
    Acc* srow = st + tid;

    tv_for<V>(d, [&](int c) { qi[c] = valid ? to_acc(q[((i64)bh * lq + i) * d + c], Acc()) : zero; });
    tv_for<V>(dv, [&](int c) { acc[c] = zero; });
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
        for (int r = 0; r < nk; ++r) {  // the logits, once, and their maximum
            const int j = j0 + r;
            Acc x = ninf;
            if (keep(pl, moff, i, j)) {
                const Acc* kr = ks + r * d;
                Acc dot = zero;
                tv_for<V>(d, [&](int c) { dot += qi[c] * kr[c]; });
                x = dot * scale;
                if (has_bias) x += bias[boff + i * brs + j * bcs];
            }
            srow[r * bq] = x;
            mt = x > mt ? x : mt;
        }
        const Acc m_new = m > mt ? m : mt;
        const Acc m_use = m_new == ninf ? zero : m_new;  // a row masked so far: exp(-inf - 0) = 0
        const Acc corr = acc_exp(m - m_use);
        l *= corr;
        tv_for<V>(dv, [&](int c) { acc[c] *= corr; });
        for (int r = 0; r < nk; ++r) {
            const Acc x = srow[r * bq];
            if (x == ninf) continue;
            const Acc p = acc_exp(x - m_use);
            l += p;
            const Acc* vr = vs + r * dv;
            tv_for<V>(dv, [&](int c) { acc[c] += p * vr[c]; });
        }
        m = m_new;
    }
    if (!valid) return;
    if (l == zero) {
        tv_for<V>(dv, [&](int c) { out[((i64)bh * lq + i) * dv + c] = from_acc<T>(zero); });
        lse[(i64)bh * lq + i] = -ninf;
    } else {
        const Acc inv = Acc(1) / l;
        tv_for<V>(dv, [&](int c) { out[((i64)bh * lq + i) * dv + c] = from_acc<T>(acc[c] * inv); });
        lse[(i64)bh * lq + i] = m + acc_log(l);
    }
}

// ---------------------------------------------------------------------------------------------
// tensor cores (float16 / bfloat16 storage, float32 accumulation)
// ---------------------------------------------------------------------------------------------
//
// Shared tiles have padded pitches: rows of T elements DP + 8 (16 bytes more), rows of floats
// n + 4, so that consecutive rows start in different banks; every wmma pointer stays 32-byte
// aligned and every leading dimension a multiple of 16 bytes.

namespace wm = nvcuda::wmma;
typedef wm::fragment<wm::accumulator, 16, 16, 16, float> AccFrag;

#define WMMA_BQ 64
#define WMMA_BK 32
#define WMMA_KEYS 64  // key rows per block of sdpa_dkdv_wmma (16 per warp)
#define WMMA_QB 32    // query rows per staged tile of sdpa_dkdv_wmma
// The wmma kernels declare two blocks per SM (at most 255 registers each, no spills: see
// docs/gpu.rst); without the minimum ptxas capped some at 128 registers and spilled.

__device__ __forceinline__ void copy16(void* dst, const void* src) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}
__device__ __forceinline__ void zero16(void* dst) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
}

// dst (rows x DP, pitch DP + 8) = rows [0, rows) of the row-major (n_valid x width) matrix at
// src, zero padded (rows at or past n_valid, columns at or past width); 16-byte copies where src
// is 16-byte aligned and width a multiple of 8 elements. Called by the whole block.
template <typename T, int DP>
__device__ __forceinline__ void stage_tile(T* dst, const T* src, int rows, int n_valid, int width) {
    constexpr int TP = DP + 8, VEC = 16 / sizeof(T), CH = DP / VEC;
    if (width % VEC == 0 && reinterpret_cast<unsigned long long>(src) % 16 == 0) {
        for (int e = threadIdx.x; e < rows * CH; e += blockDim.x) {
            const int r = e / CH, c = (e % CH) * VEC;
            if (r < n_valid && c < width) copy16(dst + r * TP + c, src + (i64)r * width + c);
            else zero16(dst + r * TP + c);
        }
        return;
    }
    const T zero = from_acc<T>(0.0f);
    for (int e = threadIdx.x; e < rows * DP; e += blockDim.x) {
        const int r = e / DP, c = e % DP;
        dst[r * TP + c] = (r < n_valid && c < width) ? src[(i64)r * width + c] : zero;
    }
}

// C (16 x 16, float, row-major, ldc) = A (16 x kdim, row-major, lda) B, B (kdim x 16) given as
// its transpose (16 x kdim row-major, ldb). kdim a multiple of 16.
template <typename T>
__device__ __forceinline__ void warp_abt(float* c, int ldc, const T* a, int lda, const T* b,
                                         int ldb, int kdim) {
    AccFrag cf;
    wm::fill_fragment(cf, 0.0f);
#pragma unroll 2
    for (int kk = 0; kk < kdim / 16; ++kk) {
        wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> af;
        wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::col_major> bf;
        wm::load_matrix_sync(af, a + kk * 16, lda);
        wm::load_matrix_sync(bf, b + kk * 16, ldb);
        wm::mma_sync(cf, af, bf, cf);
    }
    wm::store_matrix_sync(c, cf, ldc, wm::mem_row_major);
}

// acc[n] (16 x 16 column block n of a 16 x 16*NF result) += A (16 x kdim, row-major, lda) B,
// B (kdim x 16*NF) row-major (ldb).
template <typename T, int NF>
__device__ __forceinline__ void warp_ab_acc(AccFrag* acc, const T* a, int lda, const T* b, int ldb,
                                            int kdim) {
#pragma unroll 1
    for (int kk = 0; kk < kdim / 16; ++kk) {
        wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> af;
        wm::load_matrix_sync(af, a + kk * 16, lda);
#pragma unroll
        for (int n = 0; n < NF; ++n) {
            wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::row_major> bf;
            wm::load_matrix_sync(bf, b + kk * 16 * ldb + n * 16, ldb);
            wm::mma_sync(acc[n], af, bf, acc[n]);
        }
    }
}

// The tile row (0..15) of each element of an accumulator fragment: fragment layouts are
// unspecified, but the same for every fragment of one type, so loading a tile whose elements are
// their own row index tells each lane which row each of its elements belongs to. `scratch`
// (16 x 16 floats) is written by the block, which must then pass a __syncthreads before this.
__device__ __forceinline__ void fill_row_index(float* scratch) {
    for (int e = threadIdx.x; e < 256; e += blockDim.x) scratch[e] = (float)(e / 16);
}

template <typename T, int DP>
__global__ void __launch_bounds__(128, 2)
sdpa_fwd_wmma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
              int nb, int lq, int lk, int d, int dv, int groups, float scale,
              const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
              const float* bias, const i64* boffs, i64 brs, i64 bcs, int has_bias,
              int causal, i64 coff, T* __restrict__ out, float* __restrict__ lse) {
    constexpr int TP = DP + 8, SP = WMMA_BK + 4, PP = WMMA_BK + 8, OP = DP + 4, NF = DP / 16;
    constexpr int NE = AccFrag::num_elements;
    // shared: Q (BQ x TP) T | K, V (BK x TP) T | S (BQ x SP) float | P (BQ x PP) T |
    //         per-row scalars (BQ) float; after the key loop, O (BQ x OP) float over Q, K, V
    T* qs = reinterpret_cast<T*>(smem_raw);
    T* ks = qs + WMMA_BQ * TP;
    T* vs = ks + WMMA_BK * TP;
    float* ss = reinterpret_cast<float*>(vs + WMMA_BK * TP);
    T* ps = reinterpret_cast<T*>(ss + WMMA_BQ * SP);
    float* rowv = reinterpret_cast<float*>(ps + WMMA_BQ * PP);
    float* os = reinterpret_cast<float*>(smem_raw);

    const int nqt = (lq + WMMA_BQ - 1) / WMMA_BQ;
    const int bh = blockIdx.x / nqt;
    const int i0 = (blockIdx.x % nqt) * WMMA_BQ;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int kvh = bh / groups;
    const Plan pl{mask, moffs, mrs, mcs, has_mask, coff, causal};
    const i64 moff = has_mask ? moffs[bh] : 0;
    const i64 boff = has_bias ? boffs[bh] : 0;
    const float ninf = -pos_inf<float>();
    const int wr = warp * 16;  // first row of this warp inside the tile
    // The softmax step: lane (lr, half) takes row wr + lr and key columns half*16 .. half*16+15,
    // in an order rotated by (lr >> 3) + 2*half so that the 32 lanes read 32 banks of S at once.
    const int lr = lane & 15, half = lane >> 4, row = wr + lr;
    const int rot = ((lr >> 3) & 1) + 2 * half;
    const i64 i = (i64)i0 + row;

    stage_tile<T, DP>(qs, q + ((i64)bh * lq + i0) * d, WMMA_BQ, lq - i0, d);
    fill_row_index(ss);
    __syncthreads();
    int frow[NE];  // the row (of the block's tile) of each element of this lane's O fragments
    {
        AccFrag rf;
        wm::load_matrix_sync(rf, ss, 16, wm::mem_row_major);
#pragma unroll
        for (int e = 0; e < NE; ++e) frow[e] = wr + (int)rf.x[e];
    }
    AccFrag of[NF];
#pragma unroll
    for (int n = 0; n < NF; ++n) wm::fill_fragment(of[n], 0.0f);
    float m = ninf, l = 0.0f;  // this lane's row: running max and sum (the same in both halves)
    const int last = min(i0 + WMMA_BQ, lq) - 1;

    for (int j0 = 0; j0 < lk; j0 += WMMA_BK) {
        if (causal && (i64)j0 > last + coff) break;
        __syncthreads();  // the previous tile's products are done with K, V (and S)
        stage_tile<T, DP>(ks, k + ((i64)kvh * lk + j0) * d, WMMA_BK, lk - j0, d);
        stage_tile<T, DP>(vs, v + ((i64)kvh * lk + j0) * dv, WMMA_BK, lk - j0, dv);
        __syncthreads();
        for (int n = 0; n < WMMA_BK / 16; ++n)  // S_w = Q_w K^T
            warp_abt<T>(ss + wr * SP + n * 16, SP, qs + wr * TP, TP, ks + n * 16 * TP, TP, DP);
        __syncwarp();
        // scale, bias and mask this lane's logits in place (only this lane reads them again);
        // loops kept rolled here and below: unrolled, their index arithmetic alone spilled
        float mt = ninf;
#pragma unroll 1
        for (int s = 0; s < 16; ++s) {
            const int c = half * 16 + ((s + rot) & 15);
            const i64 j = (i64)j0 + c;
            float xv = ninf;
            if (i < lq && j < lk && keep(pl, moff, i, j)) {
                xv = ss[row * SP + c] * scale;
                if (has_bias) xv += bias[boff + i * brs + j * bcs];
            }
            ss[row * SP + c] = xv;
            mt = fmaxf(mt, xv);
        }
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 16));
        const float m_new = fmaxf(m, mt);
        const float m_use = m_new == ninf ? 0.0f : m_new;  // a row masked so far: p = 0, not NaN
        const float corr = expf(m - m_use);
        float tot = 0.0f;
#pragma unroll 1
        for (int s = 0; s < 16; ++s) {
            const int c = half * 16 + ((s + rot) & 15);
            const T p = from_acc<T>(expf(ss[row * SP + c] - m_use));
            ps[row * PP + c] = p;
            tot += to_acc(p, 0.0f);  // l sums the probabilities actually multiplied with V
        }
        tot += __shfl_xor_sync(0xffffffffu, tot, 16);  // a + b == b + a: both halves agree
        l = l * corr + tot;
        m = m_new;
        if (half == 0) rowv[row] = corr;
        __syncwarp();
        // O_w = diag(corr) O_w + P_w V, O_w in fragments throughout
#pragma unroll
        for (int n = 0; n < NF; ++n)
#pragma unroll
            for (int e = 0; e < NE; ++e) of[n].x[e] *= rowv[frow[e]];
        warp_ab_acc<T, NF>(of, ps + wr * PP, PP, vs, TP, WMMA_BK);
    }
    __syncthreads();  // every warp is done with Q, K, V: O goes over them
#pragma unroll
    for (int n = 0; n < NF; ++n)
        wm::store_matrix_sync(os + wr * OP + n * 16, of[n], OP, wm::mem_row_major);
    if (half == 0) {
        rowv[row] = l;
        if (i < lq) lse[(i64)bh * lq + i] = l == 0.0f ? -ninf : m + logf(l);
    }
    __syncthreads();
    for (int e = tid; e < WMMA_BQ * dv; e += blockDim.x) {
        const int r = e / dv, c = e % dv;
        const int ii = i0 + r;
        if (ii >= lq) continue;
        const float lr_ = rowv[r];
        out[((i64)bh * lq + ii) * dv + c] = from_acc<T>(lr_ == 0.0f ? 0.0f : os[r * OP + c] / lr_);
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

template <typename T, typename Acc, int DMAX, bool SH>
__global__ void sdpa_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const T* __restrict__ dout, const Acc* __restrict__ lse,
                          const Acc* __restrict__ delta, int nb, int lq, int lk, int d, int dv,
                          int groups, int bi, Acc scale,
                          const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
                          const Acc* bias, const i64* boffs, i64 brs, i64 bcs, int has_bias,
                          int causal, i64 coff, T* __restrict__ dk, T* __restrict__ dvv) {
    // blockDim.x key rows per block; query tiles of bi rows staged in shared memory:
    // Q (bi x d) | dO (bi x dv) | lse (bi) | D (bi) | [SH: k, v, dk, dv rows ((2d + 2dv) x bj)]
    using V = TVec<Acc, DMAX, SH>;
    const int bj = blockDim.x;
    Acc* qs = reinterpret_cast<Acc*>(smem_raw);
    Acc* dos = qs + (i64)bi * d;
    Acc* ls = dos + (i64)bi * dv;
    Acc* dl = ls + bi;
    Acc* vec = dl + bi;
    V kj(vec), vj(vec + (i64)d * bj), dkj(vec + (i64)(d + dv) * bj), dvj(vec + (i64)(2 * d + dv) * bj);
    const int nkt = (lk + bj - 1) / bj;
    const int kvh = blockIdx.x / nkt;
    const int j0 = (blockIdx.x % nkt) * bj;
    const int tid = threadIdx.x;
    const int j = j0 + tid;
    const bool valid = j < lk;
    const Plan pl{mask, moffs, mrs, mcs, has_mask, coff, causal};
    const Acc zero = Acc(0);
    tv_for<V>(d, [&](int c) {
        kj[c] = valid ? to_acc(k[((i64)kvh * lk + j) * d + c], Acc()) : zero;
        dkj[c] = zero;
    });
    tv_for<V>(dv, [&](int c) {
        vj[c] = valid ? to_acc(v[((i64)kvh * lk + j) * dv + c], Acc()) : zero;
        dvj[c] = zero;
    });
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
                const Acc* qr = qs + r * d;
                const Acc* dor = dos + r * dv;
                Acc x = zero;
                tv_for<V>(d, [&](int c) { x += qr[c] * kj[c]; });
                const Acc p = prob<Acc>(x, i0 + r, j, scale, ls[r], pl, moff, bias, boff, brs, bcs, has_bias);
                if (p == zero) continue;
                Acc dp = zero;
                tv_for<V>(dv, [&](int c) { dvj[c] += p * dor[c]; dp += dor[c] * vj[c]; });
                const Acc ds = p * (dp - dl[r]);
                tv_for<V>(d, [&](int c) { dkj[c] += ds * qr[c]; });
            }
        }
    }
    if (!valid) return;
    tv_for<V>(d, [&](int c) { dk[((i64)kvh * lk + j) * d + c] = from_acc<T>(dkj[c] * scale); });
    tv_for<V>(dv, [&](int c) { dvv[((i64)kvh * lk + j) * dv + c] = from_acc<T>(dvj[c]); });
}

template <typename T, typename Acc, int DMAX, bool SH>
__global__ void sdpa_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ dout, const Acc* __restrict__ lse,
                        const Acc* __restrict__ delta, int nb, int lq, int lk, int d, int dv,
                        int groups, int bk, Acc scale,
                        const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
                        const Acc* bias, const i64* boffs, i64 brs, i64 bcs, int has_bias,
                        int causal, i64 coff, int bh0, Acc* __restrict__ dpart, int db_on,
                        int db_rows, int db_cols, T* __restrict__ dq) {
    // blocks for query heads bh0, bh0 + 1, ...; shared: K (bk x d) | V (bk x dv) |
    // dS of the tile (bk x (bq + 1), ds[r * (bq + 1) + t]) | row sums of dS (bq) |
    // [SH: q, dO, dq rows ((2d + dv) x bq)]
    using V = TVec<Acc, DMAX, SH>;
    const int bq = blockDim.x, dsp = bq + 1;
    Acc* ks = reinterpret_cast<Acc*>(smem_raw);
    Acc* vs = ks + (i64)bk * d;
    Acc* dst = vs + (i64)bk * dv;
    Acc* rowsum = dst + (i64)bk * dsp;
    Acc* vec = rowsum + bq;
    V qi(vec), doi(vec + (i64)d * bq), dqi(vec + (i64)(d + dv) * bq);
    const int nqt = (lq + bq - 1) / bq;
    const int bhl = blockIdx.x / nqt, qt = blockIdx.x % nqt;
    const int bh = bh0 + bhl;
    const int i0 = qt * bq;
    const int tid = threadIdx.x;
    const int i = i0 + tid;
    const int kvh = bh / groups;
    const bool valid = i < lq;
    const Plan pl{mask, moffs, mrs, mcs, has_mask, coff, causal};
    const i64 moff = has_mask ? moffs[bh] : 0;
    const i64 boff = has_bias ? boffs[bh] : 0;
    const Acc zero = Acc(0);
    tv_for<V>(d, [&](int c) {
        qi[c] = valid ? to_acc(q[((i64)bh * lq + i) * d + c], Acc()) : zero;
        dqi[c] = zero;
    });
    tv_for<V>(dv, [&](int c) { doi[c] = valid ? to_acc(dout[((i64)bh * lq + i) * dv + c], Acc()) : zero; });
    rowsum[tid] = zero;
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
        for (int r = 0; r < nk; ++r) {
            Acc ds = zero;
            if (valid) {
                const Acc* kr = ks + r * d;
                const Acc* vr = vs + r * dv;
                Acc x = zero;
                tv_for<V>(d, [&](int c) { x += qi[c] * kr[c]; });
                const Acc p = prob<Acc>(x, i, j0 + r, scale, lse_i, pl, moff, bias, boff, brs, bcs, has_bias);
                if (p != zero) {
                    Acc dp = zero;
                    tv_for<V>(dv, [&](int c) { dp += doi[c] * vr[c]; });
                    ds = p * (dp - dl);
                    tv_for<V>(d, [&](int c) { dqi[c] += ds * kr[c]; });
                }
            }
            if (db_on) dst[r * dsp + tid] = ds;
        }
        if (db_on)
            ds_tile_out<Acc>(dst, 1, dsp, bq, nk, j0, rowsum, dpart, db_rows, db_cols, bhl, qt, nqt, i0, lq, lk);
    }
    if (db_on && !db_cols) ds_rows_out<Acc>(rowsum, bq, dpart, db_rows, bhl, qt, nqt, i0, lq);
    if (!valid) return;
    tv_for<V>(d, [&](int c) { dq[((i64)bh * lq + i) * d + c] = from_acc<T>(dqi[c] * scale); });
}

// ---------------------------------------------------------------------------------------------
// backward, tensor cores (float16 / bfloat16 storage, float32 accumulation)
// ---------------------------------------------------------------------------------------------

template <typename T, int DP>
__global__ void __launch_bounds__(128, 2)
sdpa_dkdv_wmma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const T* __restrict__ dout, const float* __restrict__ lse,
               const float* __restrict__ delta, int nb, int lq, int lk, int d, int dv, int groups,
               float scale,
               const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
               const float* bias, const i64* boffs, i64 brs, i64 bcs, int has_bias,
               int causal, i64 coff, T* __restrict__ dk, T* __restrict__ dvv) {
    constexpr int TP = DP + 8, SP = WMMA_QB + 4, PP = WMMA_QB + 8, OP = DP + 4, NF = DP / 16;
    // shared: K, V (KEYS x TP) T | Q, dO (QB x TP) T | S^T then dP^T (KEYS x SP) float |
    //         P^T (KEYS x SP) float | P^T then dS^T (KEYS x PP) T | lse, D (QB) float;
    //         at the end dK, then dV (KEYS x OP) float over K, V, Q, dO
    T* ks = reinterpret_cast<T*>(smem_raw);
    T* vs = ks + WMMA_KEYS * TP;
    T* qs = vs + WMMA_KEYS * TP;
    T* dos = qs + WMMA_QB * TP;
    float* st = reinterpret_cast<float*>(dos + WMMA_QB * TP);
    float* pf = st + WMMA_KEYS * SP;
    T* pt = reinterpret_cast<T*>(pf + WMMA_KEYS * SP);
    float* ls = reinterpret_cast<float*>(pt + WMMA_KEYS * PP);
    float* dl = ls + WMMA_QB;
    float* os = reinterpret_cast<float*>(smem_raw);

    const int nkt = (lk + WMMA_KEYS - 1) / WMMA_KEYS;
    const int kvh = blockIdx.x / nkt;
    const int j0 = (blockIdx.x % nkt) * WMMA_KEYS;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wr = warp * 16;  // first key row of this warp inside the tile
    const Plan pl{mask, moffs, mrs, mcs, has_mask, coff, causal};

    stage_tile<T, DP>(ks, k + ((i64)kvh * lk + j0) * d, WMMA_KEYS, lk - j0, d);
    stage_tile<T, DP>(vs, v + ((i64)kvh * lk + j0) * dv, WMMA_KEYS, lk - j0, dv);
    AccFrag dkf[NF], dvf[NF];  // this warp's 16 key rows of dK and dV, in fragments throughout
#pragma unroll
    for (int n = 0; n < NF; ++n) {
        wm::fill_fragment(dkf[n], 0.0f);
        wm::fill_fragment(dvf[n], 0.0f);
    }
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
            for (int n = 0; n < WMMA_QB / 16; ++n)  // S^T_w = K_w Q^T
                warp_abt<T>(st + wr * SP + n * 16, SP, ks + wr * TP, TP, qs + n * 16 * TP, TP, DP);
            __syncwarp();
            // P^T = exp(scale S^T + bias - lse) where kept, 0 elsewhere (padding included)
#pragma unroll 1
            for (int e = lane; e < 16 * WMMA_QB; e += 32) {
                const int r = wr + e / WMMA_QB, c = e % WMMA_QB;
                const i64 i = i0 + c, j = j0 + r;
                const float p = (c < ni && j < lk)
                    ? prob<float>(st[r * SP + c], i, j, scale, ls[c], pl, moff, bias, boff, brs, bcs, has_bias)
                    : 0.0f;
                pf[r * SP + c] = p;
                pt[r * PP + c] = from_acc<T>(p);
            }
            __syncwarp();
            warp_ab_acc<T, NF>(dvf, pt + wr * PP, PP, dos, TP, WMMA_QB);  // dV_w += P^T_w dO
            for (int n = 0; n < WMMA_QB / 16; ++n)  // dP^T_w = V_w dO^T
                warp_abt<T>(st + wr * SP + n * 16, SP, vs + wr * TP, TP, dos + n * 16 * TP, TP, DP);
            __syncwarp();
#pragma unroll 1
            for (int e = lane; e < 16 * WMMA_QB; e += 32) {
                const int r = wr + e / WMMA_QB, c = e % WMMA_QB;
                const float p = pf[r * SP + c];
                pt[r * PP + c] = from_acc<T>(p == 0.0f ? 0.0f : p * (st[r * SP + c] - dl[c]));
            }
            __syncwarp();
            warp_ab_acc<T, NF>(dkf, pt + wr * PP, PP, qs, TP, WMMA_QB);  // dK_w += dS^T_w Q
        }
    }
    __syncthreads();  // every warp is done with K, V, Q, dO
#pragma unroll
    for (int n = 0; n < NF; ++n)
        wm::store_matrix_sync(os + wr * OP + n * 16, dkf[n], OP, wm::mem_row_major);
    __syncthreads();
    for (int e = tid; e < WMMA_KEYS * d; e += blockDim.x) {
        const int r = e / d, c = e % d;
        if (j0 + r < lk) dk[((i64)kvh * lk + j0 + r) * d + c] = from_acc<T>(os[r * OP + c] * scale);
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < NF; ++n)
        wm::store_matrix_sync(os + wr * OP + n * 16, dvf[n], OP, wm::mem_row_major);
    __syncthreads();
    for (int e = tid; e < WMMA_KEYS * dv; e += blockDim.x) {
        const int r = e / dv, c = e % dv;
        if (j0 + r < lk) dvv[((i64)kvh * lk + j0 + r) * dv + c] = from_acc<T>(os[r * OP + c]);
    }
}

template <typename T, int DP>
__global__ void __launch_bounds__(128, 2)
sdpa_dq_wmma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
             const T* __restrict__ dout, const float* __restrict__ lse,
             const float* __restrict__ delta, int nb, int lq, int lk, int d, int dv, int groups,
             float scale,
             const unsigned char* mask, const i64* moffs, i64 mrs, i64 mcs, int has_mask,
             const float* bias, const i64* boffs, i64 brs, i64 bcs, int has_bias,
             int causal, i64 coff, int bh0, float* __restrict__ dpart, int db_on, int db_rows,
             int db_cols, T* __restrict__ dq) {
    constexpr int TP = DP + 8, SP = WMMA_BK + 4, PP = WMMA_BK + 8, OP = DP + 4, NF = DP / 16;
    // blocks for query heads bh0, bh0 + 1, ...; shared: Q, dO (BQ x TP) T | K, V (BK x TP) T |
    // S, then dS (BQ x SP) float | dP (BQ x SP) float | dS (BQ x PP) T | lse, D, row sums of dS
    // (BQ) float; after the key loop dQ (BQ x OP) float over Q, dO, K, V
    T* qs = reinterpret_cast<T*>(smem_raw);
    T* dos = qs + WMMA_BQ * TP;
    T* ks = dos + WMMA_BQ * TP;
    T* vs = ks + WMMA_BK * TP;
    float* ss = reinterpret_cast<float*>(vs + WMMA_BK * TP);
    float* dps = ss + WMMA_BQ * SP;
    T* dss = reinterpret_cast<T*>(dps + WMMA_BQ * SP);
    float* ls = reinterpret_cast<float*>(dss + WMMA_BQ * PP);
    float* dl = ls + WMMA_BQ;
    float* rowsum = dl + WMMA_BQ;
    float* os = reinterpret_cast<float*>(smem_raw);

    const int nqt = (lq + WMMA_BQ - 1) / WMMA_BQ;
    const int bhl = blockIdx.x / nqt, qt = blockIdx.x % nqt;
    const int bh = bh0 + bhl;
    const int i0 = qt * WMMA_BQ;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wr = warp * 16;
    const int kvh = bh / groups;
    const Plan pl{mask, moffs, mrs, mcs, has_mask, coff, causal};
    const i64 moff = has_mask ? moffs[bh] : 0;
    const i64 boff = has_bias ? boffs[bh] : 0;

    stage_tile<T, DP>(qs, q + ((i64)bh * lq + i0) * d, WMMA_BQ, lq - i0, d);
    stage_tile<T, DP>(dos, dout + ((i64)bh * lq + i0) * dv, WMMA_BQ, lq - i0, dv);
    for (int r = tid; r < WMMA_BQ; r += blockDim.x) {
        const bool in = i0 + r < lq;
        ls[r] = in ? lse[(i64)bh * lq + i0 + r] : 0.0f;
        dl[r] = in ? delta[(i64)bh * lq + i0 + r] : 0.0f;
        rowsum[r] = 0.0f;
    }
    AccFrag dqf[NF];  // this warp's 16 rows of dQ, in fragments throughout
#pragma unroll
    for (int n = 0; n < NF; ++n) wm::fill_fragment(dqf[n], 0.0f);
    const int last = min(i0 + WMMA_BQ, lq) - 1;
    for (int j0 = 0; j0 < lk; j0 += WMMA_BK) {
        if (causal && (i64)j0 > last + coff) break;
        const int nk = min(WMMA_BK, lk - j0);
        __syncthreads();  // Q, dO, lse, D staged; the previous tile's products are done with K, V
        stage_tile<T, DP>(ks, k + ((i64)kvh * lk + j0) * d, WMMA_BK, lk - j0, d);
        stage_tile<T, DP>(vs, v + ((i64)kvh * lk + j0) * dv, WMMA_BK, lk - j0, dv);
        __syncthreads();
        for (int n = 0; n < WMMA_BK / 16; ++n) {
            warp_abt<T>(ss + wr * SP + n * 16, SP, qs + wr * TP, TP, ks + n * 16 * TP, TP, DP);
            warp_abt<T>(dps + wr * SP + n * 16, SP, dos + wr * TP, TP, vs + n * 16 * TP, TP, DP);
        }
        __syncwarp();
        // dS = P (dP - D), P = exp(scale S + bias - lse) where kept, 0 elsewhere; dS in float
        // (for the bias gradient) over S, and rounded to T for the product
#pragma unroll 1
        for (int e = lane; e < 16 * WMMA_BK; e += 32) {
            const int r = wr + e / WMMA_BK, c = e % WMMA_BK;
            const i64 i = i0 + r, j = j0 + c;
            const float p = (i < lq && j < lk)
                ? prob<float>(ss[r * SP + c], i, j, scale, ls[r], pl, moff, bias, boff, brs, bcs, has_bias)
                : 0.0f;
            const float ds = p == 0.0f ? 0.0f : p * (dps[r * SP + c] - dl[r]);
            dss[r * PP + c] = from_acc<T>(ds);
            ss[r * SP + c] = ds;
        }
        __syncwarp();
        warp_ab_acc<T, NF>(dqf, dss + wr * PP, PP, ks, TP, WMMA_BK);  // dQ_w += dS_w K
        if (db_on)
            ds_tile_out<float>(ss, SP, 1, WMMA_BQ, nk, j0, rowsum, dpart, db_rows, db_cols, bhl, qt, nqt, i0, lq, lk);
    }
    if (db_on && !db_cols) ds_rows_out<float>(rowsum, WMMA_BQ, dpart, db_rows, bhl, qt, nqt, i0, lq);
    __syncthreads();  // every warp is done with Q, dO, K, V
#pragma unroll
    for (int n = 0; n < NF; ++n)
        wm::store_matrix_sync(os + wr * OP + n * 16, dqf[n], OP, wm::mem_row_major);
    __syncthreads();
    for (int e = tid; e < WMMA_BQ * d; e += blockDim.x) {
        const int r = e / d, c = e % d;
        if (i0 + r < lq) dq[((i64)bh * lq + i0 + r) * d + c] = from_acc<T>(os[r * OP + c] * scale);
    }
}
