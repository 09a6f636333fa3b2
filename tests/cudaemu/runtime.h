// The interface between the emulated kernels (shim.h, the generated trampolines) and the fiber runtime
// (runtime.cpp). Everything a kernel asks of "the GPU" goes through these few C functions.
#pragma once

#include <cstring>

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}  // NOLINT: implicit, as CUDA's
};

// The largest dynamic shared memory a launch may ask for without an opt-in (CUDA's default limit).
constexpr unsigned int CUDAEMU_SHARED_LIMIT = 48 * 1024;

enum cudaemu_warp_kind {
    CUDAEMU_SHFL_IDX,
    CUDAEMU_SHFL_UP,
    CUDAEMU_SHFL_DOWN,
    CUDAEMU_SHFL_XOR,
    CUDAEMU_BALLOT,
    CUDAEMU_ANY,
    CUDAEMU_ALL,
    CUDAEMU_SYNCWARP,
};

enum cudaemu_order { CUDAEMU_FORWARD, CUDAEMU_REVERSE, CUDAEMU_RANDOM };

extern "C" {
// Per fiber (threadIdx) and per block (the rest): valid only inside a kernel.
const uint3* cudaemu_thread_idx(void);
const uint3* cudaemu_block_idx(void);
const dim3* cudaemu_block_dim(void);
const dim3* cudaemu_grid_dim(void);

void cudaemu_syncthreads(const char* file, int line);
// Every lane in `mask` must make the same call (kind and mask); returns this lane's result.
unsigned long long cudaemu_warp_op(int kind, unsigned int mask, unsigned long long value, int arg, int width,
                                   const char* file, int line);
unsigned int cudaemu_active_mask(void);

// A kernel's entry, generated per kernel: unpacks the 8-byte argument slots and calls it.
typedef void (*cudaemu_entry)(const unsigned char* args);

// Runs the whole grid; 0 on success, else 1 with a message in `error`.
int cudaemu_launch(cudaemu_entry entry, const unsigned char* args, const unsigned int* grid, const unsigned int* block,
                   unsigned int shared_bytes, int order, unsigned long long seed, char* error,
                   unsigned long error_len);

// Defined by the trampoline TU: the calling OS thread's `extern __shared__` arrays (each CUDAEMU_SHARED_LIMIT bytes).
int cudaemu_dynamic_shared(void** regions, int capacity);
}

// Argument slot `i` of a launch, as the kernel's parameter type T.
template <typename T>
inline T cudaemu_arg(const unsigned char* args, int i) {
    static_assert(sizeof(T) <= 8, "a kernel argument fits an 8-byte slot");
    T value;
    std::memcpy(&value, args + 8 * i, sizeof(T));
    return value;
}
