// Our Q4_K, Q6_K and Q8_0 matrix-vector kernels (`src/llm/engine/kernels/cuda_matvec.cuh`) and
// the quantization that feeds them (`quantize_warp`, `cuda_common.cuh`), run on the CPU
// under `shim.h`:
// 1. random activations are quantized by `quantize_warp` into both layouts; candle's
//    blocks must hold what candle's own quantization writes (d = max|x| / 127, rounded to
//    half; quants round(x / d)), and ours the same quants and scales, with the sums
//    (`host_quantize`, which then writes the activations of step 2: emulating every block
//    would take a minute);
// 2. every matrix kernel the decode step may pick (each load width, staged through
//    registers or copied by `cp.async` with 2 or 3 stages, 1 to 8 activation rows)
//    multiplies random activations, read in our layout, by matrices whose rows take one
//    chunk, several, and a partial last one, with a row count that leaves the last
//    block of warps partly idle, on a block per 4 rows or on one block whose warps take
//    several rows each (the chunks of a row and then of the next in one stream), and an
//    output stride wider than the rows (so a cell written never or out of place fails
//    too), each launched as a programmatic dependent (the activations garbage and the
//    output clobbered until its first `pdl_wait`, so reading or writing before it fails), against a reference written from ggml's block
//    formats (dequantize_row_q4_K / dequantize_row_q6_K / dequantize_row_q8_0) on
//    candle's layout, in double.
// Exit code 0 when everything agrees. Built and run by `tests/cuda_emulated.rs`.

#include "shim.h"
#include "random.h"

#include "../../src/llm/engine/kernels/cuda_common.cuh"
#include "../../src/llm/engine/kernels/cuda_matvec.cuh"

typedef void (*Kernel)(const uint8_t *, const int8_t *, const float2 *, float *, int, int, int,
                       int);

#define KERNELS(name) \
  { name##_n1, name##_n2, name##_n3, name##_n4, name##_n5, name##_n6, name##_n7, name##_n8 }

static Random rng{0x243f6a8885a308d3ull};

// A positive normal half in [2^e, 2^(e+1)).
static half half_in(int e) { return half{(uint16_t)(((e + 15) << 10) | (rng.next_u32() & 0x3ff))}; }

static double gauss() {
  double s = 0.0;
  for (int i = 0; i < 4; ++i) s += (rng.next_u32() % 100000) / 100000.0 - 0.5;
  return s;
}

static float h2f(const uint8_t *p) {
  half h;
  std::memcpy(&h.bits, p, 2);
  return __half2float(h);
}

// The activation value at column k of row a (blocks of 32).
static double act(const block_q8_1 *a, int k) {
  return (double)__low2float(a[k / 32].ds) * (double)a[k / 32].qs[k % 32];
}

static double ref_q4k(const uint8_t *blk, const block_q8_1 *a) {
  const double d = h2f(blk), dmin = h2f(blk + 2);
  const uint8_t *q = blk + 4, *qs = blk + 16;
  double sum = 0.0;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    if (j < 4) {
      sc = q[j] & 63;
      m = q[j + 4] & 63;
    } else {
      sc = (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
      m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
    for (int l = 0; l < 32; ++l) {
      const int v = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xf;
      sum += (d * sc * v - dmin * m) * act(a, 32 * j + l);
    }
  }
  return sum;
}

static double ref_q6k(const uint8_t *blk, const block_q8_1 *a) {
  const uint8_t *ql = blk, *qh = blk + 128;
  const int8_t *sc = (const int8_t *)(blk + 192);
  const double d = h2f(blk + 208);
  double sum = 0.0;
  for (int n = 0; n < 2; ++n) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q[4] = {
          ((ql[64 * n + l] & 0xf) | (((qh[32 * n + l] >> 0) & 3) << 4)) - 32,
          ((ql[64 * n + l + 32] & 0xf) | (((qh[32 * n + l] >> 2) & 3) << 4)) - 32,
          ((ql[64 * n + l] >> 4) | (((qh[32 * n + l] >> 4) & 3) << 4)) - 32,
          ((ql[64 * n + l + 32] >> 4) | (((qh[32 * n + l] >> 6) & 3) << 4)) - 32,
      };
      for (int k = 0; k < 4; ++k)
        sum += d * sc[8 * n + is + 2 * k] * q[k] * act(a, 128 * n + l + 32 * k);
    }
  }
  return sum;
}

