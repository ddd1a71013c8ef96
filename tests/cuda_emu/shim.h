// A CPU stand-in for the parts of CUDA that our matrix kernels (`cuda_matvec.cuh`) and
// `cuda_common.cuh` use, so that their source runs on a machine without a GPU
// (`tests/cuda_emulated.rs`). Each CUDA thread is an OS thread; a block's threads run
// together and blocks one after another, in a different shuffled order each launch (so
// `__shared__` memory can be a `static`, and no kernel may count on an order of blocks);
// `__syncwarp` and the warp shuffles are barriers of the warp's 32 threads, as on a GPU
// since Volta, where a warp's threads may run apart between them; `__syncthreads` is a
// barrier of the block's.
//
// What this checks: the kernels' indexing, block layouts, chunking, arithmetic and
// reductions, (in `__ldcs` and `copy_async`) that every wide load is aligned to its width,
// and that a `cp.async` stage is read only after its wait and refilled only when no lane
// reads it (the copies land at the wait, garbage at the copy). What it cannot: nvcc's
// compilation, the hardware's memory model, and speed.

#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

using std::min;

struct Dim3 {
  unsigned x, y, z;
};
inline thread_local Dim3 threadIdx{0, 0, 0};
inline thread_local Dim3 blockIdx{0, 0, 0};
inline Dim3 blockDim{1, 1, 1};
inline Dim3 gridDim{1, 1, 1};

// CUDA's vector and half types, laid out as on the GPU.
struct half {
  uint16_t bits;
};

struct alignas(4) half2 {
  half x, y;
};
struct float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

inline float __half2float(half h) {
  const uint32_t sign = (h.bits >> 15) & 1, exp = (h.bits >> 10) & 0x1f, man = h.bits & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp((float)man, -24);
  } else if (exp == 31) {
    v = man ? NAN : INFINITY;
  } else {
    v = std::ldexp((float)(man | 0x400), (int)exp - 25);
  }
  return sign ? -v : v;
}
// Round to nearest even, as the GPU's conversion.
inline half __float2half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
  const float a = std::fabs(f);
  if (std::isnan(f)) return half{(uint16_t)(sign | 0x7e00)};
  if (a >= 65520.0f) return half{(uint16_t)(sign | 0x7c00)};
  if (a < std::ldexp(1.0f, -14)) {  // subnormal: units of 2^-24
    return half{(uint16_t)(sign | (uint16_t)std::nearbyint(a * std::ldexp(1.0f, 24)))};
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  uint32_t bits = (uint32_t)std::nearbyint(std::ldexp(m, 11));  // 1024..2048
  if (bits == 2048) {
    bits = 1024;
    ++e;
  }
  if (e + 14 >= 31) return half{(uint16_t)(sign | 0x7c00)};
  return half{(uint16_t)(sign | ((uint32_t)(e + 14) << 10) | (bits - 1024))};
}
inline float2 __half22float2(half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float __low2float(half2 h) { return __half2float(h.x); }

// Four signed bytes of `a` times those of `b`, plus `c`.
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
  return c;
}

// Per signed byte: a - b, saturated.
inline int __vsubss4(int a, int b) {
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    int x = (int)(int8_t)(a >> (8 * i)) - (int)(int8_t)(b >> (8 * i));
    x = std::clamp(x, -128, 127);
    r |= (uint32_t)(x & 0xff) << (8 * i);
  }
  return (int)r;
}

inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return (unsigned)((((uint64_t)hi << 32) | lo) >> (shift & 31));
}

// A load that bypasses L1 on a GPU; here, a check that it is aligned as the GPU needs.
template <typename T>
inline T __ldcs(const T *p) {
  if ((uintptr_t)p % sizeof(T) != 0) {
    std::fprintf(stderr, "misaligned %zu-byte load at %p\n", sizeof(T), (const void *)p);
    std::abort();
  }
  return *p;
}

// A load from L2 (past a possibly stale L1) on a GPU: another block's writes. Here, blocks
// run one after another, so any load sees them.
template <typename T>
inline T __ldcg(const T *p) {
  return __ldcs(p);
}

