// Permute: group the R = T*k (token, choice) rows by expert, in a given group order, stably.
// Legend: T tokens, k choices, E experts = G groups, H hidden, R = T*k rows.
//   1. moe_histogram      rows per group (atomics; counts only, so order does not matter)
//   2. moe_offsets        exclusive prefix sum of the counts -> offsets [G+1]
//   3. moe_positions      one block per group walks the rows in order and numbers its own with a
//                         block-wide scan, so rows keep token order inside a group (deterministic)
//   4. moe_gather_scale   rows[p] = x[token of p] * score of p, in float, stored in x's dtype
#include "common.cuh"

extern "C" __global__ void moe_histogram(const int* __restrict__ ids, int rows, const long long* __restrict__ rank,
                                         int* __restrict__ counts) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) atomicAdd(counts + rank[ids[r]], 1);
}

// One block of 1024 threads; groups <= 1024.
extern "C" __global__ void moe_offsets(const int* __restrict__ counts, int groups, long long* __restrict__ offsets) {
    __shared__ long long scan[1024];
    const int g = threadIdx.x;
    scan[g] = g < groups ? counts[g] : 0;
    __syncthreads();
    for (int stride = 1; stride < 1024; stride <<= 1) {  // Hillis-Steele inclusive scan
        const long long add = g >= stride ? scan[g - stride] : 0;
        __syncthreads();
        scan[g] += add;
        __syncthreads();
    }
    if (g == 0) offsets[0] = 0;
    if (g < groups) offsets[g + 1] = scan[g];
}

// Block g numbers the rows whose expert falls in group g. blockDim.x must be a multiple of 32, <= 1024.
extern "C" __global__ void moe_positions(const int* __restrict__ ids, int rows, const long long* __restrict__ rank,
                                         const long long* __restrict__ offsets, int* __restrict__ row_source,
                                         int* __restrict__ source_row) {
    __shared__ int warp_counts[32];
    __shared__ int warp_starts[32];
    const int group = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    long long next = offsets[group];
    for (int base = 0; base < rows; base += blockDim.x) {
        const int r = base + threadIdx.x;
        const bool mine = r < rows && rank[ids[r]] == group;
        const unsigned int ballot = __ballot_sync(FULL_MASK, mine);
        if (lane == 0) warp_counts[warp] = __popc(ballot);
        __syncthreads();
        if (threadIdx.x == 0) {
            int running = 0;
            for (int w = 0; w < warps; ++w) {
                warp_starts[w] = running;
                running += warp_counts[w];
            }
            warp_counts[0] = running;  // block total, read below after the barrier
        }
        __syncthreads();
        if (mine) {
            const long long p = next + warp_starts[warp] + __popc(ballot & ((1u << lane) - 1u));
            row_source[p] = r;
            source_row[r] = static_cast<int>(p);
        }
        next += warp_counts[0];
        __syncthreads();
    }
}

template <typename T>
__device__ void gather_scale(const T* __restrict__ x, const T* __restrict__ scores, const int* __restrict__ row_source,
                             int rows, int k, int hidden, T* __restrict__ out) {
    const int p = blockIdx.x;
    if (p >= rows) return;
    const int source = row_source[p];
    const float score = load_float(scores + source);
    const T* in = x + static_cast<long long>(source / k) * hidden;
    T* dst = out + static_cast<long long>(p) * hidden;
    for (int h = blockIdx.y * blockDim.x + threadIdx.x; h < hidden; h += gridDim.y * blockDim.x) {
        store_float(dst + h, load_float(in + h) * score);
    }
}

extern "C" __global__ void moe_gather_scale_f32(const float* x, const float* scores, const int* row_source, int rows,
                                                int k, int hidden, float* out) {
    gather_scale(x, scores, row_source, rows, k, hidden, out);
}

extern "C" __global__ void moe_gather_scale_bf16(const unsigned short* x, const unsigned short* scores,
                                                 const int* row_source, int rows, int k, int hidden,
                                                 unsigned short* out) {
    gather_scale(x, scores, row_source, rows, k, hidden, out);
}
