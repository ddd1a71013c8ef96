// The glue of a decode step on an NVIDIA GPU (`cuda_decode.rs` launches these): every op of
// a transformer layer between its matrix products, fused so that a step of one to eight
// sequences at one token each is about nine kernels per layer instead of about thirty
// candle ops. The matrix products (candle's `mmvq`, or ours for Q4_K, Q6_K and Q8_0 in
// `cuda_matvec.cuh`) read activations as 32-value Q8_1 blocks: the kernels here that feed a
// product write those blocks directly, laid out and rounded exactly as candle's
// `quantize_q8_1` writes them, and in our own layout beside them (`Q8Rows`).
//
// Conventions: activations are f32 rows (one per sequence); keys and values are f16 in each
// sequence's own cache, `(kv_heads, capacity, head_dim)` per layer; a step's per-row facts
// (position, capacity, cache addresses) live in device memory, written once per step.

#include <cuda_fp16.h>
#include <stdint.h>

#define MAX_ROWS 8
#define MAX_GROUP 8

#include "cuda_common.cuh"

// Per row (block): x = x_in (+ delta); x_out = x (when given; may be x_in); then
// rmsnorm(x) * w quantized into the row's Q8_1 blocks, in both layouts (`q8_stride` blocks,
// the ones past `n` zero). One block per row.
extern "C" __global__ void rms_norm_q8(const float *x_in, const float *delta, float *x_out,
                                       const float *__restrict__ w, block_q8_1 *__restrict__ q8,
                                       int8_t *__restrict__ x_qs, float2 *__restrict__ x_ds,
                                       int n, int q8_stride, float eps) {
  pdl_launch_dependents();  // the product after this may start (`pdl_wait`)
  __shared__ float red[33];
  const int row = blockIdx.x;
  const float *xi = x_in + (size_t)row * n;
  const float *di = delta ? delta + (size_t)row * n : nullptr;
  float *xo = x_out ? x_out + (size_t)row * n : nullptr;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float v = xi[i];
    if (di) v += di[i];
    if (xo) xo[i] = v;
    ss += v * v;
  }
  // block_sum's barriers also make this block's writes of x_out visible to all its threads.
  const float scale = rsqrtf(block_sum(ss, red) / (float)n + eps);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const Q8Rows out{q8, x_qs, x_ds};
  for (int b = warp; b < q8_stride; b += n_warps) {
    const int i = b * 32 + lane;
    float v = 0.0f;
    if (i < n) {
      v = xo ? xo[i] : (xi[i] + (di ? di[i] : 0.0f));
      v = v * scale * w[i];
    }
    quantize_warp(v, out, (size_t)row * q8_stride + b);
  }
}

// Attention of one token per row over its cache, split over positions (flash-decoding):
// block (kv head, split, row) takes positions [split * split_len, ...) of the row's
// pos + 1, for all the query heads that share the KV head, and the row's heads' outputs
// are quantized into Q8_1 blocks in both layouts for the output projection. With one split
// (`n_split == 1`, short contexts) the block finishes the softmax itself. With several, each
// leaves for each head its max score, its sum of exponentials and its unnormalised sum of
// values in `part_*`, and the last block of the (kv head, row) to finish, counted in
// `counts`, joins them: no second launch either way. `split_len` is read from
// `facts[2 * MAX_ROWS]`, so a captured graph serves every length with the same number of
// splits.
//
// It starts from the row's q/k/v projections (`qkv`: all query heads, then the key heads,
// then the value heads, `qkv_stride` floats apart), not from a kernel of their own that
// would cost a launch per layer for a few microseconds of work (`rope_heads`): each block
// norms (Qwen3), rotates and scales its group's query heads into shared memory, and the
// block whose split holds the row's position also norms and rotates the key head and
// stores it with the value head in f16 at that position of the row's cache, before any
// thread reads the cache.
//
// Positions go in chunks of 128. Scores: each thread scores one position for every query
// head of the group (its key row read once, KB 16-byte loads in flight at a time); the
// chunk's softmax runs in shared memory, leaving each position's weights for all heads
// side by side (`w_s`). Values: each thread owns VEC consecutive value indices (one 8-byte
// load of a value row) and accumulates them for every head of the group at once (a load
// feeds group x VEC FMAs); the block covers a value row PHASES times over, phase p taking
// the chunk's positions p, p + PHASES, ... (VB loads in flight before their FMAs), and the
// phases are added through shared memory at the end (the online-softmax rescale is linear,
// so each phase's accumulator is rescaled on its own). The loads of a chunk's first keys
// are issued before the barrier that opens it, overlapping the previous chunk's last FMAs.
// Block: 128 threads; head_dim D = 64, 128 or 256.