// Blocks run one after another and a block's threads at once: a fence of the C++ memory
// model and an atomic add are what a GPU's give the kernels here.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned *p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v, std::memory_order_seq_cst);
}

namespace emu {
// `cp.async` (see `copy_async` in `cuda_matvec.cuh`): per CUDA thread, the copies issued
// and not yet committed, and the committed groups not yet waited for. A copy takes its
// source bytes when issued and writes them only at the wait that retires its group; at the
// copy it writes garbage there instead (on a GPU the bytes may land at any time in
// between). So a kernel that reads a stage before its wait and `__syncwarp`, or refills a
// stage another lane still reads, computes on garbage and fails its check.
struct AsyncCopy {
  void *dst;
  unsigned size;
  uint8_t bytes[16];
};
struct AsyncCopies {
  std::vector<AsyncCopy> open;
  std::vector<std::vector<AsyncCopy>> groups;  // oldest first
};
inline thread_local AsyncCopies async_copies;
}  // namespace emu

template <typename V>
inline void copy_async(V *dst, const V *src) {
  static_assert(sizeof(V) == 4 || sizeof(V) == 8 || sizeof(V) == 16, "cp.async sizes");
  if ((uintptr_t)dst % sizeof(V) != 0 || (uintptr_t)src % sizeof(V) != 0) {
    std::fprintf(stderr, "misaligned %zu-byte cp.async from %p to %p\n", sizeof(V),
                 (const void *)src, (void *)dst);
    std::abort();
  }
  emu::AsyncCopy copy{dst, (unsigned)sizeof(V), {}};
  std::memcpy(copy.bytes, src, sizeof(V));
  std::memset(dst, 0xa5, sizeof(V));
  emu::async_copies.open.push_back(copy);
}

// Programmatic dependent launch (`pdl_wait` in `cuda_common.cuh`). Kernels run here one
// after another; but a test may play the kernel before a launch: `emu::pdl_release` (set
// before the launch, cleared by it) runs at the first `pdl_wait` of the launch, before any
// thread passes one. A test that hides the previous kernel's outputs until then (garbage in
// the activations, which the release puts back) and clobbers what the kernel may only
// write after it (its output, filled with NaN by the release) finds a kernel that reads or
// writes before its `pdl_wait`, or never calls it: the first thread to reach it has done
// all its earlier reads and writes before the release.
namespace emu {
inline std::mutex pdl_mutex;
inline std::function<void()> pdl_release;
}  // namespace emu
inline void pdl_launch_dependents() {}
inline void pdl_wait() {
  std::lock_guard<std::mutex> lock(emu::pdl_mutex);
  if (emu::pdl_release) {
    emu::pdl_release();
    emu::pdl_release = nullptr;
  }
}

inline void copy_async_commit() {
  emu::AsyncCopies &c = emu::async_copies;
  c.groups.push_back(std::move(c.open));
  c.open.clear();
}

template <int K>
inline void copy_async_wait() {
  emu::AsyncCopies &c = emu::async_copies;
  while (c.groups.size() > (size_t)K) {
    for (const emu::AsyncCopy &copy : c.groups.front())
      std::memcpy(copy.dst, copy.bytes, copy.size);
    c.groups.erase(c.groups.begin());
  }
}

