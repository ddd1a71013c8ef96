// Our matrix-vector kernels for the decode step, Q4_K, Q6_K and Q8_0 (included by
// `cuda_decode.cu`, after `cuda_common.cuh`; `tests/cuda_emu` runs them under a CPU
// emulation of CUDA's threads).
//
// out[j * out_stride + r] = W[r] . a[j] for each matrix row r and each of the N (1 to 8)
// activation rows a[j], read in our layout of 8-bit activations (`Q8Rows`: quants at
// x_qs + j * x_stride * 32, (d, d * sum) per 16 values at x_ds + j * x_stride * 2, x_stride
// in 32-value blocks), as candle's `mmvq` computes it from its own layout: per 32 values,
// integer dot products of the weights' quants with the activations' (dp4a), scaled by
// both sides' scales.
//
// Why not candle's `mmvq`: its threads read weights 4 bytes at a time, 128 threads sharing
// 8 GGUF blocks, and on an H200 it read them at 35-37 % of the card's bandwidth, two thirds
// of a decode step. Here:
// - a warp owns matrix rows (as many as there are rows over the warps that fit on the GPU
//   at once) and streams them through shared memory in chunks of 16 GGUF blocks (2,304
//   bytes of Q4_K, 3,360 of Q6_K), with the widest loads the row's alignment allows (V: 16
//   bytes for Q4_K's 144-byte blocks and Q8_0's 272-byte groups of 8 blocks; for Q6_K's
//   210-byte blocks, what the block count allows), the next chunk's loads (of the same row
//   or the next) issued before the lanes compute on the current one; weights are read
//   once, so they bypass L1 (`__ldcs`);
// - each chunk's block scales are decoded once into a small table;
// - each lane takes 16 values at a time, lane l the l-th 16 of two consecutive GGUF blocks,
//   so a warp reads its activations as 512 consecutive bytes, one 16-byte load per lane
//   (which is why the activations have a layout of our own: candle's 36-byte blocks allow
//   no 16-byte loads), and those stay in L1 for every warp of the SM.
//
// Each format's kernels come in families that compute the same sums and differ only in how
// the next chunks wait: `mat_vec` holds the next one in registers, `mat_vec_async` has
// `cp.async` copy one or two ahead into shared memory. The decode step times them on the
// GPU at load and takes the fastest per matrix shape (`DecodePlan::tune`).

#pragma once

#define MV_WARPS 4
#define MV_BLOCKS 16

// `N` consecutive 32-bit words from a byte address of any alignment in shared memory (the
// staging buffer of 210-byte Q6_K blocks), from aligned words joined by funnel shifts. May
// read the aligned word after the last one: the staging buffer has room for it.
template <int N>
static __device__ __forceinline__ void load_words(const uint8_t *p, uint32_t *out) {
  const uintptr_t at = (uintptr_t)p;
  const uint32_t *w = (const uint32_t *)(at & ~(uintptr_t)3);
  const unsigned shift = 8u * (unsigned)(at & 3);
  uint32_t lo = w[0];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const uint32_t hi = w[i + 1];
    out[i] = __funnelshift_r(lo, hi, shift);
    lo = hi;
  }
}

// Adds, for each activation row j < N, the dot product of 16 weight quants `v` (signed,
// four per word) whose scale is `scale` (and, for formats with minimums, `min`: the
// values are scale * v - min) with the 16 activations at 16-value index `at` of row j.
template <int N>
static __device__ __forceinline__ void dot16(const uint32_t *v, float scale, float min,
                                             const int8_t *__restrict__ x_qs,
                                             const float2 *__restrict__ x_ds, size_t x_stride,
                                             size_t at, float *sum) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const uint4 a = *(const uint4 *)(x_qs + (j * x_stride * 32 + at * 16));
    const float2 ds = x_ds[j * x_stride * 2 + at];
    int dot = __dp4a((int)v[0], (int)a.x, 0);
    dot = __dp4a((int)v[1], (int)a.y, dot);
    dot = __dp4a((int)v[2], (int)a.z, dot);
    dot = __dp4a((int)v[3], (int)a.w, dot);
    sum[j] += ds.x * scale * (float)dot - min * ds.y;
  }
}

// Q4_K (144 bytes per 256 values): d and dmin (half each), twelve bytes of 6-bit scales and
// minimums for the eight 32-value sub-blocks, then 128 bytes of 4-bit quants: bytes
// 32g..32g+32 hold sub-block 2g in their low nibbles and 2g+1 in their high ones.
struct Q4K {
  static constexpr int BYTES = 144;
  // Per block of the chunk and sub-block: (d * scale, dmin * min).
  struct Table {
    float2 dm[MV_BLOCKS][8];
  };

