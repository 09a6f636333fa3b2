// Shared by every MoE kernel: bfloat16 <-> float without cuda_bf16.h, so the sources compile the same
// with nvcc and with NVRTC (CuPy RawModule) and need no CUDA headers at run time.
// A bfloat16 travels as its 16 raw bits (unsigned short); arithmetic is always done in float.
#pragma once

__device__ __forceinline__ float bf16_to_float(unsigned short bits) {
    return __uint_as_float(static_cast<unsigned int>(bits) << 16);
}

// Round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays a (quiet) NaN.
__device__ __forceinline__ unsigned short float_to_bf16(float value) {
    unsigned int u = __float_as_uint(value);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return static_cast<unsigned short>((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<unsigned short>(u >> 16);
}

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const unsigned short* p) { return bf16_to_float(*p); }
__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_float(unsigned short* p, float v) { *p = float_to_bf16(v); }

constexpr unsigned int FULL_MASK = 0xffffffffu;

// NVRTC has no <math.h> macros (INFINITY, isnan): spell them out.
__device__ __forceinline__ float positive_infinity() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ bool is_nan(float v) { return v != v; }
