// Definitions shared by the .cu sources of the cupy backend. _module.source() pastes this file
// in place of its #include line, so the text compiled (and hashed by CuPy's kernel cache) is
// always complete; the host emulation (tests/host_cuda) includes it as a header.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef long long i64;

// The dynamic shared memory of every kernel, declared once (one alignment for the whole module:
// wmma tiles need 32-byte alignment, the 16-byte staging copies 16).
extern __shared__ __align__(128) unsigned char smem_raw[];

// -- element types: storage T, accumulation Acc (float for float16/bfloat16/float32, double) --

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

template <typename Acc> __device__ __forceinline__ Acc pos_inf();
template <> __device__ __forceinline__ float pos_inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double pos_inf<double>() { return __longlong_as_double(0x7ff0000000000000LL); }

// -- per-thread vectors -------------------------------------------------------------------------
//
// A thread's row of up to N values (a query or key row, an output or gradient accumulator).
// Arrays indexed at run time live in local memory, so a TVec is either
//   registers (SH = false): every loop over it is unrolled to the compile-time bound N
//     (tv_for), so each index is a constant; chosen where the instantiation's vectors fit, or
//   shared memory (SH = true): element c of thread t at base[c * blockDim.x + t] (consecutive
//     threads read consecutive words: no bank conflicts); the launcher sizes the block so the
//     vectors of all its threads fit.
// Which one an instantiation uses is a template argument the launcher picks, and ptxas reports
// no local memory for any instantiation (docs/gpu.rst).

template <typename Acc, int N, bool SH>
struct TVec {
    static constexpr bool REG = true;
    static constexpr int SIZE = N;
    Acc v[N];
    __device__ __forceinline__ explicit TVec(Acc*) {}
    __device__ __forceinline__ Acc& operator[](int c) { return v[c]; }
};

template <typename Acc, int N>
struct TVec<Acc, N, true> {
    static constexpr bool REG = false;
    static constexpr int SIZE = N;
    Acc* p;
    int stride;
    __device__ __forceinline__ explicit TVec(Acc* base) : p(base + threadIdx.x), stride((int)blockDim.x) {}
    __device__ __forceinline__ Acc& operator[](int c) { return p[(i64)c * stride]; }
};

// f(c) for c in [0, n), n <= V::SIZE: unrolled to the compile-time bound for register vectors.
template <typename V, typename F>
__device__ __forceinline__ void tv_for(int n, F&& f) {
    if constexpr (V::REG) {
#pragma unroll
        for (int c = 0; c < V::SIZE; ++c)
            if (c < n) f(c);
    } else {
        for (int c = 0; c < n; ++c) f(c);
    }
}
