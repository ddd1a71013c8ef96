// The decode step's glue kernels (`src/llm/engine/kernels/cuda_decode.cu`, compiled whole
// with `include/cuda_fp16.h` standing in for CUDA's), run on the CPU under `shim.h`,
// against references in double:
// - `attn_partial_d{64,128,256}`: causal attention of one token per row over its cache
//   from the row's q/k/v projections: queries and keys normed (Qwen3's q/k norms, or none),
//   rotated (NeoX pairs and interleaved ones), the queries scaled, the key and the value
//   stored in f16 at the row's position and nothing else in the caches touched; split over
//   positions as the step splits them (1 to 32 splits, from under a 128-position chunk to
//   several chunks per split), for 1 to 8 query heads per KV head, the splits joined by
//   whichever block ends last (the shim runs blocks in a shuffled order) and quantized:
//   each output within half a quantization step (plus float error) of the reference, in
//   both layouts, and the join's counts back at 0;
// - `rms_norm_q8`: residual add, RMSNorm and quantization, the padding zero;
// - `silu_mul_q8`: SwiGLU, quantized, the padding zero.
// Exit code 0 when everything agrees. Built and run by `tests/cuda_emulated.rs`.

#include "shim.h"
#include "random.h"

#include "../../src/llm/engine/kernels/cuda_decode.cu"

static Random rng{0xa4093822299f31d0ull};
static float symmetric(double scale) { return (float)((rng.uniform() - 0.5) * 2.0 * scale); }

static int q8_stride(int n) { return (n + 511) / 512 * 16; }
// The most position splits of a step (`MAX_SPLIT` in `cuda_decode.rs`).
constexpr int MAX_SPLIT_ = 32;

// Both layouts of `blocks` quantized blocks against `want` (the reference values): each
// value within half a step (d / 2) plus float error of what the block holds, candle's and
// our quants the same, our scales d rounded as candle's. Returns the worst error in steps.
static double check_quantized(const block_q8_1 *q8, const int8_t *x_qs, const float2 *x_ds,
                              const double *want, size_t blocks, bool &ok) {
  double worst = 0.0;
  for (size_t b = 0; b < blocks; ++b) {
    const float d = __half2float(q8[b].ds.x);
    double amax = 0.0;
    for (int l = 0; l < 32; ++l) amax = std::max(amax, std::fabs(want[b * 32 + l]));
    // The scale is max|x| / 127 of the kernel's float values, rounded to half.
    ok &= std::fabs(d - amax / 127.0) <= amax / 127.0 * 1e-3 + 1e-12;
    int q_sum[2] = {0, 0};
    for (int l = 0; l < 32; ++l) {
      const int q = q8[b].qs[l];
      ok &= x_qs[b * 32 + l] == q;
      q_sum[l / 16] += q;
      if (amax == 0.0) {
        ok &= q == 0;
        continue;
      }
      const double step_error = std::fabs(q * (amax / 127.0) - want[b * 32 + l]) / (amax / 127.0);
      worst = std::max(worst, step_error);
      ok &= step_error <= 0.5 + 1e-3;
    }
    for (int k = 0; k < 2; ++k)
      ok &= x_ds[b * 2 + k].x == d && x_ds[b * 2 + k].y == d * (float)q_sum[k];
  }
  return worst;
}

struct Q8Buffers {
  std::vector<block_q8_1> q8;
  std::vector<uint4> qs;
  std::vector<float2> ds;
  explicit Q8Buffers(size_t blocks) : q8(blocks), qs(blocks * 2), ds(blocks * 2) {}
  int8_t *x_qs() { return (int8_t *)qs.data(); }
};

static float h(half v) { return __half2float(v); }