  // Half h of the table row of block b (at `blk`): sub-blocks 4h..4h+3.
  static __device__ __forceinline__ void prepare(const uint8_t *blk, int b, int h, Table &t) {
    const uint32_t *w = (const uint32_t *)blk;
    const float2 dm = __half22float2(*(const half2 *)blk);
    const uint32_t s0 = w[1], s1 = w[2], s2 = w[3];
    // ggml's get_scale_min_k4: the first four in the low 6 bits of bytes 0-3 (scales) and
    // 4-7 (minimums); the last four in the nibbles of bytes 8-11, their top 2 bits in the
    // top bits of bytes 0-3 and 4-7.
    const uint32_t sc = h == 0 ? s0 & 0x3f3f3f3fu
                               : (s2 & 0x0f0f0f0fu) | ((s0 >> 2) & 0x30303030u);
    const uint32_t mn = h == 0 ? s1 & 0x3f3f3f3fu
                               : ((s2 >> 4) & 0x0f0f0f0fu) | ((s1 >> 2) & 0x30303030u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      t.dm[b][4 * h + k] = make_float2(dm.x * (float)((sc >> (8 * k)) & 0xff),
                                       dm.y * (float)((mn >> (8 * k)) & 0xff));
    }
  }

  // The 16 values `16 t .. 16 t + 16` (t < 16) of block b of the chunk.
  template <int N>
  static __device__ __forceinline__ void dot(const uint8_t *stage, const Table &t, int b,
                                             int lane16, const int8_t *x_qs, const float2 *x_ds,
                                             size_t x_stride, size_t at, float *sum) {
    const int k = lane16 >> 1, s = lane16 & 1;  // sub-block, and which half of it
    const uint4 q = *(const uint4 *)(stage + b * BYTES + 16 + 32 * (k >> 1) + 16 * s);
    const int shift = 4 * (k & 1);
    const uint32_t v[4] = {(q.x >> shift) & 0x0f0f0f0fu, (q.y >> shift) & 0x0f0f0f0fu,
                           (q.z >> shift) & 0x0f0f0f0fu, (q.w >> shift) & 0x0f0f0f0fu};
    const float2 dm = t.dm[b][k];
    dot16<N>(v, dm.x, dm.y, x_qs, x_ds, x_stride, at, sum);
  }
};

// Q6_K (210 bytes per 256 values): 128 bytes of low 4 bits `ql`, 64 bytes of high 2 bits
// `qh`, sixteen int8 scales (one per 16 values), then d (half). Values 128n + 32q + l of a
// block (n < 2, q < 4, l < 32) take ql[64n + 32(q % 2) + l]'s low (q < 2) or high nibble,
// qh[32n + l]'s bits 2q and 2q + 1, less 32, and scale 8n + 2q + l / 16 (ggml's
// dequantize_row_q6_K): the 16 values 16t..16t+16 have scale t.
struct Q6K {
  static constexpr int BYTES = 210;
  // Per block of the chunk and 16 values: d * scale.
  struct Table {
    float dsc[MV_BLOCKS][16];
  };

  // Half h of the table row of block b (at `blk`): scales 8h..8h+8.
  static __device__ __forceinline__ void prepare(const uint8_t *blk, int b, int h, Table &t) {
    const float d = __half2float(*(const half *)(blk + 208));
#pragma unroll
    for (int k = 0; k < 8; ++k) t.dsc[b][8 * h + k] = d * (float)(int8_t)blk[192 + 8 * h + k];
  }

  template <int N>
  static __device__ __forceinline__ void dot(const uint8_t *stage, const Table &t, int b,
                                             int lane16, const int8_t *x_qs, const float2 *x_ds,
                                             size_t x_stride, size_t at, float *sum) {
    const int n = lane16 >> 3, q = (lane16 >> 1) & 3, s = lane16 & 1;
    const uint8_t *blk = stage + b * BYTES;
    uint32_t ql[4], qh[4];
    load_words<4>(blk + 64 * n + 32 * (q & 1) + 16 * s, ql);
    load_words<4>(blk + 128 + 32 * n + 16 * s, qh);
    const int lo_shift = 4 * (q >> 1), hi_shift = 2 * q;
    uint32_t v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      v[i] = ((ql[i] >> lo_shift) & 0x0f0f0f0fu) | (((qh[i] >> hi_shift) & 0x03030303u) << 4);
    // The quants are stored plus 32: their 32 is taken off through the activations' sum,
    // as a minimum (`dot16`'s `min * ds.y`), instead of from each quant.
    const float scale = t.dsc[b][lane16];
    dot16<N>(v, scale, 32.0f * scale, x_qs, x_ds, x_stride, at, sum);
  }
};

