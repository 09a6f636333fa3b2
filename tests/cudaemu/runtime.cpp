// The fiber runtime of the CUDA emulator.
//
// Invariant: a block runs on exactly one OS thread (a worker), and only one of its CUDA threads (a fiber) runs at
// a time; a fiber gives way only inside __syncthreads, a warp intrinsic, or at its exit, and the worker's
// scheduler then resumes the runnable fibers in the launch's order. So every CUDA rule about barriers and warps
// is checked here with plain bookkeeping, and a rule broken stops the launch with a message, never a hang.
//
// This file is never built with a sanitizer's instrumentation (its own bookkeeping would read as races between
// fibers); with CUDAEMU_ASAN / CUDAEMU_TSAN it only tells the sanitizer about fiber switches and barriers.
#include "runtime.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(CUDAEMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(CUDAEMU_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

namespace {

#if defined(CUDAEMU_ASAN) || defined(CUDAEMU_TSAN)
constexpr size_t STACK_BYTES = 256 * 1024;  // instrumented frames are larger
#else
constexpr size_t STACK_BYTES = 64 * 1024;
#endif
constexpr size_t GUARD_BYTES = 4096;
constexpr int MAX_SHARED_REGIONS = 16;

enum class State { runnable, barrier, warp, exited };

struct Block;

struct Fiber {
    ucontext_t context;
    char* stack = nullptr;  // lowest usable address (the guard page is below it)
    uint3 index{};
    unsigned int lane = 0, warp = 0;
    State state = State::runnable;
    // while at a barrier or in a warp operation
    const char* file = "";
    int line = 0;
    unsigned int generation = 0;
    int kind = 0;
    unsigned int mask = 0;
    unsigned long long value = 0, result = 0;
    int arg = 0, width = 32;
    void* fake_stack = nullptr;  // ASan's, across a switch
    void* tsan_fiber = nullptr;
};

struct Launch {
    cudaemu_entry entry;
    const unsigned char* args;
    dim3 grid, block;
    unsigned int shared_bytes;
    int order;
    unsigned long long seed;
    unsigned long long blocks;
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    std::mutex error_lock;
    std::string error;
};

struct Block {
    uint3 index{};
    unsigned int threads = 0, exited = 0, at_barrier = 0;
    unsigned int barrier_generation = 0;
    const char* barrier_file = "";
    int barrier_line = 0;
    std::vector<unsigned int> warp_generation;
    bool failed = false;
    char error[1024] = {0};
    // TSan synchronisation objects (only their addresses matter): barrier generations alternate between two,
    // so a fiber that runs ahead to the next barrier cannot release into the one others still acquire.
    char barrier_sync[2] = {0, 0};
    std::vector<char> warp_sync;  // 2 per warp
};

// One OS thread's state while it runs blocks of a launch.
struct Worker {
    Launch* launch = nullptr;
    Block* block = nullptr;
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    const void* scheduler_stack = nullptr;  // ASan: the OS thread's own stack, learnt on the first switch
    size_t scheduler_stack_size = 0;
    void* scheduler_fake_stack = nullptr;
    void* tsan_scheduler = nullptr;
    // TSan: the worker's fibers serve block after block. Each exiting fiber releases into block_done, the
    // scheduler acquires it after the block and releases into block_start before the next, which each fiber
    // acquires as it starts: blocks on one OS thread are ordered, threads within a block are not.
    char block_done = 0;
    char block_start = 0;
};

thread_local Worker* current_worker = nullptr;
thread_local Fiber* current_fiber = nullptr;

// ---- switching ----

void resume(Worker& w, Fiber& f) {
    current_fiber = &f;
#if defined(CUDAEMU_ASAN)
    __sanitizer_start_switch_fiber(&w.scheduler_fake_stack, f.stack, STACK_BYTES);
#endif
#if defined(CUDAEMU_TSAN)
    __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
    swapcontext(&w.scheduler, &f.context);
#if defined(CUDAEMU_ASAN)
    __sanitizer_finish_switch_fiber(w.scheduler_fake_stack, nullptr, nullptr);
#endif
    current_fiber = nullptr;
}

// From a fiber back to its scheduler; `final` when it will never be resumed.
void suspend(Fiber& f, bool final) {
    Worker& w = *current_worker;
#if defined(CUDAEMU_ASAN)
    __sanitizer_start_switch_fiber(final ? nullptr : &f.fake_stack, w.scheduler_stack, w.scheduler_stack_size);
#else
    (void)final;
#endif
#if defined(CUDAEMU_TSAN)
    __tsan_switch_to_fiber(w.tsan_scheduler, __tsan_switch_to_fiber_no_sync);
#endif
    swapcontext(&f.context, &w.scheduler);
#if defined(CUDAEMU_ASAN)
    __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

void tsan_release(void* address) {
#if defined(CUDAEMU_TSAN)
    __tsan_release(address);
#else
    (void)address;
#endif
}

void tsan_acquire(void* address) {
#if defined(CUDAEMU_TSAN)
    __tsan_acquire(address);
#else
    (void)address;
#endif
}

// ---- errors: the first one of a block stops it, and the launch ----

std::string describe_thread(const Fiber& f) {
    char text[96];
    std::snprintf(text, sizeof text, "thread (%u,%u,%u)", f.index.x, f.index.y, f.index.z);
    return text;
}

// Records the error and leaves the fiber for good (its stack is dropped with the block).
[[noreturn]] void fail(Fiber& f, const char* format, ...) {
    Block& b = *current_worker->block;
    char message[768];
    va_list args;
    va_start(args, format);
    std::vsnprintf(message, sizeof message, format, args);
    va_end(args);
    std::snprintf(b.error, sizeof b.error, "thread (%u,%u,%u): %s", f.index.x, f.index.y, f.index.z, message);
    b.failed = true;
    suspend(f, true);
    __builtin_unreachable();
}

const char* warp_op_name(int kind) {
    switch (kind) {
        case CUDAEMU_SHFL_IDX: return "__shfl_sync";
        case CUDAEMU_SHFL_UP: return "__shfl_up_sync";
        case CUDAEMU_SHFL_DOWN: return "__shfl_down_sync";
        case CUDAEMU_SHFL_XOR: return "__shfl_xor_sync";
        case CUDAEMU_BALLOT: return "__ballot_sync";
        case CUDAEMU_ANY: return "__any_sync";
        case CUDAEMU_ALL: return "__all_sync";
        case CUDAEMU_SYNCWARP: return "__syncwarp";
        default: return "a warp intrinsic";
    }
}

// ---- barriers ----

Fiber& fiber_at(Worker& w, unsigned int warp, unsigned int lane) { return w.fibers[warp * 32 + lane]; }

unsigned int lanes_in_warp(const Block& b, unsigned int warp) {
    return std::min(32u, b.threads - warp * 32);
}

void syncthreads(const char* file, int line) {
    Worker& w = *current_worker;
    Block& b = *w.block;
    Fiber& f = *current_fiber;
    if (b.exited > 0) {
        for (const Fiber& other : w.fibers) {
            if (other.state == State::exited) {
                fail(f, "__syncthreads at %s:%d in a block where %s has exited (barrier with exited threads)", file,
                     line, describe_thread(other).c_str());
            }
        }
    }
    if (b.at_barrier > 0 && (b.barrier_line != line || std::strcmp(b.barrier_file, file) != 0)) {
        fail(f, "divergent __syncthreads: this thread is at %s:%d while %u others wait at %s:%d", file, line,
             b.at_barrier, b.barrier_file, b.barrier_line);
    }
    b.barrier_file = file;
    b.barrier_line = line;
    f.file = file;
    f.line = line;
    f.generation = b.barrier_generation;
    tsan_release(&b.barrier_sync[f.generation & 1]);
    if (++b.at_barrier == b.threads) {
        for (Fiber& other : w.fibers) {
            if (other.state == State::barrier) other.state = State::runnable;
        }
        b.at_barrier = 0;
        ++b.barrier_generation;
        f.state = State::runnable;
    } else {
        f.state = State::barrier;
    }
    suspend(f, false);
    tsan_acquire(&b.barrier_sync[f.generation & 1]);
}

// ---- warp operations ----

// The lane a shuffle reads for `lane`: itself where CUDA says the source falls outside the lane's segment.
int shuffle_source(int kind, int lane, int arg, int width) {
    const int segment = lane & ~(width - 1);
    switch (kind) {
        case CUDAEMU_SHFL_IDX: return segment + (arg & (width - 1));
        case CUDAEMU_SHFL_UP: return (lane - segment) >= arg ? lane - arg : lane;
        case CUDAEMU_SHFL_DOWN: return (lane - segment) + arg < width ? lane + arg : lane;
        case CUDAEMU_SHFL_XOR: {
            const int other = lane ^ arg;
            return (other >= segment && other < segment + width) ? other : lane;
        }
        default: return lane;
    }
}

bool is_shuffle(int kind) { return kind <= CUDAEMU_SHFL_XOR; }

unsigned long long warp_result(Worker& w, const Fiber& f) {
    if (is_shuffle(f.kind)) {
        const int source = shuffle_source(f.kind, static_cast<int>(f.lane), f.arg, f.width);
        return fiber_at(w, f.warp, static_cast<unsigned int>(source)).value;
    }
    if (f.kind == CUDAEMU_SYNCWARP) return 0;
    unsigned int ballot = 0;
    for (unsigned int lane = 0; lane < 32; ++lane) {
        if ((f.mask >> lane) & 1u) ballot |= (fiber_at(w, f.warp, lane).value ? 1u : 0u) << lane;
    }
    if (f.kind == CUDAEMU_BALLOT) return ballot;
    if (f.kind == CUDAEMU_ANY) return ballot != 0;
    return ballot == f.mask;
}

// Checks lane `f`'s call against the rules and the lanes already waiting; fails the launch on a broken one.
void check_warp_call(Worker& w, Fiber& f) {
    Block& b = *w.block;
    const unsigned int lanes = lanes_in_warp(b, f.warp);
    const char* name = warp_op_name(f.kind);
    if (((f.mask >> f.lane) & 1u) == 0) {
        fail(f, "%s at %s:%d with mask 0x%08x that does not name the calling lane %u", name, f.file, f.line, f.mask,
             f.lane);
    }
    if (lanes < 32 && (f.mask >> lanes) != 0) {
        fail(f, "%s at %s:%d with mask 0x%08x names lanes beyond the %u threads of warp %u (block of %u threads)",
             name, f.file, f.line, f.mask, lanes, f.warp, b.threads);
    }
    if (is_shuffle(f.kind) && (f.width <= 0 || f.width > 32 || (f.width & (f.width - 1)) != 0)) {
        fail(f, "%s at %s:%d with width %d (must be a power of two <= 32)", name, f.file, f.line, f.width);
    }
    for (unsigned int lane = 0; lane < lanes; ++lane) {
        const Fiber& other = fiber_at(w, f.warp, lane);
        const bool named = (f.mask >> lane) & 1u;
        if (named && other.state == State::exited) {
            fail(f, "%s at %s:%d with mask 0x%08x names lane %u, which has exited", name, f.file, f.line, f.mask,
                 lane);
        }
        if (other.state != State::warp || &other == &f) continue;
        if ((named || ((other.mask >> f.lane) & 1u)) && (other.kind != f.kind || other.mask != f.mask)) {
            fail(f, "divergent warp intrinsics: %s(mask 0x%08x) at %s:%d while lane %u waits in %s(mask 0x%08x) at %s:%d",
                 name, f.mask, f.file, f.line, lane, warp_op_name(other.kind), other.mask, other.file, other.line);
        }
    }
}

unsigned long long warp_op(int kind, unsigned int mask, unsigned long long value, int arg, int width, const char* file,
                           int line) {
    Worker& w = *current_worker;
    Block& b = *w.block;
    Fiber& f = *current_fiber;
    f.kind = kind;
    f.mask = mask;
    f.value = value;
    f.arg = arg;
    f.width = width;
    f.file = file;
    f.line = line;
    check_warp_call(w, f);
    f.state = State::warp;
    const bool sync = kind == CUDAEMU_SYNCWARP;  // the only warp intrinsic that orders memory
    f.generation = b.warp_generation[f.warp];
    if (sync) tsan_release(&b.warp_sync[2 * f.warp + (f.generation & 1)]);
    bool complete = true;
    for (unsigned int lane = 0; lane < 32; ++lane) {
        if (((mask >> lane) & 1u) && fiber_at(w, f.warp, lane).state != State::warp) complete = false;
    }
    if (complete) {
        for (unsigned int lane = 0; lane < 32 && is_shuffle(kind); ++lane) {  // a shuffle reads only members
            if (!((mask >> lane) & 1u)) continue;
            const int source = shuffle_source(kind, static_cast<int>(lane), arg, width);
            if (!((mask >> source) & 1u)) {
                fail(f, "%s at %s:%d: lane %u reads lane %d, which is not in mask 0x%08x", warp_op_name(kind), file,
                     line, lane, source, mask);
            }
        }
        std::vector<unsigned long long> results(32, 0);
        for (unsigned int lane = 0; lane < 32; ++lane) {
            if ((mask >> lane) & 1u) results[lane] = warp_result(w, fiber_at(w, f.warp, lane));
        }
        for (unsigned int lane = 0; lane < 32; ++lane) {
            if (!((mask >> lane) & 1u)) continue;
            Fiber& member = fiber_at(w, f.warp, lane);
            member.result = results[lane];
            member.state = State::runnable;
        }
        ++b.warp_generation[f.warp];
    }
    suspend(f, false);
    if (sync) tsan_acquire(&b.warp_sync[2 * f.warp + (f.generation & 1)]);
    return f.result;
}

// ---- fibers and blocks ----

void exit_thread(Fiber& f) {
    Worker& w = *current_worker;
    Block& b = *w.block;
    if (b.at_barrier > 0) {
        fail(f, "exited while %u threads wait at __syncthreads at %s:%d (barrier with exited threads)", b.at_barrier,
             b.barrier_file, b.barrier_line);
    }
    for (unsigned int lane = 0; lane < lanes_in_warp(b, f.warp); ++lane) {
        const Fiber& other = fiber_at(w, f.warp, lane);
        if (other.state == State::warp && ((other.mask >> f.lane) & 1u)) {
            fail(f, "exited while lane %u waits in %s(mask 0x%08x) at %s:%d, which names it", lane,
                 warp_op_name(other.kind), other.mask, other.file, other.line);
        }
    }
    f.state = State::exited;
    ++b.exited;
    tsan_release(&w.block_done);
    suspend(f, true);
}

void fiber_main() {
    Worker& w = *current_worker;
    Fiber& f = *current_fiber;
#if defined(CUDAEMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &w.scheduler_stack, &w.scheduler_stack_size);
#endif
    tsan_acquire(&w.block_start);
    w.launch->entry(w.launch->args);
    exit_thread(f);
}

std::string describe_deadlock(const Worker& w) {
    const Block& b = *w.block;
    std::string text = "deadlock: every live thread waits (";
    bool first = true;
    for (const Fiber& f : w.fibers) {
        if (&f - w.fibers.data() >= static_cast<long>(b.threads)) break;
        if (f.state == State::exited) continue;
        char line[256];
        if (f.state == State::barrier) {
            std::snprintf(line, sizeof line, "%s at __syncthreads %s:%d", describe_thread(f).c_str(), f.file, f.line);
        } else {
            std::snprintf(line, sizeof line, "%s in %s(mask 0x%08x) %s:%d", describe_thread(f).c_str(),
                          warp_op_name(f.kind), f.mask, f.file, f.line);
        }
        if (!first) text += "; ";
        text += line;
        first = false;
        if (text.size() > 600) {
            text += "; ...";
            break;
        }
    }
    char tail[64];
    std::snprintf(tail, sizeof tail, "; %u exited)", b.exited);
    return text + tail;
}

void prepare_shared_memory(const Launch& launch) {
    void* regions[MAX_SHARED_REGIONS];
    const int count = cudaemu_dynamic_shared(regions, MAX_SHARED_REGIONS);
    for (int i = 0; i < count; ++i) {
#if defined(CUDAEMU_ASAN)
        __asan_unpoison_memory_region(regions[i], CUDAEMU_SHARED_LIMIT);
#endif
        std::memset(regions[i], 0xff, CUDAEMU_SHARED_LIMIT);  // NaN / -1: uninitialised reads show
#if defined(CUDAEMU_ASAN)
        __asan_poison_memory_region(static_cast<char*>(regions[i]) + launch.shared_bytes,
                                  CUDAEMU_SHARED_LIMIT - launch.shared_bytes);
#else
        (void)launch;
#endif
    }
}

void release_shared_memory() {
#if defined(CUDAEMU_ASAN)
    void* regions[MAX_SHARED_REGIONS];
    const int count = cudaemu_dynamic_shared(regions, MAX_SHARED_REGIONS);
    for (int i = 0; i < count; ++i) __asan_unpoison_memory_region(regions[i], CUDAEMU_SHARED_LIMIT);
#endif
}

uint3 unflatten(unsigned long long linear, const dim3& d) {
    uint3 out;
    out.x = static_cast<unsigned int>(linear % d.x);
    linear /= d.x;
    out.y = static_cast<unsigned int>(linear % d.y);
    out.z = static_cast<unsigned int>(linear / d.y);
    return out;
}

void record_error(Launch& launch, const Block& b) {
    std::lock_guard<std::mutex> hold(launch.error_lock);
    if (launch.error.empty()) {
        char where[96];
        std::snprintf(where, sizeof where, "block (%u,%u,%u) ", b.index.x, b.index.y, b.index.z);
        launch.error = std::string(where) + b.error;
    }
    launch.failed.store(true, std::memory_order_relaxed);
}

void run_block(Worker& w, unsigned long long linear) {
    Launch& launch = *w.launch;
    Block b;
    b.index = unflatten(linear, launch.grid);
    b.threads = launch.block.x * launch.block.y * launch.block.z;
    const unsigned int warps = (b.threads + 31) / 32;
    b.warp_generation.assign(warps, 0);
    b.warp_sync.assign(2 * warps, 0);
    w.block = &b;
    prepare_shared_memory(launch);
    tsan_release(&w.block_start);
    for (unsigned int t = 0; t < b.threads; ++t) {
        Fiber& f = w.fibers[t];
        f.index = unflatten(t, launch.block);
        f.warp = t / 32;
        f.lane = t % 32;
        f.state = State::runnable;
        f.fake_stack = nullptr;
#if defined(CUDAEMU_ASAN)
        __asan_unpoison_memory_region(f.stack, STACK_BYTES);  // frames left by an earlier block
#endif
#if defined(CUDAEMU_TSAN)
        if (f.tsan_fiber == nullptr) f.tsan_fiber = __tsan_create_fiber(0);
#endif
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack;
        f.context.uc_stack.ss_size = STACK_BYTES;
        f.context.uc_link = nullptr;
        makecontext(&f.context, fiber_main, 0);
    }
    std::vector<unsigned int> order(b.threads);
    for (unsigned int t = 0; t < b.threads; ++t) order[t] = launch.order == CUDAEMU_REVERSE ? b.threads - 1 - t : t;
    std::mt19937_64 random(launch.seed * 0x9E3779B97F4A7C15ull + linear + 1);
    std::vector<unsigned int> runnable;
    while (!b.failed && !launch.failed.load(std::memory_order_relaxed)) {
        if (launch.order == CUDAEMU_RANDOM) std::shuffle(order.begin(), order.end(), random);
        runnable.clear();
        for (unsigned int t : order) {
            if (w.fibers[t].state == State::runnable) runnable.push_back(t);
        }
        if (runnable.empty()) {
            if (b.exited < b.threads) {
                std::snprintf(b.error, sizeof b.error, "%s", describe_deadlock(w).c_str());
                b.failed = true;
            }
            break;
        }
        for (unsigned int t : runnable) {
            if (w.fibers[t].state == State::runnable) resume(w, w.fibers[t]);
            if (b.failed) break;
        }
    }
    if (b.failed) record_error(launch, b);
    tsan_acquire(&w.block_done);
    w.block = nullptr;
}

unsigned long long block_at(const Launch& launch, unsigned long long i, unsigned long long multiplier,
                            unsigned long long offset) {
    if (launch.order == CUDAEMU_REVERSE) return launch.blocks - 1 - i;
    if (launch.order == CUDAEMU_RANDOM) {  // an affine bijection of [0, blocks): no table, any grid size
        return static_cast<unsigned long long>(
            (static_cast<unsigned __int128>(i) * multiplier + offset) % launch.blocks);
    }
    return i;
}

unsigned long long gcd(unsigned long long a, unsigned long long b) {
    while (b != 0) {
        const unsigned long long r = a % b;
        a = b;
        b = r;
    }
    return a;
}

void run_worker(Launch& launch, unsigned long long multiplier, unsigned long long offset) {
    Worker w;
    w.launch = &launch;
    current_worker = &w;
#if defined(CUDAEMU_TSAN)
    w.tsan_scheduler = __tsan_get_current_fiber();
#endif
    const unsigned int threads = launch.block.x * launch.block.y * launch.block.z;
    w.fibers.resize(threads);
    for (Fiber& f : w.fibers) {
        void* memory = mmap(nullptr, STACK_BYTES + GUARD_BYTES, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (memory == MAP_FAILED) {
            std::lock_guard<std::mutex> hold(launch.error_lock);
            launch.error = "cannot map a fiber stack";
            launch.failed.store(true);
            break;
        }
        mprotect(memory, GUARD_BYTES, PROT_NONE);
        f.stack = static_cast<char*>(memory) + GUARD_BYTES;
    }
    for (;;) {
        const unsigned long long i = launch.next.fetch_add(1, std::memory_order_relaxed);
        if (i >= launch.blocks || launch.failed.load(std::memory_order_relaxed)) break;
        run_block(w, block_at(launch, i, multiplier, offset));
    }
    release_shared_memory();
    for (Fiber& f : w.fibers) {
#if defined(CUDAEMU_TSAN)
        if (f.tsan_fiber != nullptr) __tsan_destroy_fiber(f.tsan_fiber);
#endif
        if (f.stack == nullptr) continue;
#if defined(CUDAEMU_ASAN)
        __asan_unpoison_memory_region(f.stack, STACK_BYTES);
#endif
        munmap(f.stack - GUARD_BYTES, STACK_BYTES + GUARD_BYTES);
    }
    current_worker = nullptr;
}

}  // namespace

extern "C" {

const uint3* cudaemu_thread_idx(void) { return &current_fiber->index; }
const uint3* cudaemu_block_idx(void) { return &current_worker->block->index; }
const dim3* cudaemu_block_dim(void) { return &current_worker->launch->block; }
const dim3* cudaemu_grid_dim(void) { return &current_worker->launch->grid; }

void cudaemu_syncthreads(const char* file, int line) { syncthreads(file, line); }

unsigned long long cudaemu_warp_op(int kind, unsigned int mask, unsigned long long value, int arg, int width,
                                   const char* file, int line) {
    return warp_op(kind, mask, value, arg, width, file, line);
}

unsigned int cudaemu_active_mask(void) {
    Worker& w = *current_worker;
    const Fiber& f = *current_fiber;
    unsigned int mask = 0;
    for (unsigned int lane = 0; lane < lanes_in_warp(*w.block, f.warp); ++lane) {
        if (fiber_at(w, f.warp, lane).state != State::exited) mask |= 1u << lane;
    }
    return mask;
}

int cudaemu_launch(cudaemu_entry entry, const unsigned char* args, const unsigned int* grid, const unsigned int* block,
                   unsigned int shared_bytes, int order, unsigned long long seed, char* error,
                   unsigned long error_len) {
    Launch launch;
    launch.entry = entry;
    launch.args = args;
    launch.grid = dim3(grid[0], grid[1], grid[2]);
    launch.block = dim3(block[0], block[1], block[2]);
    launch.shared_bytes = shared_bytes;
    launch.order = order;
    launch.seed = seed;
    launch.blocks = static_cast<unsigned long long>(grid[0]) * grid[1] * grid[2];
    std::mt19937_64 random(seed);
    unsigned long long multiplier = 1, offset = 0;
    if (order == CUDAEMU_RANDOM && launch.blocks > 1) {
        do {
            multiplier = random() % launch.blocks;
        } while (multiplier == 0 || gcd(multiplier, launch.blocks) != 1);
        offset = random() % launch.blocks;
    }
    const unsigned int cores = std::max(1u, std::min(4u, std::thread::hardware_concurrency()));
    const unsigned long long count = std::min<unsigned long long>(cores, launch.blocks);
    std::vector<std::thread> workers;
    for (unsigned long long i = 0; i < count; ++i) {
        workers.emplace_back(run_worker, std::ref(launch), multiplier, offset);
    }
    for (std::thread& t : workers) t.join();
    if (!launch.failed.load()) return 0;
    std::snprintf(error, error_len, "%s", launch.error.c_str());
    return 1;
}

}  // extern "C"
