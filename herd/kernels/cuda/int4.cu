// int4 weights on a GPU, two ways. (1) int4_dequantize_*: the dequantise half of "dequantise, then cuBLAS",
// for batches with many rows per expert. (2) int4_gemv_*: dequantise-in-GEMM for a few rows (decode),
// reading each packed byte once and never writing the float weights: split-K partial sums in float, then a
// fixed-order reduction, so results do not depend on scheduling.
// Legend: R rows (at most GEMV_MAX_ROWS), Din inputs, Dout outputs, P = ceil(Din / 2) packed rows,
// G = ceil(Din / group) groups, S splits of the inputs.
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

constexpr int GEMV_MAX_ROWS = 8;

// Partial sums of x [R, Din] @ W [Din, Dout] over the inputs of split blockIdx.y, 4 output columns a thread.
// packed is read as 32-bit words [P, Dout / 4]: byte c of a word is column 4q + c (little-endian), so a warp
// reads 128 consecutive bytes a packed row. split_inputs is a multiple of group (and so even); the block's
// slice of x is staged in shared memory as floats [R, split_inputs].
template <typename T>
__device__ void int4_gemv_partial(const T* __restrict__ x, const unsigned int* __restrict__ packed,
                                  const unsigned short* __restrict__ scales, int rows, int d_in, int d_out, int group,
                                  int split_inputs, float* __restrict__ partials) {
    extern __shared__ float xs[];
    const int split = blockIdx.y;
    const int in0 = split * split_inputs;
    const int in1 = min(in0 + split_inputs, d_in);
    const int width = in1 - in0;
    for (int i = threadIdx.x; i < rows * width; i += blockDim.x) {
        const int r = i / width;
        xs[i] = load_float(x + static_cast<long long>(r) * d_in + in0 + (i - r * width));
    }
    __syncthreads();
    const int quads = d_out / 4;
    const int q = blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= quads) return;
    float acc[GEMV_MAX_ROWS][4];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;
    }
    float scale[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int scale_group = -1;
    for (int i = in0; i < in1; i += 2) {
        const int g = i / group;
        if (g != scale_group) {
#pragma unroll
            for (int c = 0; c < 4; ++c) scale[c] = bf16_to_float(scales[static_cast<long long>(g) * d_out + 4 * q + c]);
            scale_group = g;
        }
        const unsigned int word = packed[static_cast<long long>(i / 2) * quads + q];
        float low[4], high[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const unsigned int byte = (word >> (8 * c)) & 0xFFu;
            low[c] = static_cast<float>(static_cast<int>(byte & 0xFu) - 8) * scale[c];
            high[c] = static_cast<float>(static_cast<int>(byte >> 4) - 8) * scale[c];
        }
        const int k = i - in0;
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
            if (r < rows) {
                const float x0 = xs[r * width + k];
                const float x1 = (k + 1 < width) ? xs[r * width + k + 1] : 0.0f;  // an odd Din's padding input
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[r][c] += x0 * low[c] + x1 * high[c];
            }
        }
    }
    for (int r = 0; r < rows; ++r) {
        float* dst = partials + (static_cast<long long>(split) * rows + r) * d_out + 4 * q;
#pragma unroll
        for (int c = 0; c < 4; ++c) dst[c] = acc[r][c];
    }
}

// out [R, Dout] = the S partial sums [S, R, Dout], added in split order, rounded once to the output type.
template <typename T>
__device__ void int4_gemv_reduce(const float* __restrict__ partials, int splits, long long count, T* __restrict__ out) {
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < count; idx += stride) {
        float acc = 0.0f;
        for (int s = 0; s < splits; ++s) acc += partials[s * count + idx];
        store_float(out + idx, acc);
    }
}

extern "C" __global__ void int4_gemv_partial_f32(const float* x, const unsigned int* packed, const unsigned short* scales,
                                                 int rows, int d_in, int d_out, int group, int split_inputs,
                                                 float* partials) {
    int4_gemv_partial(x, packed, scales, rows, d_in, d_out, group, split_inputs, partials);
}

extern "C" __global__ void int4_gemv_partial_bf16(const unsigned short* x, const unsigned int* packed,
                                                  const unsigned short* scales, int rows, int d_in, int d_out,
                                                  int group, int split_inputs, float* partials) {
    int4_gemv_partial(x, packed, scales, rows, d_in, d_out, group, split_inputs, partials);
}

extern "C" __global__ void int4_gemv_reduce_f32(const float* partials, int splits, long long count, float* out) {
    int4_gemv_reduce(partials, splits, count, out);
}

extern "C" __global__ void int4_gemv_reduce_bf16(const float* partials, int splits, long long count,
                                                 unsigned short* out) {
    int4_gemv_reduce(partials, splits, count, out);
}
