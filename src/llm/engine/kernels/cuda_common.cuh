// What the decode step's kernels (`cuda_decode.cu`) and its matrix kernels
// (`cuda_matvec.cuh`) share: the two layouts of 8-bit activations, the warp and block
// reductions, and the quantization that writes activations. Included after <cuda_fp16.h> and
// <stdint.h> (or, in `tests/cuda_emu`, after their CPU stand-ins).

#pragma once

// Programmatic dependent launch (compute capability 9.0 on): a kernel launched as a
// programmatic dependent of the one before it (`DecodePlan`'s `pdl`, our matrix kernels
// only) may start once every block of that one has called `pdl_launch_dependents` (or
// ended), and must call `pdl_wait` before it reads what that one writes, or writes
// anything: `pdl_wait` returns once that kernel, and so everything before it, is done and
// its writes are visible. Launched plainly, both are no-ops. The kernels that come before
// our matrix kernels in a step call `pdl_launch_dependents` first thing, so that the
// product's blocks can take the GPU's idle multiprocessors and load their first weights
// (which nothing writes) while the small kernel before them runs. (`tests/cuda_emu` runs
// kernels one after another: its stand-ins do nothing.)
#ifdef __CUDACC__
static __device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}

static __device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
#endif

// candle's block_q8_1: d and the sum of the 32 values (before rounding) as two halves,
// then the 32 quantized values.
struct block_q8_1 {
  half2 ds;
  int8_t qs[32];
};

static __device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) x += __shfl_xor_sync(0xffffffff, x, mask);
  return x;
}

static __device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, mask));
  return x;
}

// The sum over a whole block (every thread must call it); `red` holds 33 floats.
static __device__ float block_sum(float v, float *red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < n_warps ? red[lane] : 0.0f;
    w = warp_sum(w);
    if (lane == 0) red[32] = w;
  }
  __syncthreads();
  return red[32];
}

// A product's 8-bit activations, written in two layouts, block `i` (32 values) of each:
// candle's blocks (`blocks[i]`, for its `mmvq`) and ours (for `cuda_matvec.cuh`): the 32
// quants contiguous at `qs[32 i]`, so that a warp reads 512 consecutive bytes with one
// 16-byte load per lane, and per 16 values `ds[2 i + k]` = (d, d * the sum of those 16
// quants), d rounded to half as in candle's block, so both layouts give the same numbers.
struct Q8Rows {
  block_q8_1 *blocks;
  int8_t *qs;
  float2 *ds;
};

// Block `block`'s scales, from the thread that writes them: with `ours`, (d, d * q_sum)
// for its 16 values `half16` in our layout; with `theirs`, candle's (d, sum of the values).
static __device__ __forceinline__ void write_scales(Q8Rows out, size_t block, float d,
                                                    float sum, int q_sum, int half16, bool ours,
                                                    bool theirs) {
  const half d_half = __float2half(d);
  if (ours) {
    const float dh = __half2float(d_half);
    out.ds[block * 2 + half16] = make_float2(dh, dh * (float)q_sum);
  }
  if (theirs) {
    block_q8_1 *b = out.blocks + block;
    reinterpret_cast<half &>(b->ds.x) = d_half;
    reinterpret_cast<half &>(b->ds.y) = __float2half(sum);
  }
}

// One warp quantizes the 32 values its lanes hold (one each) into block `block` of `out`,
// as candle's `mmvq_gguf_quantize_q8_1_f32` does, and into our layout.
static __device__ __forceinline__ void quantize_warp(float v, Q8Rows out, size_t block) {
  const int lane = threadIdx.x & 31;
  const float amax = warp_max(fabsf(v));
  const float sum = warp_sum(v);
  const float d = amax / 127.0f;
  const int8_t q = (amax == 0.0f) ? 0 : (int8_t)roundf(v / d);
  block_q8_1 *b = out.blocks + block;
  b->qs[lane] = q;
  out.qs[block * 32 + lane] = q;
  int q_sum = q;  // over lanes 0-15 and 16-31 apart
#pragma unroll
  for (int mask = 8; mask > 0; mask >>= 1) q_sum += __shfl_xor_sync(0xffffffff, q_sum, mask);
  write_scales(out, block, d, sum, q_sum, lane >> 4, (lane & 15) == 0, lane == 0);
}

// As `quantize_warp`, with each thread holding 8 of the block's values: the four threads
// of a quad (lanes 4k..4k+3; `part` = lane % 4 holds values 8 part..8 part + 8) quantize
// block `block` into both layouts. Every lane of the warp must call it.
static __device__ __forceinline__ void quantize_octet(const float *v, Q8Rows out, size_t block,
                                                      int part) {
  float amax = 0.0f, sum = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    amax = fmaxf(amax, fabsf(v[i]));
    sum += v[i];
  }
#pragma unroll
  for (int mask = 1; mask <= 2; mask <<= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, mask));
    sum += __shfl_xor_sync(0xffffffff, sum, mask);
  }
  const float d = amax / 127.0f;
  uint32_t word[2] = {0, 0};
  int q_sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int q = (amax == 0.0f) ? 0 : (int)roundf(v[i] / d);
    q_sum += q;
    word[i >> 2] |= (uint32_t)(q & 0xff) << (8 * (i & 3));
  }
  block_q8_1 *b = out.blocks + block;
  uint32_t *quants = (uint32_t *)(b->qs + 8 * part);  // 4-byte aligned: blocks are 36 bytes
  quants[0] = word[0];
  quants[1] = word[1];
  *(uint2 *)(out.qs + block * 32 + 8 * part) = make_uint2(word[0], word[1]);
  q_sum += __shfl_xor_sync(0xffffffff, q_sum, 1);  // parts 0-1 and 2-3: 16 values each
  write_scales(out, block, d, sum, q_sum, part >> 1, (part & 1) == 0, part == 0);
}
