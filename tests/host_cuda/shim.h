// Host C++ stand-in for the CUDA features the cupy backend's .cu sources use, so that their
// kernels run on a CPU (tests/test_cupy_on_host.py):
// one std::thread per CUDA thread, blocks one after another, barriers for __syncthreads and
// __syncwarp, and __shfl_xor_sync through a per-warp exchange slot between two warp barriers.
// A wmma fragment is held whole by lane 0 of its warp, which alone performs the collective loads,
// products and stores (the other lanes' fragments hold zeros and their calls do nothing).
// A store_matrix_sync becomes visible only when lane 0 next reaches a barrier (or when the block
// ends): on a GPU each lane writes its own part of the tile, so reading it back before a
// __syncwarp is a race. Here lane 0's own reads of the tile before that barrier always see the
// old contents (the NaN that fills shared memory at the start of each block); the other lanes'
// reads may or may not, as they run ahead or behind.
#pragma once
#include <algorithm>
#include <bit>
#include <string>
#include <utility>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <type_traits>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(...)
#define __restrict__
#define __align__(n)
#define __shared__

struct dim3h { unsigned x = 0, y = 0, z = 0; };
inline thread_local dim3h blockIdx, threadIdx, blockDim;
inline std::barrier<>* g_block_barrier = nullptr;
inline std::vector<std::barrier<>*> g_warp_barriers;
inline std::vector<uint64_t> g_shuffle_slots;  // one per thread of the block

// wmma stores per thread of the block (only lane 0 makes any) not yet visible: (address, value)
inline std::vector<std::vector<std::pair<float*, float>>> g_pending_stores;
inline void publish_stores(unsigned t) {
    for (auto& [p, v] : g_pending_stores[t]) *p = v;
    g_pending_stores[t].clear();
}
inline void publish_stores() { publish_stores(threadIdx.x); }

inline void __syncthreads() { publish_stores(); g_block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    publish_stores();
    g_warp_barriers[threadIdx.x / 32]->arrive_and_wait();
}

// Every lane of the warp must call it (full mask), as the kernels here do.
template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int lane_mask) {
    static_assert(sizeof(V) <= sizeof(uint64_t));
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(V));
    g_shuffle_slots[threadIdx.x] = bits;
    g_warp_barriers[threadIdx.x / 32]->arrive_and_wait();
    const unsigned src = (threadIdx.x & ~31u) | ((threadIdx.x & 31u) ^ (unsigned)lane_mask);
    bits = g_shuffle_slots[src];
    g_warp_barriers[threadIdx.x / 32]->arrive_and_wait();  // nobody overwrites a slot still read
    V out;
    std::memcpy(&out, &bits, sizeof(V));
    return out;
}

using std::min;
using std::max;
inline float expf(float x) { return std::exp(x); }
inline float logf(float x) { return std::log(x); }
using std::exp;
using std::log;
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline double __longlong_as_double(long long x) { double f; std::memcpy(&f, &x, 8); return f; }

struct __half { _Float16 v; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }  // round to nearest even

struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = (uint32_t)h.bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline float host_float(__half h) { return __half2float(h); }
inline float host_float(__nv_bfloat16 h) { return __bfloat162float(h); }

namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
// Element (r, c) of the tile is x[r * 16 + c] (on a GPU the mapping is unspecified, so kernels
// may only apply the same operation to every element, or recover the mapping from a loaded tile).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int num_elements = 256;
    float x[256] = {};
};
template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
    if (threadIdx.x % 32) return;
    for (auto& e : f.x) e = v;
}
template <int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<matrix_a, M, N, K, T, L>& f, const T* p, unsigned ld) {
    if (threadIdx.x % 32) return;
    for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
        f.x[r * 16 + c] = std::is_same<L, row_major>::value ? host_float(p[r * ld + c]) : host_float(p[c * ld + r]);
}
template <int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<matrix_b, M, N, K, T, L>& f, const T* p, unsigned ld) {
    if (threadIdx.x % 32) return;
    for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
        f.x[r * 16 + c] = std::is_same<L, row_major>::value ? host_float(p[r * ld + c]) : host_float(p[c * ld + r]);
}
template <int M, int N, int K, typename L>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float, L>& f, const float* p, unsigned ld, layout_t lay) {
    if (threadIdx.x % 32) return;
    for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
        f.x[r * 16 + c] = lay == mem_row_major ? p[r * ld + c] : p[c * ld + r];
}
template <int M, int N, int K, typename L>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float, L>& f, unsigned ld, layout_t lay) {
    if (threadIdx.x % 32) return;
    for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
        g_pending_stores[threadIdx.x].emplace_back(lay == mem_row_major ? p + r * ld + c : p + c * ld + r, f.x[r * 16 + c]);
}
template <int M, int N, int K, typename T, typename LA, typename LB, typename LC>
inline void mma_sync(fragment<accumulator, M, N, K, float, LC>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float, LC>& c) {
    if (threadIdx.x % 32) return;
    float out[256];
    for (int r = 0; r < 16; ++r) for (int col = 0; col < 16; ++col) {
        float s = c.x[r * 16 + col];
        for (int kk = 0; kk < 16; ++kk) s += a.x[r * 16 + kk] * b.x[kk * 16 + col];
        out[r * 16 + col] = s;
    }
    std::memcpy(d.x, out, sizeof out);
}
}}  // namespace nvcuda::wmma

// Shared memory: one arena reused by the blocks in turn; bytes past the launch's request keep a
// canary, checked after every block.
constexpr size_t ARENA = 256 * 1024, GUARD = 4096;
alignas(128) inline unsigned char smem_raw[ARENA + GUARD];

inline int launch(int grid, int block, size_t shared, const std::function<void()>& body) {
    if (shared + GUARD > sizeof smem_raw || block <= 0) return -1;
    for (int b = 0; b < grid; ++b) {
        std::memset(smem_raw, 0xff, shared);  // NaN everywhere: reads of unstaged data show up
        std::memset(smem_raw + shared, 0xa5, GUARD);
        std::barrier<> bar(block);
        std::vector<std::barrier<>*> warps;
        for (int w = 0; w * 32 < block; ++w) warps.push_back(new std::barrier<>(std::min(32, block - w * 32)));
        g_block_barrier = &bar;
        g_warp_barriers = warps;
        g_shuffle_slots.assign(block, 0);
        g_pending_stores.assign(block, {});
        std::vector<std::thread> ts;
        for (int t = 0; t < block; ++t)
            ts.emplace_back([&, t] {
                blockIdx.x = b; threadIdx.x = t; blockDim.x = block;
                body();
            });
        for (auto& t : ts) t.join();
        for (int t = 0; t < block; ++t) publish_stores(t);  // e.g. a tile stored to global memory
        for (auto* w : warps) delete w;
        for (size_t i = 0; i < GUARD; ++i)
            if (smem_raw[shared + i] != 0xa5) return -2;  // wrote past its shared memory
    }
    return 0;
}

// Launching a kernel from Python: its arguments arrive as 64-bit slots (pointers as addresses,
// integers as int64, floating-point numbers as the bits of a double) and are converted to the
// parameter types of the instantiation.
template <typename X> X from_slot(uint64_t s) {
    if constexpr (std::is_pointer_v<X>) return reinterpret_cast<X>(static_cast<uintptr_t>(s));
    else if constexpr (std::is_floating_point_v<X>) return static_cast<X>(std::bit_cast<double>(s));
    else return static_cast<X>(static_cast<int64_t>(s));
}

template <typename... A, size_t... I>
void invoke(void (*f)(A...), const uint64_t* s, std::index_sequence<I...>) { f(from_slot<A>(s[I])...); }

template <typename... A>
int run(void (*f)(A...), int nargs, const uint64_t* slots, int grid, int block, size_t shared) {
    if (nargs != (int)sizeof...(A)) return -5;  // the launcher passed a different argument list
    return launch(grid, block, shared, [&] { invoke(f, slots, std::index_sequence_for<A...>{}); });
}
