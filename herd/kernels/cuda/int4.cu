// int4 weights to floats: the dequantise half of "dequantise, then cuBLAS" for int4 experts on a GPU.
// Legend: Din inputs, Dout outputs, P = ceil(Din / 2) packed rows, G = ceil(Din / group) groups.
// packed [P, Dout] uint8: input 2p in the low nibble, 2p + 1 in the high one, each stored as q + 8;
// scales [G, Dout] bfloat16 bits; out [Din, Dout] = (q) * scale of the input's group, rounded once to
// the output type (the same rounding as herd.kernels.int4.dequantize_int4 on the CPU).
// One thread per packed byte, consecutive threads on consecutive columns: reads and writes coalesce.
#include "common.cuh"

template <typename T>
__device__ void int4_dequantize(const unsigned char* __restrict__ packed, const unsigned short* __restrict__ scales,
                                int d_in, int d_out, int group, T* __restrict__ out) {
    const long long pairs = (static_cast<long long>(d_in) + 1) / 2;
    const long long total = pairs * d_out;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const long long p = idx / d_out;
        const int j = static_cast<int>(idx - p * d_out);
        const unsigned int byte = packed[idx];
        const long long low = 2 * p;
        const long long high = low + 1;
        const float low_scale = bf16_to_float(scales[(low / group) * d_out + j]);
        store_float(out + low * d_out + j, static_cast<float>(static_cast<int>(byte & 0xFu) - 8) * low_scale);
        if (high < d_in) {
            const float high_scale = bf16_to_float(scales[(high / group) * d_out + j]);
            store_float(out + high * d_out + j, static_cast<float>(static_cast<int>(byte >> 4) - 8) * high_scale);
        }
    }
}

extern "C" __global__ void int4_dequantize_f32(const unsigned char* packed, const unsigned short* scales, int d_in,
                                               int d_out, int group, float* out) {
    int4_dequantize(packed, scales, d_in, d_out, group, out);
}

extern "C" __global__ void int4_dequantize_bf16(const unsigned char* packed, const unsigned short* scales, int d_in,
                                                int d_out, int group, unsigned short* out) {
    int4_dequantize(packed, scales, d_in, d_out, group, out);
}
