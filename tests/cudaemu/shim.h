// Force-included (g++ -include) before an unmodified CUDA source: what nvcc/NVRTC provide, as plain C++.
// Each CUDA thread is a fiber; __shared__ is the block's OS thread's storage (thread_local); warp intrinsics
// and __syncthreads switch fibers in the runtime (runtime.cpp), which also checks their CUDA rules.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ thread_local
#define __constant__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

#define threadIdx (*cudaemu_thread_idx())
#define blockIdx (*cudaemu_block_idx())
#define blockDim (*cudaemu_block_dim())
#define gridDim (*cudaemu_grid_dim())

constexpr int warpSize = 32;

namespace cudaemu {
template <typename T>
inline unsigned long long to_bits(T value) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "a warp value fits 8 bytes");
    unsigned long long bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    return bits;
}

template <typename T>
inline T from_bits(unsigned long long bits) {
    T value;
    std::memcpy(&value, &bits, sizeof(T));
    return value;
}

template <typename To, typename From>
inline To bit_cast(From value) {
    static_assert(sizeof(To) == sizeof(From), "same width");
    To out;
    std::memcpy(&out, &value, sizeof(To));
    return out;
}
}  // namespace cudaemu

// ---- barriers and warp intrinsics (the call site is reported in the runtime's errors) ----
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    cudaemu_syncthreads(file, line);
}

inline void __syncwarp(unsigned int mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
    cudaemu_warp_op(CUDAEMU_SYNCWARP, mask, 0, 0, 32, file, line);
}

#define CUDAEMU_SHUFFLE(name, kind, arg_type)                                                               \
    template <typename T>                                                                                   \
    inline T name(unsigned int mask, T var, arg_type arg, int width = 32, const char* file = __builtin_FILE(), \
                  int line = __builtin_LINE()) {                                                            \
        return cudaemu::from_bits<T>(                                                                       \
            cudaemu_warp_op(kind, mask, cudaemu::to_bits(var), static_cast<int>(arg), width, file, line));  \
    }
CUDAEMU_SHUFFLE(__shfl_sync, CUDAEMU_SHFL_IDX, int)
CUDAEMU_SHUFFLE(__shfl_up_sync, CUDAEMU_SHFL_UP, unsigned int)
CUDAEMU_SHUFFLE(__shfl_down_sync, CUDAEMU_SHFL_DOWN, unsigned int)
CUDAEMU_SHUFFLE(__shfl_xor_sync, CUDAEMU_SHFL_XOR, int)
#undef CUDAEMU_SHUFFLE

inline unsigned int __ballot_sync(unsigned int mask, int predicate, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
    return static_cast<unsigned int>(cudaemu_warp_op(CUDAEMU_BALLOT, mask, predicate != 0, 0, 32, file, line));
}

inline int __any_sync(unsigned int mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    return static_cast<int>(cudaemu_warp_op(CUDAEMU_ANY, mask, predicate != 0, 0, 32, file, line));
}

inline int __all_sync(unsigned int mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    return static_cast<int>(cudaemu_warp_op(CUDAEMU_ALL, mask, predicate != 0, 0, 32, file, line));
}

inline unsigned int __activemask() { return cudaemu_active_mask(); }

// Blocks may run on different OS threads at once, so global atomics are real atomics.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- atomics ----
#define CUDAEMU_INTEGER_ATOMICS(T)                                                                         \
    inline T atomicAdd(T* address, T value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); } \
    inline T atomicSub(T* address, T value) { return __atomic_fetch_sub(address, value, __ATOMIC_RELAXED); } \
    inline T atomicAnd(T* address, T value) { return __atomic_fetch_and(address, value, __ATOMIC_RELAXED); } \
    inline T atomicOr(T* address, T value) { return __atomic_fetch_or(address, value, __ATOMIC_RELAXED); }   \
    inline T atomicXor(T* address, T value) { return __atomic_fetch_xor(address, value, __ATOMIC_RELAXED); } \
    inline T atomicExch(T* address, T value) { return __atomic_exchange_n(address, value, __ATOMIC_RELAXED); } \
    inline T atomicCAS(T* address, T compare, T value) {                                                    \
        __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);   \
        return compare;                                                                                     \
    }                                                                                                       \
    inline T atomicMax(T* address, T value) {                                                               \
        T old = __atomic_load_n(address, __ATOMIC_RELAXED);                                                 \
        while (old < value &&                                                                               \
               !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
        }                                                                                                   \
        return old;                                                                                         \
    }                                                                                                       \
    inline T atomicMin(T* address, T value) {                                                               \
        T old = __atomic_load_n(address, __ATOMIC_RELAXED);                                                 \
        while (value < old &&                                                                               \
               !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
        }                                                                                                   \
        return old;                                                                                         \
    }
CUDAEMU_INTEGER_ATOMICS(int)
CUDAEMU_INTEGER_ATOMICS(unsigned int)
CUDAEMU_INTEGER_ATOMICS(long long)
CUDAEMU_INTEGER_ATOMICS(unsigned long long)
#undef CUDAEMU_INTEGER_ATOMICS

#define CUDAEMU_FLOAT_ATOMIC_ADD(T, Bits)                                                                   \
    inline T atomicAdd(T* address, T value) {                                                               \
        Bits* bits = reinterpret_cast<Bits*>(address);                                                      \
        Bits old = __atomic_load_n(bits, __ATOMIC_RELAXED);                                                 \
        while (!__atomic_compare_exchange_n(bits, &old, cudaemu::bit_cast<Bits>(cudaemu::bit_cast<T>(old) + value), \
                                            true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {                    \
        }                                                                                                   \
        return cudaemu::bit_cast<T>(old);                                                                   \
    }
CUDAEMU_FLOAT_ATOMIC_ADD(float, unsigned int)
CUDAEMU_FLOAT_ATOMIC_ADD(double, unsigned long long)
#undef CUDAEMU_FLOAT_ATOMIC_ADD

// ---- bit reinterpretation and integer intrinsics ----
inline float __int_as_float(int v) { return cudaemu::bit_cast<float>(v); }
inline int __float_as_int(float v) { return cudaemu::bit_cast<int>(v); }
inline float __uint_as_float(unsigned int v) { return cudaemu::bit_cast<float>(v); }
inline unsigned int __float_as_uint(float v) { return cudaemu::bit_cast<unsigned int>(v); }
inline double __longlong_as_double(long long v) { return cudaemu::bit_cast<double>(v); }
inline long long __double_as_longlong(double v) { return cudaemu::bit_cast<long long>(v); }

inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(v)); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline unsigned int __brev(unsigned int v) {
    unsigned int out = 0;
    for (int i = 0; i < 32; ++i) out |= ((v >> i) & 1u) << (31 - i);
    return out;
}

template <typename T>
inline T __ldg(const T* p) { return *p; }

// ---- math: the fast intrinsics are the precise functions here (a GPU's differ by a few ulp) ----
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }

// CUDA's min/max: overloaded for every arithmetic pair; the floating ones ignore a NaN as fminf/fmaxf do.
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    if constexpr (std::is_floating_point<C>::value) return std::fmin(static_cast<C>(a), static_cast<C>(b));
    else return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}

template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    if constexpr (std::is_floating_point<C>::value) return std::fmax(static_cast<C>(a), static_cast<C>(b));
    else return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