// candle's quantization of `blocks` 32-value blocks of `x` on the host, into both layouts
// as `Q8Rows` defines them: d = max|x| / 127, quants round(x / d), d rounded to half in
// candle's block with the sum of the values, and (d, d * sum of 16 quants) in ours.
static void host_quantize(const float *x, size_t blocks, block_q8_1 *q8, int8_t *x_qs,
                          float2 *x_ds) {
  for (size_t i = 0; i < blocks; ++i) {
    float amax = 0.0f, sum = 0.0f;
    for (int l = 0; l < 32; ++l) {
      amax = std::max(amax, std::fabs(x[i * 32 + l]));
      sum += x[i * 32 + l];
    }
    const float d = amax / 127.0f;
    const half d_half = __float2half(d);
    q8[i].ds = half2{d_half, __float2half(sum)};
    int q_sum[2] = {0, 0};
    for (int l = 0; l < 32; ++l) {
      const int q = amax == 0.0f ? 0 : (int)std::round(x[i * 32 + l] / d);
      q8[i].qs[l] = (int8_t)q;
      x_qs[i * 32 + l] = (int8_t)q;
      q_sum[l / 16] += q;
    }
    const float dh = __half2float(d_half);
    for (int k = 0; k < 2; ++k) x_ds[i * 2 + k] = make_float2(dh, dh * (float)q_sum[k]);
  }
}

// `quantize_warp` (a warp per block) on 256 blocks of random activations, one of them all
// zero, against `host_quantize`: the same bytes in both layouts, but for candle's sum of
// the values (summed in another order, so within a half's rounding).
static bool quantize_checked() {
  const size_t blocks = 256;
  std::vector<float> x(blocks * 32);
  for (size_t i = 0; i < x.size(); ++i) x[i] = i / 32 == 5 ? 0.0f : (float)(gauss() * 3.0);
  std::vector<block_q8_1> q8(blocks), q8_ref(blocks);
  std::vector<uint4> qs(blocks * 2), qs_ref(blocks * 2);
  std::vector<float2> ds(blocks * 2), ds_ref(blocks * 2);
  int8_t *x_qs = (int8_t *)qs.data(), *x_qs_ref = (int8_t *)qs_ref.data();
  const Q8Rows out{q8.data(), x_qs, ds.data()};
  emu::launch((unsigned)(blocks / 4), 128, [&] {
    const size_t block = blockIdx.x * 4 + (threadIdx.x >> 5);
    quantize_warp(x[block * 32 + (threadIdx.x & 31)], out, block);
  });
  host_quantize(x.data(), blocks, q8_ref.data(), x_qs_ref, ds_ref.data());
  for (size_t i = 0; i < blocks; ++i) {
    const float sum = __half2float(q8_ref[i].ds.y);
    bool ok = q8[i].ds.x.bits == q8_ref[i].ds.x.bits;
    ok &= std::fabs(__half2float(q8[i].ds.y) - sum) <= 1e-2f * (1.0f + std::fabs(sum));
    ok &= std::memcmp(q8[i].qs, q8_ref[i].qs, 32) == 0;
    ok &= std::memcmp(x_qs + i * 32, x_qs_ref + i * 32, 32) == 0;
    for (int k = 0; k < 2; ++k)
      ok &= ds[i * 2 + k].x == ds_ref[i * 2 + k].x && ds[i * 2 + k].y == ds_ref[i * 2 + k].y;
    if (!ok) {
      std::printf("FAIL quantize_warp: block %zu differs from candle's quantization\n", i);
      return false;
    }
  }
  std::printf("quantize_warp: all %zu blocks as candle quantizes them, in both layouts\n",
              blocks);
  return true;
}

// 8 Q8_0 blocks (34 bytes each: d, then 32 int8 quants).
static double ref_q8_0(const uint8_t *group, const block_q8_1 *a) {
  double sum = 0.0;
  for (int k = 0; k < 8; ++k) {
    const double d = h2f(group + 34 * k);
    for (int l = 0; l < 32; ++l) sum += d * (int8_t)group[34 * k + 2 + l] * act(a, 32 * k + l);
  }
  return sum;
}

struct Case {
  const char *format;
  int load_bytes, nb, rows;
};

// A kernel family: staged through registers (`mat_vec`, stages 0) or copied by `cp.async`
// (`mat_vec_async`) with 2 or 3 stages per warp.
struct Family {
  const char *format;
  int load_bytes, stages;
  Kernel kernels[8];
};

