// Combine: out[t] = sum over the k choices of the expert output row that holds (t, choice),
// accumulated in float. A gather, not a scatter: no atomics, the same result every run.
// Legend: T tokens, k choices, H hidden, R = T*k rows.
#include "common.cuh"

template <typename T>
__device__ void combine(const T* __restrict__ out_rows, const int* __restrict__ source_row, int tokens, int k,
                        int hidden, T* __restrict__ out) {
    const int t = blockIdx.x;
    if (t >= tokens) return;
    for (int h = blockIdx.y * blockDim.x + threadIdx.x; h < hidden; h += gridDim.y * blockDim.x) {
        float acc = 0.0f;
        for (int choice = 0; choice < k; ++choice) {
            const long long row = source_row[static_cast<long long>(t) * k + choice];
            acc += load_float(out_rows + row * hidden + h);
        }
        store_float(out + static_cast<long long>(t) * hidden + h, acc);
    }
}

extern "C" __global__ void moe_combine_f32(const float* out_rows, const int* source_row, int tokens, int k,
                                           int hidden, float* out) {
    combine(out_rows, source_row, tokens, k, hidden, out);
}

extern "C" __global__ void moe_combine_bf16(const unsigned short* out_rows, const int* source_row, int tokens, int k,
                                            int hidden, unsigned short* out) {
    combine(out_rows, source_row, tokens, k, hidden, out);
}