// The q/k/v projections of one row and what turns them into attention's inputs.
struct Projections {
  const float *qkv;  // the row's heads, `stride` floats per row
  int stride;
  const float *q_norm, *k_norm;  // Qwen3's, or null
  const float *cos_t, *sin_t;    // (position, D / 2) tables
  float eps, q_scale;
  int neox;  // rotation pairs (j, j + D/2), else (2j, 2j + 1)
};

// The warp's lanes norm and rotate head `h` of the row (at position p, `D / 64` rotation
// pairs a lane) and give each rotated value to `put(index, value)`. Every lane calls it.
template <int D, class Put>
static __device__ __forceinline__ void rope_head(const Projections &pr, int row, int h,
                                                 const float *__restrict__ norm, int p,
                                                 Put put) {
  constexpr int PAIRS = D / 64;
  const int lane = threadIdx.x & 31;
  const float *src = pr.qkv + (size_t)row * pr.stride + (size_t)h * D;
  float a[PAIRS], b[PAIRS];
  float ss = 0.0f;
#pragma unroll
  for (int m = 0; m < PAIRS; ++m) {
    const int j = lane + 32 * m, i0 = pr.neox ? j : 2 * j, i1 = pr.neox ? j + D / 2 : 2 * j + 1;
    a[m] = src[i0];
    b[m] = src[i1];
    ss += a[m] * a[m] + b[m] * b[m];
  }
  const float scale = norm ? rsqrtf(warp_sum(ss) / (float)D + pr.eps) : 1.0f;
#pragma unroll
  for (int m = 0; m < PAIRS; ++m) {
    const int j = lane + 32 * m, i0 = pr.neox ? j : 2 * j, i1 = pr.neox ? j + D / 2 : 2 * j + 1;
    float x0 = a[m], x1 = b[m];
    if (norm) {
      x0 = x0 * scale * norm[i0];
      x1 = x1 * scale * norm[i1];
    }
    const float c = pr.cos_t[(size_t)p * (D / 2) + j], s = pr.sin_t[(size_t)p * (D / 2) + j];
    put(i0, x0 * c - x1 * s);
    put(i1, x0 * s + x1 * c);
  }
}

// Attention's inputs for block (kv head hk, this split, row) at the row's position p: the
// group's query heads into `q_s`, and, when `store`, the key and value heads into the
// row's caches (`keys`, `values`: this KV head's, at position 0). A warp per head.
template <int D>
static __device__ void rope_heads(const Projections &pr, int row, int hk, int group, int n_head,
                                  int n_kv, int p, bool store, float (*q_s)[D], half *keys,
                                  half *values) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const int heads = group + (store ? 2 : 0);
  for (int k = warp; k < heads; k += n_warps) {
    if (k < group) {
      rope_head<D>(pr, row, hk * group + k, pr.q_norm, p,
                   [&](int i, float v) { q_s[k][i] = v * pr.q_scale; });
    } else if (k == group) {
      half *key = keys + (size_t)p * D;
      rope_head<D>(pr, row, n_head + hk, pr.k_norm, p,
                   [&](int i, float v) { key[i] = __float2half(v); });
    } else {
      const float *src = pr.qkv + (size_t)row * pr.stride + (size_t)(n_head + n_kv + hk) * D;
      half *value = values + (size_t)p * D;
      for (int i = lane; i < D; i += 32) value[i] = __float2half(src[i]);
    }
  }
}

