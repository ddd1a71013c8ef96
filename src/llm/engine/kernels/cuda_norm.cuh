// The decode step's RMSNorm in one pass (included by `cuda_decode.cu`, after
// `cuda_common.cuh`; `tests/cuda_emu` runs it under a CPU emulation of CUDA's threads).
//
// Per row (block): x = x_in (+ delta); x_out = x (when given; may be x_in); then
// rmsnorm(x) * w quantized into the row's 8-bit activations in both layouts (`q8_stride`
// blocks, the ones past `n` zero), as `rms_norm_q8` in `cuda_decode.cu` does. Each thread
// holds 8 consecutive values per group (up to RN_GROUPS groups: rows of at most
// 8 * RN_THREADS * RN_GROUPS values, padded) in registers from the read (two 16-byte loads)
// to the quantization, and four threads quantize a block with two shuffles
// (`quantize_octet`). Why: `rms_norm_q8` reads its row twice and quantizes it in eight
// rounds of warp reductions one after another (8 us a call on an H200, 0.56 ms of a 4.1 ms
// step of the 8B shape at 73 calls); this is one read, one block reduction and one round.
// Needs n to be a multiple of 8 (the launcher checks).

#pragma once

#define RN_THREADS 512
#define RN_GROUPS 4

extern "C" __global__ void __launch_bounds__(RN_THREADS)
    rms_norm_q8_1pass(const float *x_in, const float *delta, float *x_out,
                      const float *__restrict__ w, block_q8_1 *__restrict__ q8,
                      int8_t *__restrict__ x_qs, float2 *__restrict__ x_ds, int n, int q8_stride,
                      float eps) {
  pdl_launch_dependents();  // the product after this may start (`pdl_wait`)
  __shared__ float red[33];
  const int row = blockIdx.x, t = threadIdx.x;
  const float4 *xi = (const float4 *)(x_in + (size_t)row * n);
  const float4 *di = delta ? (const float4 *)(delta + (size_t)row * n) : nullptr;
  float4 *xo = x_out ? (float4 *)(x_out + (size_t)row * n) : nullptr;
  const float4 *w4 = (const float4 *)w;
  float v[RN_GROUPS][8];
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < RN_GROUPS; ++k) {
    const int g = t + k * RN_THREADS;  // values 8g..8g+8
    float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b = a;
    if (g * 8 < n) {
      a = xi[2 * g];
      b = xi[2 * g + 1];
      if (di) {
        const float4 da = di[2 * g], db = di[2 * g + 1];
        a = make_float4(a.x + da.x, a.y + da.y, a.z + da.z, a.w + da.w);
        b = make_float4(b.x + db.x, b.y + db.y, b.z + db.z, b.w + db.w);
      }
      if (xo) {
        xo[2 * g] = a;
        xo[2 * g + 1] = b;
      }
    }
    const float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      v[k][i] = x[i];
      ss += x[i] * x[i];
    }
  }
  const float scale = rsqrtf(block_sum(ss, red) / (float)n + eps);
  const int groups = q8_stride * 4;  // a multiple of 64: whole warps skip together below
  const Q8Rows out{q8, x_qs, x_ds};
#pragma unroll
  for (int k = 0; k < RN_GROUPS; ++k) {
    const int g = t + k * RN_THREADS;
    if (g >= groups) continue;
    float y[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (g * 8 < n) {
      const float4 wa = w4[2 * g], wb = w4[2 * g + 1];
      const float ws[8] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) y[i] = v[k][i] * scale * ws[i];
    }
    quantize_octet(y, out, (size_t)row * q8_stride + g / 4, g & 3);
  }
}