// --- attention ---------------------------------------------------------------------------
// Row r's q/k/v projections at its position p = lens[r] - 1 over a cache whose positions
// are all filled: the kernel must store the rotated key and the value at p (and touch no
// other position), and attend over positions 0..=p with the rotated, scaled query.
template <int D>
static bool attention_case(int group, int len0, int len1, bool norms, bool neox, int n_split) {
  const int rows = 2, n_kv = 2, n_head = n_kv * group, layers = 2, layer = 1;
  const int lens[rows] = {len0, len1};
  const int max_len = std::max(len0, len1), cap = max_len + 3;
  const int width = (n_head + 2 * n_kv) * D;
  const float eps = 1e-6f, q_scale = (float)(1.0 / std::sqrt((double)D));
  std::vector<float> qkv(rows * width), q_norm(D), k_norm(D);
  for (float &v : qkv) v = symmetric(norms ? 2.0 : 1.0);
  for (int i = 0; i < D; ++i) {
    q_norm[i] = (float)(0.5 + rng.uniform());
    k_norm[i] = (float)(0.5 + rng.uniform());
  }
  std::vector<float> cos_t((size_t)max_len * D / 2), sin_t((size_t)max_len * D / 2);
  for (int p = 0; p < max_len; ++p)
    for (int j = 0; j < D / 2; ++j) {
      const double theta = p * std::pow(1e6, -2.0 * j / D);
      cos_t[(size_t)p * D / 2 + j] = (float)std::cos(theta);
      sin_t[(size_t)p * D / 2 + j] = (float)std::sin(theta);
    }
  std::vector<std::vector<half>> keys(rows), values(rows);
  for (int r = 0; r < rows; ++r) {
    keys[r].resize((size_t)n_kv * cap * D);
    values[r].resize((size_t)n_kv * cap * D);
    for (half &v : keys[r]) v = __float2half(symmetric(1.0));
    for (half &v : values[r]) v = __float2half(symmetric(1.0));
  }
  const auto keys_before = keys, values_before = values;
  std::vector<int> facts(2 * MAX_ROWS + 1, 0);
  std::vector<unsigned long long> kv(layers * MAX_ROWS * 2, 0);
  for (int r = 0; r < rows; ++r) {
    facts[r] = lens[r] - 1;
    facts[MAX_ROWS + r] = cap;
    kv[(layer * MAX_ROWS + r) * 2] = (unsigned long long)keys[r].data();
    kv[(layer * MAX_ROWS + r) * 2 + 1] = (unsigned long long)values[r].data();
  }
  facts[2 * MAX_ROWS] = (max_len + n_split - 1) / n_split;
  std::vector<float> part_acc((size_t)MAX_ROWS * n_head * MAX_SPLIT_ * D);
  std::vector<float> part_ml((size_t)MAX_ROWS * n_head * MAX_SPLIT_ * 2);
  std::vector<unsigned> counts(MAX_ROWS * n_kv, 0);
  const int stride = q8_stride(n_head * D);
  Q8Buffers out((size_t)rows * stride);
  emu::launch(Dim3{(unsigned)n_kv, (unsigned)n_split, (unsigned)rows}, 128, [&] {
    auto *kernel = D == 64 ? attn_partial_d64 : D == 128 ? attn_partial_d128 : attn_partial_d256;
    kernel(qkv.data(), width, norms ? q_norm.data() : nullptr, norms ? k_norm.data() : nullptr,
           cos_t.data(), sin_t.data(), eps, q_scale, neox ? 1 : 0, facts.data(), kv.data(), layer,
           n_head, n_kv, n_split, part_acc.data(), part_ml.data(), counts.data(), out.q8.data(),
           out.x_qs(), out.ds.data(), stride);
  });
  bool ok = true;
  // The join's counts are back at 0 for the next launch.
  for (unsigned c : counts) ok &= c == 0;
  // Head `hd` of row r normed (with `norm`) and rotated at position p, in double.
  auto rotated = [&](int r, int hd, const float *norm, int p) {
    const float *src = qkv.data() + (size_t)r * width + (size_t)hd * D;
    std::vector<double> x(src, src + D), y(D);
    if (norm) {
      double ss = 0.0;
      for (double v : x) ss += v * v;
      const double scale = 1.0 / std::sqrt(ss / D + eps);
      for (int i = 0; i < D; ++i) x[i] *= scale * norm[i];
    }
    for (int j = 0; j < D / 2; ++j) {
      const int i0 = neox ? j : 2 * j, i1 = neox ? j + D / 2 : 2 * j + 1;
      const double c = cos_t[(size_t)p * D / 2 + j], s = sin_t[(size_t)p * D / 2 + j];
      y[i0] = x[i0] * c - x[i1] * s;
      y[i1] = x[i0] * s + x[i1] * c;
    }
    return y;
  };
  double worst_key = 0.0;
  std::vector<double> want((size_t)rows * stride * 32, 0.0);
  for (int r = 0; r < rows; ++r) {
    const int p = lens[r] - 1;
    // The key and value stored at p; every other position as it was.
    for (int hk = 0; hk < n_kv; ++hk) {
      const std::vector<double> k = rotated(r, n_head + hk, norms ? k_norm.data() : nullptr, p);
      const float *v = qkv.data() + (size_t)r * width + (size_t)(n_head + n_kv + hk) * D;
      for (int i = 0; i < D; ++i) {
        const size_t at = ((size_t)hk * cap + p) * D + i;
        const double err = std::fabs(h(keys[r][at]) - k[i]);
        worst_key = std::max(worst_key, err);
        ok &= err <= std::fabs(k[i]) * 1e-3 + 1e-4;  // f16
        ok &= values[r][at].bits == __float2half(v[i]).bits;
      }
      for (int pos = 0; pos < cap; ++pos) {
        if (pos == p) continue;
        for (int i = 0; i < D; ++i) {
          const size_t at = ((size_t)hk * cap + pos) * D + i;
          ok &= keys[r][at].bits == keys_before[r][at].bits;
          ok &= values[r][at].bits == values_before[r][at].bits;
        }
      }
    }
    // Attention over the cache as the kernel left it, with the reference query.
    for (int hq = 0; hq < n_head; ++hq) {
      const int hk = hq / group;
      std::vector<double> qh = rotated(r, hq, norms ? q_norm.data() : nullptr, p);
      for (double &v : qh) v *= q_scale;
      std::vector<double> scores(lens[r]);
      double mx = -INFINITY;
      for (int pos = 0; pos < lens[r]; ++pos) {
        double s = 0.0;
        for (int i = 0; i < D; ++i) s += qh[i] * (double)h(keys[r][((size_t)hk * cap + pos) * D + i]);
        scores[pos] = s;
        mx = std::max(mx, s);
      }
      double l = 0.0;
      for (double &s : scores) l += (s = std::exp(s - mx));
      for (int i = 0; i < D; ++i) {
        double o = 0.0;
        for (int pos = 0; pos < lens[r]; ++pos)
          o += scores[pos] * h(values[r][((size_t)hk * cap + pos) * D + i]);
        want[(size_t)r * stride * 32 + hq * D + i] = o / l;
      }
    }
  }
  const double worst = check_quantized(out.q8.data(), out.x_qs(), out.ds.data(), want.data(),
                                       (size_t)rows * stride, ok);
  std::printf("%s attention d=%d, %d query heads per KV head%s%s, %d and %d positions, %d splits "
              "of %d: stored keys within %.2g, worst error %.3f quantization steps\n",
              ok ? "ok  " : "FAIL", D, group, norms ? ", q/k norms" : "",
              neox ? ", NeoX pairs" : ", interleaved pairs", len0, len1, n_split,
              facts[2 * MAX_ROWS], worst_key, worst);
  return ok;
}