template <int D>
static __device__ void attn_partial(const Projections &pr, const int *__restrict__ facts,
                                    const unsigned long long *__restrict__ kv, int layer,
                                    int n_head, int n_kv, int n_split,
                                    float *__restrict__ part_acc, float *__restrict__ part_ml,
                                    unsigned *__restrict__ counts, Q8Rows out, int q8_stride) {
  constexpr int CHUNK = 128;
  constexpr int KB = D / 8 < 8 ? D / 8 : 8;  // a key row is D / 8 uint4 loads
  constexpr int VEC = 4, LANES = D / VEC, PHASES = CHUNK / LANES;  // PHASES: 8, 4 or 2
  constexpr int VB = 16;  // VB * PHASES divides CHUNK: a batch never passes the chunk's end
  static_assert(VEC == 4 && MAX_GROUP == 8, "the value phase's loads and weights assume these");
  __shared__ float q_s[MAX_GROUP][D];
  __shared__ float sc[MAX_GROUP][CHUNK];
  __shared__ __align__(16) float w_s[CHUNK][MAX_GROUP];
  __shared__ __align__(16) float o_s[PHASES][MAX_GROUP][D];
  __shared__ float s_m[MAX_GROUP], s_l[MAX_GROUP], s_corr[MAX_GROUP];
  const int hk = blockIdx.x, split = blockIdx.y, row = blockIdx.z, t = threadIdx.x;
  const int lane = t & 31, warp = t >> 5;
  const int phase = t / LANES, vi = (t % LANES) * VEC;  // value phase: positions, indices
  const int group = n_head / n_kv;
  const int len = facts[row] + 1, cap = facts[MAX_ROWS + row], split_len = facts[2 * MAX_ROWS];
  const int start = split * split_len, end = min(len, start + split_len);
  const unsigned long long *slot = kv + ((size_t)layer * MAX_ROWS + row) * 2;
  const size_t head_off = (size_t)hk * cap * D;
  half *const keys = (half *)slot[0] + head_off;
  half *const values = (half *)slot[1] + head_off;

  // The row's newest position is this split's (a condition the whole block shares).
  const bool store = start <= len - 1 && len - 1 < start + split_len;
  rope_heads<D>(pr, row, hk, group, n_head, n_kv, len - 1, store, q_s, keys, values);
  if (t < MAX_GROUP) {
    s_m[t] = -INFINITY;
    s_l[t] = 0.0f;
  }
  // The key and value just stored are read by other threads of the block (global writes
  // are visible within the block after a barrier); the query reaches them through the
  // barrier that opens the first chunk.
  if (store) __syncthreads();
  float acc[MAX_GROUP][VEC];
#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g)
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[g][k] = 0.0f;

  for (int c0 = start; c0 < end; c0 += CHUNK) {
    const int n = min(CHUNK, end - c0);
    // 1. Scores: thread t takes position c0 + t for every query head of the group.
    const uint4 *k_row = (const uint4 *)(keys + (size_t)(c0 + t) * D);
    uint4 raw[KB];
    if (t < n) {
#pragma unroll
      for (int c = 0; c < KB; ++c) raw[c] = k_row[c];
    }
    // The query (first chunk) is in `q_s`; every thread is done with the previous chunk's
    // `sc`, `w_s` and `s_corr`.
    __syncthreads();
    float s[MAX_GROUP];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) s[g] = 0.0f;
#pragma unroll
    for (int c0k = 0; c0k < D / 8; c0k += KB) {
      if (t >= n) break;
      if (c0k > 0) {
#pragma unroll
        for (int c = 0; c < KB; ++c) raw[c] = k_row[c0k + c];
      }
#pragma unroll
      for (int c = 0; c < KB; ++c) {
        const half2 *h = (const half2 *)&raw[c];
        float k[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = __half22float2(h[j]);
          k[2 * j] = f.x;
          k[2 * j + 1] = f.y;
        }
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g) {
          if (g >= group) break;
#pragma unroll
          for (int j = 0; j < 8; ++j) s[g] += q_s[g][(c0k + c) * 8 + j] * k[j];
        }
      }
    }
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      if (g >= group) break;
      sc[g][t] = t < n ? s[g] : -INFINITY;
    }
    __syncthreads();
    // 2. The chunk's softmax step: warp w takes heads w, w + 4; the weights past the
    // chunk's n positions are 0, so that the value phase needs no bound on them.
    for (int g = warp; g < group; g += CHUNK / 32) {
      float mx = -INFINITY;
      for (int j = lane; j < n; j += 32) mx = fmaxf(mx, sc[g][j]);
      mx = warp_max(mx);
      const float m_old = s_m[g], m_new = fmaxf(m_old, mx);
      float sum = 0.0f;
      for (int j = lane; j < CHUNK; j += 32) {
        const float e = j < n ? expf(sc[g][j] - m_new) : 0.0f;
        w_s[j][g] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float corr = expf(m_old - m_new);  // 0 while m_old is -inf
        s_corr[g] = corr;
        s_l[g] = s_l[g] * corr + sum;
        s_m[g] = m_new;
      }
    }
    __syncthreads();
    // 3. Values: this thread's VEC indices at positions phase, phase + PHASES, ... for
    // every head of the group.
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      if (g >= group) break;
      const float corr = s_corr[g];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[g][k] *= corr;
    }
    const uint2 *v_col = (const uint2 *)(values + (size_t)c0 * D + vi);
    for (int j0 = phase; j0 < n; j0 += VB * PHASES) {
      uint2 v[VB];
#pragma unroll
      for (int b = 0; b < VB; ++b) {
        const int j = j0 + b * PHASES;
        v[b] = j < n ? v_col[(size_t)j * (D / VEC)] : make_uint2(0, 0);
      }
#pragma unroll
      for (int b = 0; b < VB; ++b) {
        const int j = j0 + b * PHASES;
        const half2 *h = (const half2 *)&v[b];
        const float2 lo = __half22float2(h[0]), hi = __half22float2(h[1]);
        const float x[VEC] = {lo.x, lo.y, hi.x, hi.y};
        const float4 wa = *(const float4 *)&w_s[j][0];
        const float4 wb = group > 4 ? *(const float4 *)&w_s[j][4] : make_float4(0, 0, 0, 0);
        const float w[MAX_GROUP] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g) {
          if (g >= group) break;
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[g][k] += w[g] * x[k];
        }
      }
    }
  }
  // The phases' sums, added with each warp holding 32 consecutive values of one head.
