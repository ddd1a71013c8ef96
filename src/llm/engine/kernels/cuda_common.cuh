// What the decode step's kernels (`cuda_decode.cu`) and its matrix kernels
// (`cuda_matvec.cuh`) share: the two layouts of 8-bit activations, the warp reductions,
// and the quantization that writes activations. Included after <cuda_fp16.h> and
// <stdint.h> (or, in `tests/cuda_emu`, after their CPU stand-ins).

#pragma once

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
  const half d_half = __float2half(d);
  if ((lane & 15) == 0) {
    const float dh = __half2float(d_half);
    out.ds[block * 2 + (lane >> 4)] = make_float2(dh, dh * (float)q_sum);
  }
  if (lane == 0) {
    reinterpret_cast<half &>(b->ds.x) = d_half;
    reinterpret_cast<half &>(b->ds.y) = __float2half(sum);
  }
}