// --- rms_norm_q8 (the two-pass one the default step runs) ------------------------------
static bool rms_case(int n) {
  const int rows = 2, stride = q8_stride(n);
  const float eps = 1e-6f;
  std::vector<float> x(rows * n), delta(rows * n), x_out(rows * n, NAN), w(n);
  for (float &v : x) v = symmetric(rng.uniform() < 0.01 ? 20.0 : 1.0);
  for (float &v : delta) v = symmetric(0.25);
  for (float &v : w) v = (float)(0.5 + rng.uniform());
  Q8Buffers out((size_t)rows * stride);
  emu::launch(rows, 512, [&] {
    rms_norm_q8(x.data(), delta.data(), x_out.data(), w.data(), out.q8.data(), out.x_qs(),
                out.ds.data(), n, stride, eps);
  });
  bool ok = true;
  std::vector<double> want((size_t)rows * stride * 32, 0.0);
  for (int r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (int i = 0; i < n; ++i) {
      const float v = x[r * n + i] + delta[r * n + i];
      ok &= x_out[r * n + i] == v;
      ss += (double)v * v;
    }
    const double scale = 1.0 / std::sqrt(ss / n + eps);
    for (int i = 0; i < n; ++i)
      want[(size_t)r * stride * 32 + i] = (double)x_out[r * n + i] * scale * w[i];
  }
  const double worst =
      check_quantized(out.q8.data(), out.x_qs(), out.ds.data(), want.data(),
                      (size_t)rows * stride, ok);
  std::printf("%s rms_norm_q8 n=%d: worst error %.3f quantization steps\n", ok ? "ok  " : "FAIL", n,
              worst);
  return ok;
}