// Q8_0 (34 bytes per 32 values: d as half, then 32 int8 quants), taken 8 blocks at a time
// (272 bytes per 256 values, so rows of a multiple of 256 values fit the chunks above): the
// 16 values 16t..16t+16 of such a group are quants 16(t % 2).. of block t / 2.
struct Q8_0 {
  static constexpr int BYTES = 272;
  // Per group of the chunk and 32-value block: d.
  struct Table {
    float d[MV_BLOCKS][8];
  };

  // Half h of the table row of group b (at `blk`): blocks 4h..4h+3.
  static __device__ __forceinline__ void prepare(const uint8_t *blk, int b, int h, Table &t) {
#pragma unroll
    for (int k = 4 * h; k < 4 * h + 4; ++k) t.d[b][k] = __half2float(*(const half *)(blk + 34 * k));
  }

  template <int N>
  static __device__ __forceinline__ void dot(const uint8_t *stage, const Table &t, int b,
                                             int lane16, const int8_t *x_qs, const float2 *x_ds,
                                             size_t x_stride, size_t at, float *sum) {
    const int k = lane16 >> 1, s = lane16 & 1;
    uint32_t v[4];
    load_words<4>(stage + b * BYTES + 34 * k + 2 + 16 * s, v);
    dot16<N>(v, t.d[b][k], 0.0f, x_qs, x_ds, x_stride, at, sum);
  }
};

// Calls `take(i, k, piece)` for the lane's V-sized pieces of chunk `c` of row `r` (the
// last chunk of a row may be partial): piece k of the chunk is the lane's i-th.
template <typename F, typename V, int ITEMS, int PER_CHUNK, typename Take>
static __device__ __forceinline__ void chunk_pieces(const uint8_t *__restrict__ w, int nb,
                                                    int row_loads, int r, int c, int lane,
                                                    Take take) {
  const V *src = (const V *)(w + (size_t)r * nb * F::BYTES) + c * PER_CHUNK;
  const int left = row_loads - c * PER_CHUNK;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int k = lane + 32 * i;
    if (k < PER_CHUNK && k < left) take(i, k, src + k);
  }
}

// Loads chunk `c` of row `r` into the lane's registers.
template <typename F, typename V, int ITEMS, int PER_CHUNK>
static __device__ __forceinline__ void fetch_chunk(const uint8_t *__restrict__ w, int nb,
                                                   int row_loads, int r, int c, int lane,
                                                   V *regs) {
  chunk_pieces<F, V, ITEMS, PER_CHUNK>(
      w, nb, row_loads, r, c, lane, [&](int i, int, const V *piece) { regs[i] = __ldcs(piece); });
}

// The lanes' work on chunk `c` of a row, staged at `staged`: its scales decoded once into
// the warp's table (lane l does half l % 2 of block l / 2), then the dot products, lanes
// 0-15 on the even block of each pair and 16-31 on the odd one.
template <typename F, int N>
static __device__ __forceinline__ void chunk_dots(const uint8_t *staged, typename F::Table &table,
                                                  int c, int nb, int lane,
                                                  const int8_t *__restrict__ x_qs,
                                                  const float2 *__restrict__ x_ds, int x_stride,
                                                  float *sum) {
  const int blocks = min(MV_BLOCKS, nb - c * MV_BLOCKS);
  const int pb = lane >> 1;
  if (pb < blocks) F::prepare(staged + pb * F::BYTES, pb, lane & 1, table);
  __syncwarp();
#pragma unroll 2
  for (int b = lane >> 4; b < blocks; b += 2) {
    const size_t at = (size_t)(c * MV_BLOCKS + b) * 16 + (lane & 15);
    F::template dot<N>(staged, table, b, lane & 15, x_qs, x_ds, x_stride, at, sum);
  }
}

// A row done: its N sums, summed over the warp, written by lane 0; the sums start again.
template <int N>
static __device__ __forceinline__ void row_done(float *sum, float *__restrict__ out, int row,
                                                int out_stride, int lane) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float total = warp_sum(sum[j]);
    if (lane == 0) out[(size_t)j * out_stride + row] = total;
    sum[j] = 0.0f;
  }
}

