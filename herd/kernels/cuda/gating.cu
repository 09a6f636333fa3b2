// Fused gating: top-k of the raw router logits, then the sigmoid of each chosen logit (Llama 4).
// Legend: T tokens, E experts (<= 1024), k choices per token.
// One warp per token: each lane owns experts lane, lane+32, ...; k rounds of a warp-wide arg-max pick
// the largest remaining logit (lowest expert id on ties; NaN counts as largest, above +inf, as in torch.topk).
#include "common.cuh"

// A logit as an unsigned key in torch.topk's order: larger is chosen first, NaN above +inf, -0 equal to +0.
__device__ __forceinline__ unsigned int topk_key(float value) {
    if (is_nan(value)) return 0xffffffffu;
    const unsigned int bits = __float_as_uint(value == 0.0f ? 0.0f : value);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

template <typename T>
__device__ void route_topk_sigmoid(const T* __restrict__ logits, int tokens, int experts, int k,
                                   int* __restrict__ ids, T* __restrict__ scores) {
    const int lane = threadIdx.x & 31;
    const int token = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (token >= tokens) return;
    const T* row = logits + static_cast<long long>(token) * experts;
    unsigned int taken = 0;  // bit s: expert lane + 32*s already chosen
    for (int choice = 0; choice < k; ++choice) {
        unsigned int best_key = 0;
        float best_value = -positive_infinity();
        int best_id = experts;  // sentinel: nothing seen
        for (int e = lane, slot = 0; e < experts; e += 32, ++slot) {
            if ((taken >> slot) & 1u) continue;
            const float value = load_float(row + e);
            const unsigned int key = topk_key(value);
            if (best_id == experts || key > best_key) {  // ascending e: ties keep the lower id
                best_key = key;
                best_value = value;
                best_id = e;
            }
        }
        for (int offset = 16; offset > 0; offset >>= 1) {
            const unsigned int other_key = __shfl_down_sync(FULL_MASK, best_key, offset);
            const float other_value = __shfl_down_sync(FULL_MASK, best_value, offset);
            const int other_id = __shfl_down_sync(FULL_MASK, best_id, offset);
            const bool better = other_id != experts &&
                (best_id == experts || other_key > best_key || (other_key == best_key && other_id < best_id));
            if (better) {
                best_key = other_key;
                best_value = other_value;
                best_id = other_id;
            }
        }
        best_id = __shfl_sync(FULL_MASK, best_id, 0);
        best_value = __shfl_sync(FULL_MASK, best_value, 0);
        if ((best_id & 31) == lane) taken |= 1u << (best_id >> 5);
        if (lane == 0) {
            const long long out = static_cast<long long>(token) * k + choice;
            ids[out] = best_id;
            store_float(scores + out, 1.0f / (1.0f + expf(-best_value)));
        }
    }
}

extern "C" __global__ void route_topk_sigmoid_f32(const float* logits, int tokens, int experts, int k,
                                                  int* ids, float* scores) {
    route_topk_sigmoid(logits, tokens, experts, k, ids, scores);
}

extern "C" __global__ void route_topk_sigmoid_bf16(const unsigned short* logits, int tokens, int experts, int k,
                                                   int* ids, unsigned short* scores) {
    route_topk_sigmoid(logits, tokens, experts, k, ids, scores);
}