namespace emu {
// Barriers count the phases they complete, so that a watchdog can tell a hang: on a GPU, a
// shuffle or sync that part of a warp (or block) skips is undefined; here it would wait
// forever, so a launch aborts instead when no barrier completes for 10 s.
inline std::atomic<uint64_t> phases{0};
struct Tick {
  void operator()() noexcept { phases.fetch_add(1, std::memory_order_relaxed); }
};
using Barrier = std::barrier<Tick>;

struct Warp {
  Barrier bar{32};
  float slots[32];
};
inline thread_local Warp *warp = nullptr;
inline thread_local Barrier *block_barrier = nullptr;

// The OS threads that play CUDA threads, kept from one launch to the next (creating
// thousands of threads is most of the time otherwise, under the sanitizers more so).
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      quit_ = true;
    }
    start_.notify_all();
    for (auto &worker : workers_) worker.join();
  }

  // Runs `job(t)` on threads t = 0..threads - 1 at once; returns when all are done, or
  // aborts when no barrier completed for 10 s (a diverged warp or block).
  void run(unsigned threads, const std::function<void(unsigned)> &job) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_.size() < threads) {
      const unsigned index = (unsigned)workers_.size();
      workers_.emplace_back([this, index] { work(index); });
    }
    job_ = &job;
    active_ = threads;
    running_ = threads;
    ++generation_;
    start_.notify_all();
    uint64_t seen = phases.load();
    auto last = std::chrono::steady_clock::now();
    while (!done_.wait_for(lock, std::chrono::milliseconds(50), [&] { return running_ == 0; })) {
      const uint64_t now = phases.load();
      if (now != seen) {
        seen = now;
        last = std::chrono::steady_clock::now();
      } else if (std::chrono::steady_clock::now() - last > std::chrono::seconds(10)) {
        std::fprintf(stderr, "no barrier completed for 10 s: a warp or block diverged at a "
                     "shuffle or sync\n");
        std::abort();
      }
    }
    job_ = nullptr;
  }

 private:
  void work(unsigned index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return quit_ || generation_ != seen; });
      if (quit_) return;
      seen = generation_;
      if (index >= active_) continue;
      const std::function<void(unsigned)> *job = job_;
      lock.unlock();
      (*job)(index);
      lock.lock();
      if (--running_ == 0) done_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(unsigned)> *job_ = nullptr;
  unsigned active_ = 0, running_ = 0;
  uint64_t generation_ = 0;
  bool quit_ = false;
};
inline Pool pool;

// The order the blocks of a launch run in: a GPU promises none, so each launch takes a
// different pseudo-random one (a fixed sequence, so that a failure repeats), and a kernel
// that counts on an order (which block of several ends last, say) meets others.
inline uint64_t order_seed = 0x9e3779b97f4a7c15ull;
inline std::vector<Dim3> block_order(Dim3 grid) {
  std::vector<Dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back({x, y, z});
  for (size_t i = order.size(); i > 1; --i) {  // Fisher-Yates on splitmix64
    uint64_t z = (order_seed += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    std::swap(order[i - 1], order[(z ^ (z >> 31)) % i]);
  }
  return order;
}

// Run `kernel` over a grid of `grid` blocks of `block` threads (a multiple of 32): one OS
// thread per CUDA thread of a block, each going through the blocks in `block_order`, all
// of a block's threads done before any starts the next (its `__shared__` memory is the next
// one's too).
template <typename K>
void launch(Dim3 grid, unsigned block, K kernel) {
  blockDim = {block, 1, 1};
  gridDim = grid;
  const std::vector<Dim3> order = block_order(grid);
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned w = 0; w < block / 32; ++w) warps.push_back(std::make_unique<Warp>());
  Barrier block_done((std::ptrdiff_t)block), sync((std::ptrdiff_t)block);
  pool.run(block, [&](unsigned t) {
    threadIdx = {t, 0, 0};
    warp = warps[t / 32].get();
    block_barrier = &sync;
    for (const Dim3 &b : order) {
      blockIdx = b;
      kernel();
      // Copies still in flight when a thread ends: on a GPU they would land in the next
      // block's shared memory, or never be waited for.
      if (!async_copies.open.empty() || !async_copies.groups.empty()) {
        std::fprintf(stderr, "a kernel ended with cp.async copies in flight\n");
        std::abort();
      }
      block_done.arrive_and_wait();
    }
  });
  std::lock_guard<std::mutex> lock(pdl_mutex);
  pdl_release = nullptr;
}

template <typename K>
void launch(unsigned grid, unsigned block, K kernel) {
  launch(Dim3{grid, 1, 1}, block, kernel);
}
}  // namespace emu

inline void __syncwarp() { emu::warp->bar.arrive_and_wait(); }
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles");
  const int lane = threadIdx.x & 31;
  emu::Warp *w = emu::warp;
  std::memcpy(&w->slots[lane], &v, 4);
  w->bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &w->slots[lane ^ mask], 4);
  w->bar.arrive_and_wait();
  return r;
}