// The product of format F for N activation rows, loading V-sized pieces (V divides the row's
// bytes and its start is aligned to it: the launcher checks). Grid: at most ceil(rows /
// MV_WARPS) blocks of MV_WARPS warps, as many as fit on the GPU at once (the launcher
// asks the driver): warp k of the grid takes rows k, k + the grid's warps, ... and sees
// them as one stream of chunks, the next chunk's loads (of this row or its next one) in
// flight while its lanes compute on the current one. With a block per 4 rows instead, a
// large matrix ran in waves whose warps all loaded, then all computed, together.
template <typename F, int N, typename V>
static __device__ __forceinline__ void mat_vec(const uint8_t *__restrict__ w,
                                               const int8_t *__restrict__ x_qs,
                                               const float2 *__restrict__ x_ds,
                                               float *__restrict__ out, int cols, int rows,
                                               int x_stride, int out_stride) {
  constexpr int CHUNK = MV_BLOCKS * F::BYTES;
  static_assert(CHUNK % sizeof(V) == 0, "a chunk is whole loads");
  constexpr int PER_CHUNK = CHUNK / (int)sizeof(V);
  constexpr int ITEMS = (PER_CHUNK + 31) / 32;
  // 16 bytes past the chunk: `load_words` may read one aligned word beyond a block.
  __shared__ __align__(16) uint8_t stage[MV_WARPS][CHUNK + 16];
  __shared__ typename F::Table tables[MV_WARPS];
  pdl_launch_dependents();  // a product after this one may start (`pdl_wait`)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_step = (int)gridDim.x * MV_WARPS;
  int row = blockIdx.x * MV_WARPS + warp;
  if (row >= rows) return;  // the whole warp: nothing below synchronizes the block
  const int nb = cols / 256;
  const int row_loads = nb * F::BYTES / (int)sizeof(V);
  const int n_chunks = (nb + MV_BLOCKS - 1) / MV_BLOCKS;
  V *staged = (V *)stage[warp];
  typename F::Table &table = tables[warp];
  V regs[ITEMS];
  fetch_chunk<F, V, ITEMS, PER_CHUNK>(w, nb, row_loads, row, 0, lane, regs);
  pdl_wait();  // the weights are nobody's output; the activations and `out` are
  float sum[N];
#pragma unroll
  for (int j = 0; j < N; ++j) sum[j] = 0.0f;
  for (int c = 0;;) {
    __syncwarp();  // every lane is done with the previous chunk and its table
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int k = lane + 32 * i;
      if (k < PER_CHUNK && c * PER_CHUNK + k < row_loads) staged[k] = regs[i];
    }
    __syncwarp();
    // The warp's next chunk: the rest of this row, then its next row.
    const bool last_chunk = c + 1 == n_chunks;
    const int next_row = last_chunk ? row + row_step : row, next_c = last_chunk ? 0 : c + 1;
    if (next_row < rows)
      fetch_chunk<F, V, ITEMS, PER_CHUNK>(w, nb, row_loads, next_row, next_c, lane, regs);
    chunk_dots<F, N>(stage[warp], table, c, nb, lane, x_qs, x_ds, x_stride, sum);
    if (last_chunk) {
      row_done<N>(sum, out, row, out_stride, lane);
      row = next_row;
      if (row >= rows) break;
    }
    c = next_c;
  }
}

// Copies of `sizeof(V)` bytes (4, 8 or 16) from global to shared memory that do not pass
// through registers (`cp.async`, compute capability 8.0 on), in groups: a group is closed by
// `copy_async_commit`, and `copy_async_wait<K>` returns once at most the newest K groups
// this thread closed are still in flight. The copied bytes are visible to the thread's
// warp after the wait and a `__syncwarp`. Before 8.0, plain loads and stores. (In
// `tests/cuda_emu`, the shim's stand-ins write the bytes at the wait and garbage at the
// copy, so a kernel that reads a stage too early, or refills one still read, fails there.)
#ifdef __CUDACC__
template <typename V>
static __device__ __forceinline__ void copy_async(V *dst, const V *src) {
  static_assert(sizeof(V) == 4 || sizeof(V) == 8 || sizeof(V) == 16, "cp.async sizes");
#if __CUDA_ARCH__ >= 800
  const unsigned to = (unsigned)__cvta_generic_to_shared(dst);
  if constexpr (sizeof(V) == 16) {
    // Weights are read once: bypass L1 (`.cg`, which takes 16 bytes only).
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(src) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(to), "l"(src),
                 "n"((int)sizeof(V))
                 : "memory");
  }