#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g) {
    if (g >= group) break;
    *(float4 *)&o_s[phase][g][vi] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
  }
  __syncthreads();
  const size_t block0 = (size_t)row * q8_stride + (size_t)hk * group * D / 32;
  // With one split the heads' outputs, quantized; with several, this split's partial sums,
  // and then, in whichever block of the group's splits ends last, the join (one launch per
  // layer fewer than a kernel of its own). group * D is a multiple of 32: a warp's lanes
  // run this loop together.
  const size_t first = ((size_t)row * n_head + hk * group) * n_split;
  for (int idx = t; idx < group * D; idx += CHUNK) {
    const int g = idx / D, i = idx % D;
    float a = o_s[0][g][i];
#pragma unroll
    for (int p = 1; p < PHASES; ++p) a += o_s[p][g][i];
    if (n_split == 1)
      quantize_warp(a / s_l[g], out, block0 + idx / 32);
    else
      part_acc[(first + (size_t)g * n_split + split) * D + i] = a;
  }
  if (n_split == 1) return;
  if (t < group) {
    part_ml[(first + (size_t)t * n_split + split) * 2] = s_m[t];
    part_ml[(first + (size_t)t * n_split + split) * 2 + 1] = s_l[t];
  }
  // The classic last-block pattern: every thread's writes are made visible to the whole
  // GPU before the block counts itself done; the block that brings the count to n_split
  // reads every split's sums from L2 (`__ldcg`: another multiprocessor's writes may be
  // stale in this one's L1) and sets the count back to 0 for the next launch.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  unsigned *count = counts + (size_t)row * n_kv + hk;
  if (t == 0) last = atomicAdd(count, 1u) == (unsigned)n_split - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  // The join, with the chunk loop's shared memory free: per head, each split's weight
  // exp(m - max) (0 past the row's end) into `sc` and their sum of exponentials into `s_l`,
  // a lane per split (n_split <= 32); then each thread sums four values of a head over the
  // splits, 8 loads in flight, into `o_s[0]`, from where warps quantize 32 values each.
  static_assert(CHUNK >= 32, "a split's weight per lane");
  for (int g = warp; g < group; g += CHUNK / 32) {
    const float *ml = part_ml + (first + (size_t)g * n_split) * 2;
    const float m = lane < n_split ? __ldcg(ml + 2 * lane) : -INFINITY;
    const float l = lane < n_split ? __ldcg(ml + 2 * lane + 1) : 0.0f;
    const float mx = warp_max(m);  // split 0 holds position 0: never -inf
    const float f = m == -INFINITY ? 0.0f : expf(m - mx);
    const float sum_l = warp_sum(l * f);
    sc[g][lane] = f;
    if (lane == 0) s_l[g] = sum_l;
  }
  __syncthreads();
  for (int slot = t; slot < group * D / 4; slot += CHUNK) {
    const int g = slot / (D / 4), i = slot % (D / 4) * 4;
    const float4 *acc4 = (const float4 *)(part_acc + (first + (size_t)g * n_split) * D + i);
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int s0 = 0; s0 < n_split; s0 += 8) {
      float4 a[8];
#pragma unroll
      for (int k = 0; k < 8; ++k)
        a[k] = s0 + k < n_split ? __ldcg(acc4 + (size_t)(s0 + k) * (D / 4))
                                : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float f = s0 + k < n_split ? sc[g][s0 + k] : 0.0f;
        sum = make_float4(sum.x + a[k].x * f, sum.y + a[k].y * f, sum.z + a[k].z * f,
                          sum.w + a[k].w * f);
      }
    }
    const float inv = 1.0f / s_l[g];
    *(float4 *)&o_s[0][g][i] = make_float4(sum.x * inv, sum.y * inv, sum.z * inv, sum.w * inv);
  }
  __syncthreads();
  for (int idx = t; idx < group * D; idx += CHUNK)
    quantize_warp(o_s[0][idx / D][idx % D], out, block0 + idx / 32);
  if (t == 0) *count = 0;
}