int main() {
  const Family families[] = {
      {"Q4_K", 16, 0, KERNELS(mv_q4k_v16)},       {"Q4_K", 16, 2, KERNELS(mv_q4k_v16_a2)},
      {"Q4_K", 16, 3, KERNELS(mv_q4k_v16_a3)},    {"Q6_K", 16, 0, KERNELS(mv_q6k_v16)},
      {"Q6_K", 16, 2, KERNELS(mv_q6k_v16_a2)},    {"Q6_K", 16, 3, KERNELS(mv_q6k_v16_a3)},
      {"Q6_K", 8, 0, KERNELS(mv_q6k_v8)},         {"Q6_K", 8, 2, KERNELS(mv_q6k_v8_a2)},
      {"Q6_K", 8, 3, KERNELS(mv_q6k_v8_a3)},      {"Q6_K", 4, 0, KERNELS(mv_q6k_v4)},
      {"Q6_K", 4, 2, KERNELS(mv_q6k_v4_a2)},      {"Q6_K", 4, 3, KERNELS(mv_q6k_v4_a3)},
      {"Q6_K", 2, 0, KERNELS(mv_q6k_v2)},         {"Q8_0", 16, 0, KERNELS(mv_q8_0_v16)},
      {"Q8_0", 16, 2, KERNELS(mv_q8_0_v16_a2)},
  };
  // GGUF blocks per row: one, one whole chunk (16), several with a partial last one. Each
  // Q6_K width is what the decode step picks for that block count (210 * nb divisible by
  // the width): 16 for nb % 8 == 0, 8 for nb % 4 == 0, 4 for even nb, 2 for odd.
  const Case cases[] = {
      {"Q4_K", 16, 1, 6},  {"Q4_K", 16, 16, 7}, {"Q4_K", 16, 33, 6}, {"Q6_K", 16, 16, 6},
      {"Q6_K", 16, 40, 5}, {"Q6_K", 8, 20, 6},  {"Q6_K", 4, 2, 6},   {"Q6_K", 4, 38, 6},
      {"Q6_K", 2, 1, 6},   {"Q6_K", 2, 17, 6},  {"Q8_0", 16, 1, 6},  {"Q8_0", 16, 16, 5},
      {"Q8_0", 16, 20, 6},
  };
  // One set of activations for every case: 8 rows as wide as the widest matrix, each row
  // padded as candle pads them (a multiple of 512 values).
  int widest = 0;
  for (const Case &c : cases) widest = std::max(widest, c.nb);
  const int q8_stride = (widest * 256 + 511) / 512 * 16;
  std::vector<block_q8_1> q8((size_t)8 * q8_stride);
  std::vector<uint4> x_qs_storage((size_t)8 * q8_stride * 2);  // 16-byte aligned
  int8_t *x_qs = (int8_t *)x_qs_storage.data();
  std::vector<float2> x_ds((size_t)8 * q8_stride * 2);
  if (!quantize_checked()) return 1;
  {
    std::vector<float> x((size_t)8 * q8_stride * 32, 0.0f);  // the padding stays zero
    for (int j = 0; j < 8; ++j)
      for (int k = 0; k < widest * 256; ++k)
        x[(size_t)j * q8_stride * 32 + k] = (float)(gauss() * 3.0);
    host_quantize(x.data(), (size_t)8 * q8_stride, q8.data(), x_qs, x_ds.data());
  }
  int failures = 0, runs = 0;
  for (const Case &c : cases) {
    // Q8_0 in groups of 8 blocks of 34 bytes: "blocks" of 256 values below.
    const bool is_q4k = c.format[1] == '4', is_q8_0 = c.format[1] == '8';
    const int bytes = is_q4k ? 144 : is_q8_0 ? 272 : 210;
    const size_t row_bytes = (size_t)c.nb * bytes;
    if (row_bytes % c.load_bytes != 0) {
      std::printf("case %s nb=%d: rows of %zu bytes cannot take %d-byte loads\n", c.format, c.nb,
                  row_bytes, c.load_bytes);
      return 2;
    }
    // Random quants; scales small and positive (d, dmin, Q6_K's d) as in real files.
    // Exactly the matrix's bytes, so that the address sanitizer sees any read past them
    // (operator new aligns to 16 bytes on x86-64, as cudaMalloc does to more).
    std::vector<uint8_t> storage(row_bytes * c.rows);
    uint8_t *w = storage.data();
    if ((uintptr_t)w % 16 != 0) {
      std::printf("the matrix is not 16-byte aligned\n");
      return 2;
    }
    for (size_t i = 0; i < row_bytes * c.rows; ++i) w[i] = (uint8_t)rng.next_u32();
    for (int b = 0; b < c.nb * c.rows; ++b) {
      uint8_t *blk = w + (size_t)b * bytes;
      if (is_q4k) {
        const half d = half_in(-8), dmin = half_in(-9);
        std::memcpy(blk, &d.bits, 2);
        std::memcpy(blk + 2, &dmin.bits, 2);
      } else if (is_q8_0) {
        for (int k = 0; k < 8; ++k) {
          const half d = half_in(-9);
          std::memcpy(blk + 34 * k, &d.bits, 2);
        }
      } else {
        const half d = half_in(-10);
        std::memcpy(blk + 208, &d.bits, 2);
      }
    }
    std::vector<double> ref((size_t)8 * c.rows);
    double scale = 0.0;
    for (int j = 0; j < 8; ++j)
      for (int r = 0; r < c.rows; ++r) {
        double s = 0.0;
        for (int b = 0; b < c.nb; ++b) {
          const uint8_t *blk = w + row_bytes * r + (size_t)b * bytes;
          const block_q8_1 *a = q8.data() + (size_t)j * q8_stride + 8 * b;
          s += is_q4k ? ref_q4k(blk, a) : is_q8_0 ? ref_q8_0(blk, a) : ref_q6k(blk, a);
        }
        ref[(size_t)j * c.rows + r] = s;
        scale = std::max(scale, std::fabs(s));
      }
    const int out_stride = c.rows + 3;
    for (const Family &f : families) {
      if (std::strcmp(f.format, c.format) != 0 || f.load_bytes != c.load_bytes) continue;
      for (int n = 1; n <= 8; ++n, ++runs) {
        std::vector<float> out((size_t)8 * out_stride, NAN);
        const Kernel kernel = f.kernels[n - 1];
        const int cols = c.nb * 256, rows = c.rows;
        // A block per MV_WARPS rows, or (odd n) a single block, as when the launcher caps
        // the grid at what fits on the GPU at once: its warps then take two rows each.
        const unsigned grid = n % 2 == 0 ? (rows + MV_WARPS - 1) / MV_WARPS : 1;
        // As a programmatic dependent of the kernel that writes the activations: they are
        // garbage until the kernel's first `pdl_wait`, which also clobbers its output.
        const std::vector<uint4> qs_real = x_qs_storage;
        const std::vector<float2> ds_real = x_ds;
        const uint4 garbage{0x55555555u, 0x7f7f7f7fu, 0x81818181u, 0x12345678u};
        std::fill(x_qs_storage.begin(), x_qs_storage.end(), garbage);
        std::fill(x_ds.begin(), x_ds.end(), make_float2(NAN, NAN));
        emu::pdl_release = [&] {
          std::copy(qs_real.begin(), qs_real.end(), x_qs_storage.begin());
          std::copy(ds_real.begin(), ds_real.end(), x_ds.begin());
          std::fill(out.begin(), out.end(), NAN);
        };
        emu::launch(grid, MV_WARPS * 32, [&] {
          kernel(w, x_qs, x_ds.data(), out.data(), cols, rows, q8_stride, out_stride);
        });
        std::copy(qs_real.begin(), qs_real.end(), x_qs_storage.begin());
        std::copy(ds_real.begin(), ds_real.end(), x_ds.begin());
        double worst = 0.0;
        bool bad = false;
        for (int j = 0; j < 8; ++j)
          for (int r = 0; r < out_stride; ++r) {
            const float got = out[(size_t)j * out_stride + r];
            if (j >= n || r >= c.rows) {
              bad |= !std::isnan(got);  // nothing may be written there
              continue;
            }
            const double diff = std::fabs(got - ref[(size_t)j * c.rows + r]) / scale;
            if (!(diff <= 1e-5)) bad = true;
            worst = std::max(worst, std::isnan(diff) ? INFINITY : diff);
          }
        if (bad) {
          ++failures;
          std::printf("FAIL %s %d-byte loads, %d stages, %d blocks x %d rows, %d activation "
                      "rows: worst difference %.3g of the largest output %.4g (or a cell written "
                      "out of place)\n",
                      c.format, c.load_bytes, f.stages, c.nb, c.rows, n, worst, scale);
        } else if (n == 8 || n == 1) {
          std::printf("ok   %s %d-byte loads, %d stages, %d blocks x %d rows, %d activation "
                      "rows: worst difference %.3g of the largest output %.4g\n",
                      c.format, c.load_bytes, f.stages, c.nb, c.rows, n, worst, scale);
        }
      }
    }
  }
  std::printf("%d of %d kernel runs agree with the reference\n", runs - failures, runs);
  return failures == 0 ? 0 : 1;
}