#else
  *dst = __ldcs(src);
#endif
}

static __device__ __forceinline__ void copy_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int K>
static __device__ __forceinline__ void copy_async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(K) : "memory");
#endif
}
#endif

// Copies chunk `c` of row `r` into a warp's stage, as one group.
template <typename F, typename V, int ITEMS, int PER_CHUNK>
static __device__ __forceinline__ void fetch_chunk_async(const uint8_t *__restrict__ w, int nb,
                                                         int row_loads, int r, int c, int lane,
                                                         V *stage) {
  chunk_pieces<F, V, ITEMS, PER_CHUNK>(w, nb, row_loads, r, c, lane,
                                       [&](int, int k, const V *piece) {
                                         copy_async(stage + k, piece);
                                       });
  copy_async_commit();
}

// `mat_vec` with the weights copied into shared memory by `cp.async`, STAGES chunks per warp:
// STAGES - 1 of them in flight while the lanes compute on one. The same warps, rows,
// chunks, tables and arithmetic as `mat_vec` (so the same sums, bit for bit); what differs
// is where a chunk waits for its turn. `mat_vec` holds the next chunk in registers (20 of
// them per lane for Q4_K, 28 for Q6_K, plus the stores that move it into shared memory),
// which cost occupancy: on the H200, 96 registers a lane held the Q6_K kernel at 5 blocks
// per multiprocessor. Here the copies cost no registers and no stores, and more than one
// chunk can be in flight; the shared memory they take caps occupancy instead. Which one
// is faster for a matrix is measured when a plan is built (`DecodePlan::tune`).
template <typename F, int N, typename V, int STAGES>
static __device__ __forceinline__ void mat_vec_async(const uint8_t *__restrict__ w,
                                                     const int8_t *__restrict__ x_qs,
                                                     const float2 *__restrict__ x_ds,
                                                     float *__restrict__ out, int cols,
                                                     int rows, int x_stride, int out_stride) {
  constexpr int CHUNK = MV_BLOCKS * F::BYTES;
  static_assert(CHUNK % sizeof(V) == 0, "a chunk is whole loads");
  static_assert(STAGES >= 2, "a chunk in flight while one is computed on");
  constexpr int PER_CHUNK = CHUNK / (int)sizeof(V);
  constexpr int ITEMS = (PER_CHUNK + 31) / 32;
  // 16 bytes past the chunk (`load_words` may read one aligned word beyond a block), and
  // each stage 16-byte aligned.
  constexpr int STAGE_BYTES = (CHUNK + 16 + 15) / 16 * 16;
  __shared__ __align__(16) uint8_t stage[MV_WARPS][STAGES][STAGE_BYTES];
  __shared__ typename F::Table tables[MV_WARPS];
  pdl_launch_dependents();  // a product after this one may start (`pdl_wait`)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_step = (int)gridDim.x * MV_WARPS;
  int row = blockIdx.x * MV_WARPS + warp;
  if (row >= rows) return;  // the whole warp: nothing below synchronizes the block
  const int nb = cols / 256;
  const int row_loads = nb * F::BYTES / (int)sizeof(V);
  const int n_chunks = (nb + MV_BLOCKS - 1) / MV_BLOCKS;
  typename F::Table &table = tables[warp];
  // The warp's stream of chunks: those of its first row, then of its next one, ... The
  // next one to copy is chunk `fc` of row `fetch_row`; each copy is a group (an empty one
  // past the warp's last row), so that the wait below counts chunks.
  int fetch_row = row, fc = 0;
  const auto fetch_next = [&](int s) {
    if (fetch_row < rows)
      fetch_chunk_async<F, V, ITEMS, PER_CHUNK>(w, nb, row_loads, fetch_row, fc, lane,
                                                (V *)stage[warp][s]);
    else
      copy_async_commit();
    if (++fc == n_chunks) {
      fc = 0;
      fetch_row += row_step;
    }
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) fetch_next(s);
  pdl_wait();  // the weights are nobody's output; the activations and `out` are
  float sum[N];
#pragma unroll
  for (int j = 0; j < N; ++j) sum[j] = 0.0f;
  int s = 0;  // the stage of chunk `c` of `row`
  for (int c = 0;;) {
    __syncwarp();  // every lane is done with the previous chunk's stage and the table
    fetch_next(s == 0 ? STAGES - 1 : s - 1);  // into the stage the previous chunk used
    copy_async_wait<STAGES - 1>();  // this lane's copies of chunk c are done...
    __syncwarp();                   // ...and every lane's
    chunk_dots<F, N>(stage[warp][s], table, c, nb, lane, x_qs, x_ds, x_stride, sum);
    s = s + 1 == STAGES ? 0 : s + 1;
    if (++c == n_chunks) {
      row_done<N>(sum, out, row, out_stride, lane);
      row += row_step;
      if (row >= rows) break;
      c = 0;
    }
  }
  // Only empty groups can be left (chunks past the warp's last row), but a kernel should
  // not end with copies it issued still in flight.
  copy_async_wait<0>();
}