#define ATTN_PARTIAL(D)                                                                      \
  extern "C" __global__ void __launch_bounds__(128) attn_partial_d##D(                       \
      const float *qkv, int qkv_stride, const float *q_norm, const float *k_norm,             \
      const float *cos_t, const float *sin_t, float eps, float q_scale, int neox,             \
      const int *facts, const unsigned long long *kv, int layer, int n_head, int n_kv,         \
      int n_split, float *part_acc, float *part_ml, unsigned *counts, block_q8_1 *q8,         \
      int8_t *x_qs, float2 *x_ds, int q8_stride) {                                           \
    pdl_launch_dependents(); /* the output projection may start (`pdl_wait`) */              \
    const Projections pr{qkv, qkv_stride, q_norm, k_norm, cos_t, sin_t, eps, q_scale, neox}; \
    attn_partial<D>(pr, facts, kv, layer, n_head, n_kv, n_split, part_acc, part_ml, counts,  \
                    Q8Rows{q8, x_qs, x_ds}, q8_stride);                                      \
  }
ATTN_PARTIAL(64)
ATTN_PARTIAL(128)
ATTN_PARTIAL(256)

// SwiGLU, quantized: per row, act = silu(gate) * up over `n_ff` values (gate at 0, up at
// n_ff in a row of `gu_stride` floats), written as Q8_1 blocks in both layouts (`q8_stride`
// per row, the ones past n_ff zero). One warp per block of 32; grid:
// (ceil(q8_stride / 8), rows), block: 256 threads.
extern "C" __global__ void silu_mul_q8(const float *__restrict__ gu, int gu_stride, int n_ff,
                                       block_q8_1 *__restrict__ q8, int8_t *__restrict__ x_qs,
                                       float2 *__restrict__ x_ds, int q8_stride) {
  pdl_launch_dependents();  // the down projection may start (`pdl_wait`)
  const int row = blockIdx.y, lane = threadIdx.x & 31;
  const int b = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (b >= q8_stride) return;
  const int i = b * 32 + lane;
  float v = 0.0f;
  if (i < n_ff) {
    const float g = gu[(size_t)row * gu_stride + i], u = gu[(size_t)row * gu_stride + n_ff + i];
    v = g / (1.0f + expf(-g)) * u;
  }
  quantize_warp(v, Q8Rows{q8, x_qs, x_ds}, (size_t)row * q8_stride + b);
}

#include "cuda_matvec.cuh"
#include "cuda_norm.cuh"
