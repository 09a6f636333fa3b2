"""Small CUDA kernels that exercise the emulator: the correct ones, and mutants it must catch."""

BLOCK_SUM = r"""
// out[b] = the sum of the x[i] that block b's threads stride over: warp shuffles, then a shared-memory barrier.
extern "C" __global__ void block_sum(const float* __restrict__ x, int n, float* __restrict__ out) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    float v = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += x[i];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0f;
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
        if (lane == 0) out[blockIdx.x] = v;
    }
}

// Every thread writes its coordinates: out[thread's linear id in the grid] = packed (block, thread) indices.
extern "C" __global__ void coordinates(long long* out) {
    const long long block = blockIdx.x + gridDim.x * (blockIdx.y + static_cast<long long>(gridDim.y) * blockIdx.z);
    const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const long long id = block * (blockDim.x * blockDim.y * blockDim.z) + thread;
    out[id] = (((((static_cast<long long>(blockIdx.z) * 256 + blockIdx.y) * 256 + blockIdx.x) * 256 + threadIdx.z)
                * 256 + threadIdx.y) * 256) + threadIdx.x;
}

// Ballots, shfl_up and a broadcast, all from one warp; atomics across blocks.
extern "C" __global__ void warp_mix(const int* flags, unsigned int* ballots, int* prefix, int* broadcast, int* total) {
    const int lane = threadIdx.x & 31;
    const int base = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned int ballot = __ballot_sync(0xffffffffu, flags[base] != 0);
    if (lane == 0) ballots[base / 32] = ballot;
    int running = flags[base];
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_up_sync(0xffffffffu, running, offset);
        if (lane >= offset) running += other;
    }
    prefix[base] = running;
    broadcast[base] = __shfl_sync(0xffffffffu, base, 7);
    atomicAdd(total, flags[base]);
}

// No barrier between the write and the neighbour's read: the result shows the order fibers ran in.
extern "C" __global__ void neighbour_unsynced(int* out) {
    extern __shared__ int slots[];
    slots[threadIdx.x] = threadIdx.x;
    out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}
"""

MUTANTS = r"""
// __syncthreads reached by half the block only: the other half exits.
extern "C" __global__ void half_barrier(int* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1;
}

// The two halves wait at different barriers.
extern "C" __global__ void split_barrier(int* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// Half a warp shuffles while the other half waits at a barrier: nobody can go on.
extern "C" __global__ void shuffle_vs_barrier(int* out) {
    int v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
    else __syncthreads();
    out[threadIdx.x] = v;
}

// A full-warp shuffle: wrong in a block that is not a multiple of 32 threads.
extern "C" __global__ void full_mask_shuffle(int* out) {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Lanes 16..31 exit before the full-warp shuffle.
extern "C" __global__ void shuffle_after_exit(int* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}
"""

SANITIZED = r"""
// Reads one float past the launch's dynamic shared memory when overrun != 0.
extern "C" __global__ void shared_overrun(float* out, int overrun, int shared_floats) {
    extern __shared__ float dynamic[];
    dynamic[threadIdx.x] = 1.0f;
    __syncthreads();
    const int i = overrun ? shared_floats : 0;
    out[threadIdx.x] = dynamic[i];
}

// Thread 0 writes shared memory that thread 1 reads: with the barrier in between or (barrier == 0) without.
extern "C" __global__ void publish(int* out, int barrier) {
    __shared__ int value;
    if (threadIdx.x == 0) value = 42;
    if (barrier) __syncthreads();
    if (threadIdx.x == 1) out[blockIdx.x] = value;
    if (!barrier) __syncthreads();
}

// Shifts an int by `shift` bits: undefined behaviour from 32 on.
extern "C" __global__ void shift_left(int* out, int shift) {
    out[threadIdx.x] = 1 << shift;
}
"""

DIVERGENT = r"""
// Half a warp shuffles, the other half ballots, both naming the whole warp.
extern "C" __global__ void shuffle_vs_ballot(int* out) {
    int v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
    else v = static_cast<int>(__ballot_sync(0xffffffffu, 1));
    out[threadIdx.x] = v;
}

// Lanes 0..15 read lane 20, which is not in their mask.
extern "C" __global__ void read_outside_mask(int* out) {
    out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 20);
}

// Each lane names only the other lanes.
extern "C" __global__ void mask_without_caller(int* out) {
    out[threadIdx.x] = static_cast<int>(__ballot_sync(~(1u << threadIdx.x), 1));
}
"""