// --- silu_mul_q8 -------------------------------------------------------------------------
static bool silu_case(int n_ff) {
  const int rows = 3, stride = q8_stride(n_ff), gu_stride = 2 * n_ff;
  std::vector<float> gu(rows * gu_stride);
  for (float &v : gu) v = symmetric(4.0);
  Q8Buffers out((size_t)rows * stride);
  emu::launch(Dim3{(unsigned)((stride + 7) / 8), (unsigned)rows, 1}, 256, [&] {
    silu_mul_q8(gu.data(), gu_stride, n_ff, out.q8.data(), out.x_qs(), out.ds.data(), stride);
  });
  std::vector<double> want((size_t)rows * stride * 32, 0.0);
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < n_ff; ++i) {
      const double g = gu[r * gu_stride + i], u = gu[r * gu_stride + n_ff + i];
      want[(size_t)r * stride * 32 + i] = g / (1.0 + std::exp(-g)) * u;
    }
  bool ok = true;
  const double worst =
      check_quantized(out.q8.data(), out.x_qs(), out.ds.data(), want.data(),
                      (size_t)rows * stride, ok);
  std::printf("%s silu_mul_q8 n_ff=%d: worst error %.3f quantization steps\n", ok ? "ok  " : "FAIL",
              n_ff, worst);
  return ok;
}

int main() {
  int failures = 0, cases = 0;
  auto count = [&](bool ok) {
    ++cases;
    failures += !ok;
  };
  // One split (a block finishes its heads itself) or several (the last block of each KV
  // head and row joins them), as `DecodePlan::step` splits: a power of two, splits shorter
  // than a 128-position chunk or of several chunks, not a multiple of the value phase's
  // batches, splits past a row's end (rows of different lengths), up to 32; with Qwen3's
  // q/k norms or without (Llama), NeoX rotation pairs (Qwen3) or interleaved ones.
  count(attention_case<64>(8, 1, 17, true, true, 1));       // the tiny Qwen3's head width
  count(attention_case<64>(3, 128, 100, false, false, 1));  // a full chunk; Llama
  count(attention_case<64>(2, 130, 300, true, true, 4));    // splits of 75
  count(attention_case<64>(4, 1, 33, true, true, 2));       // a row in one split of two
  count(attention_case<128>(4, 17, 1, true, true, 1));      // Qwen3-8B's grouping
  count(attention_case<128>(4, 17, 1000, true, true, 32));  // splits of 32
  count(attention_case<128>(4, 700, 1000, true, true, 8));  // splits of one chunk
  count(attention_case<128>(5, 77, 128, false, false, 4));  // an odd group, splits of 32
  count(attention_case<128>(1, 5000, 64, true, false, 32)); // splits of several chunks
  count(attention_case<128>(8, 3000, 9000, true, true, 32));// 32 splits, 8 heads a group
  count(attention_case<256>(3, 129, 2, true, false, 2));
  count(attention_case<256>(6, 100, 45, false, true, 1));
  count(rms_case(128));
  count(rms_case(4096));
  count(silu_case(256));
  count(silu_case(1536));
  count(silu_case(12288));
  std::printf("%d of %d glue kernel cases agree with the reference\n", cases - failures, cases);
  return failures == 0 ? 0 : 1;
}
