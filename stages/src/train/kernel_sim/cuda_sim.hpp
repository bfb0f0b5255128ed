// Just enough of CUDA C++ to run `kernels.cu` on the CPU, for the stages' tests
// (src/train/kernel_sim.rs): every CUDA thread of a block is an OS thread, __syncthreads is a
// barrier of the block's threads, and the warp intrinsics the kernels use (__ballot_sync,
// __shfl_down_sync) exchange values through a barrier of the warp's 32 threads. The OS threads
// of one block's size run every block, one after another, with a barrier between, so a kernel's
// `__shared__` arrays (static locals here) belong to one block at a time. The explicitly rounded float intrinsics are the plain operations, compiled with
// -ffp-contract=off so that none is fused.
//
// It checks what the kernels assume: a warp intrinsic needs a full warp (a block size that is a
// multiple of 32) and the full mask.
#pragma once

#include <pthread.h>

#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace sim {

[[noreturn]] inline void fail(const char *what) {
    std::fprintf(stderr, "cuda_sim: %s\n", what);
    std::exit(3);
}

struct Warp {
    std::barrier<> bar{32};
    unsigned int bits[32];
    float vals[32];
};

struct Block {
    explicit Block(unsigned int threads) : bar(threads), full_warps(threads % 32 == 0) {
        for (unsigned int w = 0; w < (threads + 31) / 32; ++w) {
            warps.push_back(std::make_unique<Warp>());
        }
    }
    std::barrier<> bar;
    bool full_warps;
    std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block *block = nullptr;
inline thread_local unsigned int linear = 0;

inline Warp &warp(unsigned int mask) {
    if (mask != 0xffffffffu || !block->full_warps) {
        fail("a warp intrinsic needs a full warp and the full mask");
    }
    return *block->warps[linear / 32];
}

struct Thread {
    void (*body)(void *);
    void *env;
    Block *block;
    dim3 idx;
    unsigned int linear;
};

// One CUDA thread's part of every block, in order; the block's barrier after each keeps the
// blocks (and their shared arrays) apart.
inline void *run_thread(void *arg) {
    auto *t = static_cast<Thread *>(arg);
    block = t->block;
    linear = t->linear;
    threadIdx = t->idx;
    for (unsigned int bz = 0; bz < gridDim.z; ++bz)
        for (unsigned int by = 0; by < gridDim.y; ++by)
            for (unsigned int bx = 0; bx < gridDim.x; ++bx) {
                blockIdx = dim3{bx, by, bz};
                t->body(t->env);
                block->bar.arrive_and_wait();
            }
    return nullptr;
}

// Runs `body` as every thread of the grid: one OS thread per thread of a block, which runs the
// blocks one after another.
template <class F> void launch(dim3 grid, dim3 blk, F &&body) {
    const unsigned long long threads = (unsigned long long)blk.x * blk.y * blk.z;
    if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535) {
        fail("invalid launch configuration");
    }
    gridDim = grid;
    blockDim = blk;
    auto call = [](void *env) { (*static_cast<std::remove_reference_t<F> *>(env))(); };
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 18);
    Block b((unsigned int)threads);
    std::vector<Thread> ts(threads);
    std::vector<pthread_t> ids(threads);
    for (unsigned int i = 0; i < threads; ++i) {
        ts[i] = Thread{call, &body, &b, dim3{i % blk.x, (i / blk.x) % blk.y, i / (blk.x * blk.y)}, i};
        if (pthread_create(&ids[i], &attr, run_thread, &ts[i]) != 0) {
            fail("cannot start a thread");
        }
    }
    for (auto id : ids) {
        pthread_join(id, nullptr);
    }
    pthread_attr_destroy(&attr);
}

} // namespace sim

#define __global__
#define __device__
#define __shared__ static
#define __launch_bounds__(...)

inline void __syncthreads() { sim::block->bar.arrive_and_wait(); }

inline unsigned int __ballot_sync(unsigned int mask, bool pred) {
    sim::Warp &w = sim::warp(mask);
    const unsigned int lane = sim::linear % 32;
    w.bits[lane] = pred ? 1u : 0u;
    w.bar.arrive_and_wait();
    unsigned int out = 0;
    for (unsigned int i = 0; i < 32; ++i) {
        out |= w.bits[i] << i;
    }
    w.bar.arrive_and_wait();
    return out;
}

inline float __shfl_down_sync(unsigned int mask, float v, unsigned int delta) {
    sim::Warp &w = sim::warp(mask);
    const unsigned int lane = sim::linear % 32;
    w.vals[lane] = v;
    w.bar.arrive_and_wait();
    const float out = lane + delta < 32 ? w.vals[lane + delta] : v;
    w.bar.arrive_and_wait();
    return out;
}

inline unsigned int atomicAdd(unsigned int *p, unsigned int v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

inline int __popc(unsigned int x) { return std::popcount(x); }
inline unsigned int __float_as_uint(float x) { return std::bit_cast<unsigned int>(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