// The kernels the decode step loads by name: `{name}_n{N}` for N = 1..8 activation rows.
template <typename F, typename V>
struct Staged {
  template <int N>
  static __device__ __forceinline__ void run(const uint8_t *w, const int8_t *x_qs,
                                             const float2 *x_ds, float *out, int cols, int rows,
                                             int x_stride, int out_stride) {
    mat_vec<F, N, V>(w, x_qs, x_ds, out, cols, rows, x_stride, out_stride);
  }
};
template <typename F, typename V, int STAGES>
struct Async {
  template <int N>
  static __device__ __forceinline__ void run(const uint8_t *w, const int8_t *x_qs,
                                             const float2 *x_ds, float *out, int cols, int rows,
                                             int x_stride, int out_stride) {
    mat_vec_async<F, N, V, STAGES>(w, x_qs, x_ds, out, cols, rows, x_stride, out_stride);
  }
};
#define MV_ENTRY(name, N, ...)                                                               \
  extern "C" __global__ void __launch_bounds__(MV_WARPS * 32)                                \
      name##_n##N(const uint8_t *w, const int8_t *x_qs, const float2 *x_ds, float *out,      \
                  int cols, int rows, int x_stride, int out_stride) {                        \
    __VA_ARGS__::template run<N>(w, x_qs, x_ds, out, cols, rows, x_stride, out_stride);      \
  }
#define MV_ALL(name, ...)                                                                    \
  MV_ENTRY(name, 1, __VA_ARGS__)                                                             \
  MV_ENTRY(name, 2, __VA_ARGS__)                                                             \
  MV_ENTRY(name, 3, __VA_ARGS__)                                                             \
  MV_ENTRY(name, 4, __VA_ARGS__)                                                             \
  MV_ENTRY(name, 5, __VA_ARGS__)                                                             \
  MV_ENTRY(name, 6, __VA_ARGS__)                                                             \
  MV_ENTRY(name, 7, __VA_ARGS__)                                                             \
  MV_ENTRY(name, 8, __VA_ARGS__)
// Registers staged (`mat_vec`): every format and load width.
MV_ALL(mv_q4k_v16, Staged<Q4K, uint4>)
MV_ALL(mv_q6k_v16, Staged<Q6K, uint4>)
MV_ALL(mv_q6k_v8, Staged<Q6K, uint2>)
MV_ALL(mv_q6k_v4, Staged<Q6K, unsigned int>)
MV_ALL(mv_q6k_v2, Staged<Q6K, unsigned short>)
MV_ALL(mv_q8_0_v16, Staged<Q8_0, uint4>)
// Copied by `cp.async` (`mat_vec_async`), with 2 or 3 stages per warp: the load widths
// `cp.async` takes (16, 8, 4 bytes). Three stages of Q8_0's 4,352-byte chunks would pass the
// 48 KiB of static shared memory a block may have.
MV_ALL(mv_q4k_v16_a2, Async<Q4K, uint4, 2>)
MV_ALL(mv_q4k_v16_a3, Async<Q4K, uint4, 3>)
MV_ALL(mv_q6k_v16_a2, Async<Q6K, uint4, 2>)
MV_ALL(mv_q6k_v16_a3, Async<Q6K, uint4, 3>)
MV_ALL(mv_q6k_v8_a2, Async<Q6K, uint2, 2>)
MV_ALL(mv_q6k_v8_a3, Async<Q6K, uint2, 3>)
MV_ALL(mv_q6k_v4_a2, Async<Q6K, unsigned int, 2>)
MV_ALL(mv_q6k_v4_a3, Async<Q6K, unsigned int, 3>)
MV_ALL(mv_q8_0_v16_a2, Async<Q8_0, uint4, 2>)
