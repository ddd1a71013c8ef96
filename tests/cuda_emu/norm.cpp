// The decode step's one-pass RMSNorm (`src/llm/engine/kernels/cuda_norm.cuh`), run on the
// CPU under `shim.h`, for the row widths of the models we run (the tiny test models,
// SmolLM2, Qwen3 4B, 8B and 14B, and the widest it takes), with and without the residual
// `delta` and `x_out` (and with `x_out` the same buffer as `x_in`, as the step calls it):
// - `x_out` holds x_in + delta exactly;
// - every block of each padded row is what RMSNorm and candle's quantization give, against
//   a reference in double (scales within a half's rounding, quants within one step where
//   the reference's last bits differ, in at most 1 % of values; the padding all zero);
// - candle's blocks and our layout hold the same quants, and our per-16 sums match them.
// Exit code 0 when everything agrees. Built and run by `tests/cuda_emulated.rs`.

#include "shim.h"
#include "random.h"

#include "../../src/llm/engine/kernels/cuda_common.cuh"
#include "../../src/llm/engine/kernels/cuda_norm.cuh"

static Random rng{0x13198a2e03707344ull};

// candle's padding of an activation row: a multiple of 512 values, in 32-value blocks.
static int q8_stride(int n) { return (n + 511) / 512 * 16; }

int main() {
  const int widths[] = {128, 576, 2560, 4096, 5120, RN_THREADS * RN_GROUPS * 8};
  const int rows = 2;
  const float eps = 1e-6f;
  int failures = 0, cases = 0;
  for (int n : widths) {
    for (int variant = 0; variant < 3; ++variant) {  // delta + x_out; alias; neither
      ++cases;
      const bool with_delta = variant != 2, alias = variant == 1;
      const int stride = q8_stride(n);
      std::vector<float4> x_store(rows * n / 4), d_store(rows * n / 4), o_store(rows * n / 4),
          w_store(n / 4);
      float *x = (float *)x_store.data(), *delta = (float *)d_store.data();
      float *x_out = (float *)o_store.data(), *w = (float *)w_store.data();
      for (int i = 0; i < rows * n; ++i) {
        // A few large values, as real activations have.
        x[i] = (float)((rng.uniform() - 0.5) * (rng.uniform() < 0.01 ? 40.0 : 2.0));
        delta[i] = (float)((rng.uniform() - 0.5) * 0.5);
      }
      for (int i = 0; i < n; ++i) w[i] = (float)(0.5 + rng.uniform());
      std::vector<float> x_in(x, x + rows * n);  // the input, before an aliased write
      float *out_ptr = alias ? x : (variant == 0 ? x_out : nullptr);
      std::vector<block_q8_1> q8((size_t)rows * stride);
      std::vector<uint4> qs_store((size_t)rows * stride * 2);
      int8_t *x_qs = (int8_t *)qs_store.data();
      std::vector<float2> x_ds((size_t)rows * stride * 2);
      for (block_q8_1 &b : q8) std::memset(&b, 0x55, sizeof b);  // so unwritten shows
      std::memset(x_qs, 0x55, (size_t)rows * stride * 32);
      emu::launch(rows, RN_THREADS, [&] {
        rms_norm_q8_1pass(x, with_delta ? delta : nullptr, out_ptr, w, q8.data(), x_qs,
                          x_ds.data(), n, stride, eps);
      });
      bool ok = true;
      long flips = 0;
      for (int r = 0; r < rows && ok; ++r) {
        std::vector<double> y(stride * 32, 0.0);
        double ss = 0.0;
        for (int i = 0; i < n; ++i) {
          const float v = with_delta ? x_in[r * n + i] + delta[r * n + i] : x_in[r * n + i];
          if (out_ptr && out_ptr[r * n + i] != v) ok = false;  // exactly the float sum
          y[i] = v;
          ss += (double)v * v;
        }
        const double scale = 1.0 / std::sqrt(ss / n + eps);
        for (int i = 0; i < n; ++i) y[i] *= scale * w[i];
        for (int b = 0; b < stride && ok; ++b) {
          const block_q8_1 &blk = q8[(size_t)r * stride + b];
          double amax = 0.0, sum = 0.0;
          for (int l = 0; l < 32; ++l) {
            amax = std::max(amax, std::fabs(y[b * 32 + l]));
            sum += y[b * 32 + l];
          }
          const float d = __half2float(blk.ds.x), d_ref = (float)(amax / 127.0);
          ok &= std::fabs(d - d_ref) <= d_ref * 1e-3f;  // a half's rounding
          ok &= std::fabs(__half2float(blk.ds.y) - sum) <= 2e-3 * (std::fabs(sum) + 1.0);
          int q_sum[2] = {0, 0};
          for (int l = 0; l < 32; ++l) {
            const int q = blk.qs[l];
            ok &= x_qs[((size_t)r * stride + b) * 32 + l] == q;
            const int q_ref = amax == 0.0 ? 0 : (int)std::lround(y[b * 32 + l] / (amax / 127.0));
            ok &= std::abs(q - q_ref) <= 1;
            flips += q != q_ref;
            q_sum[l / 16] += q;
          }
          for (int k = 0; k < 2; ++k) {
            const float2 ds = x_ds[((size_t)r * stride + b) * 2 + k];
            ok &= ds.x == d && ds.y == d * (float)q_sum[k];
          }
        }
      }
      ok &= flips <= rows * stride * 32 / 100;
      if (!ok) ++failures;
      std::printf("%s n=%d %s: quants one step off the reference in %ld of %d values\n",
                  ok ? "ok  " : "FAIL", n,
                  variant == 0 ? "with delta and x_out" : variant == 1 ? "x_out = x_in" : "alone",
                  flips, rows * stride * 32);
    }
  }
  std::printf("%d of %d RMSNorm cases agree with the reference\n", cases - failures, cases);
  return failures == 0 ? 0 : 1;
}
