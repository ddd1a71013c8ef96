//! Causal self-attention over a paged KV cache. Keys and values of one sequence live in
//! fixed pages of `KV_PAGE` positions that are never moved or copied once written, so a
//! long conversation grows without reallocating; within a page each KV head's keys are
//! contiguous, so one head's scan is a linear read. Query heads that share a KV head (GQA)
//! are processed together: every key and value is read and widened to f32 once per group,
//! not once per query head. Softmax is computed online in chunks (no score buffer on the
//! heap), with a vectorised `exp` on AVX2. Several sequences (continuous batching) run as
//! one job of the pool, each query row over its own sequence's pages.
//!
//! Pages hold f32 or f16 (`KvElem`). f16 halves the cache and its reads at long context;
//! its rounding (2^-11 relative) flips some of the 8-bit roundings of the activations
//! downstream, so the engine's tests state its tolerance against f32 separately, and the
//! reference-logit comparisons run on f32 pages.

use super::pool::{SharedOut, ThreadPool};
use super::Isa;

/// Positions per KV page.
pub const KV_PAGE: usize = 256;
/// Widest head the kernel takes (Qwen3 and Llama use 64 or 128).
pub const MAX_HEAD_DIM: usize = 256;
/// Most query heads per KV head.
pub const MAX_GROUP: usize = 16;
/// Keys scored per step of the online softmax.
const CHUNK: usize = 64;
/// Tokens of one prefill handled by one task (their keys stay in cache between queries).
const TOKENS_PER_TASK: usize = 16;
/// Most sequences one `attention_batch` call takes (the engine's parallel slots).
pub const MAX_BATCH_SEQS: usize = 64;

/// What a KV page stores: f32, or IEEE half (`half::f16`).
pub trait KvElem: Copy + Send + Sync + 'static {
    const ZERO: Self;
    fn from_f32(value: f32) -> Self;
    /// The row as the attention body reads it.
    fn row(row: &[Self]) -> KvRow<'_>;
}

/// One key or value row in its stored form.
pub enum KvRow<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl KvElem for f32 {
    const ZERO: f32 = 0.0;
    #[inline(always)]
    fn from_f32(value: f32) -> f32 {
        value
    }
    #[inline(always)]
    fn row(row: &[f32]) -> KvRow<'_> {
        KvRow::F32(row)
    }
}

impl KvElem for half::f16 {
    const ZERO: half::f16 = half::f16::ZERO;
    #[inline(always)]
    fn from_f32(value: f32) -> half::f16 {
        half::f16::from_f32(value)
    }
    #[inline(always)]
    fn row(row: &[half::f16]) -> KvRow<'_> {
        KvRow::F16(row)
    }
}

/// Values one page holds: keys then values, each `[n_kv_heads][KV_PAGE][head_dim]`.
pub fn page_values(n_kv_heads: usize, head_dim: usize) -> usize {
    2 * n_kv_heads * KV_PAGE * head_dim
}

/// One layer's pages of one sequence, as the kernel reads them.
pub struct KvView<'a, T = f32> {
    pub pages: &'a [Box<[T]>],
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl<T> KvView<'_, T> {
    #[inline(always)]
    fn key(&self, head: usize, pos: usize) -> &[T] {
        let page = &self.pages[pos / KV_PAGE];
        let at = (head * KV_PAGE + pos % KV_PAGE) * self.head_dim;
        &page[at..at + self.head_dim]
    }

    #[inline(always)]
    fn value(&self, head: usize, pos: usize) -> &[T] {
        let page = &self.pages[pos / KV_PAGE];
        let at = ((self.n_kv_heads + head) * KV_PAGE + pos % KV_PAGE) * self.head_dim;
        &page[at..at + self.head_dim]
    }
}

/// Store the keys and values of one position (`n_kv_heads × head_dim` each) in its page.
pub fn store_kv<T: KvElem>(
    page: &mut [T],
    n_kv_heads: usize,
    head_dim: usize,
    pos: usize,
    k: &[f32],
    v: &[f32],
) {
    let slot = pos % KV_PAGE;
    for head in 0..n_kv_heads {
        let src = head * head_dim..(head + 1) * head_dim;
        let k_at = (head * KV_PAGE + slot) * head_dim;
        let v_at = ((n_kv_heads + head) * KV_PAGE + slot) * head_dim;
        for (dst, x) in page[k_at..k_at + head_dim].iter_mut().zip(&k[src.clone()]) {
            *dst = T::from_f32(*x);
        }
        for (dst, x) in page[v_at..v_at + head_dim].iter_mut().zip(&v[src]) {
            *dst = T::from_f32(*x);
        }
    }
}

/// One sequence's part of `attention_batch`: its `n_tokens` query rows (consecutive in
/// `q` and `out`, after the previous sequences' rows) sit at positions
/// `start..start + n_tokens` of its own pages.
pub struct AttnSeq<'a, T = f32> {
    pub kv: KvView<'a, T>,
    pub start: usize,
    pub n_tokens: usize,
}

/// Attention of `n_tokens` queries (`q`: `[n_tokens][n_head][head_dim]`) at positions
/// `start..start + n_tokens`, each seeing keys `0..=its position`, into `out` (same layout).
/// The cache must already hold the keys and values of all those positions.
#[allow(clippy::too_many_arguments)]
pub fn attention<T: KvElem>(
    pool: &ThreadPool,
    isa: Isa,
    q: &[f32],
    n_tokens: usize,
    start: usize,
    n_head: usize,
    kv: &KvView<'_, T>,
    scale: f32,
    out: &mut [f32],
) {
    let seq = AttnSeq {
        kv: KvView { pages: kv.pages, n_kv_heads: kv.n_kv_heads, head_dim: kv.head_dim },
        start,
        n_tokens,
    };
    attention_batch(pool, isa, q, std::slice::from_ref(&seq), n_head, scale, out);
}

/// `attention` for several sequences at once (a batched decode step, maybe with a prefill
/// chunk): one job of the pool, each query row over its own sequence's pages. Every
/// sequence must have the same head layout. Allocates nothing.
pub fn attention_batch<T: KvElem>(
    pool: &ThreadPool,
    isa: Isa,
    q: &[f32],
    seqs: &[AttnSeq<'_, T>],
    n_head: usize,
    scale: f32,
    out: &mut [f32],
) {
    assert!(seqs.len() <= MAX_BATCH_SEQS, "at most {MAX_BATCH_SEQS} sequences per batch");
    let Some(first) = seqs.first() else { return };
    let (d, n_kv_heads) = (first.kv.head_dim, first.kv.n_kv_heads);
    let group = n_head / n_kv_heads;
    assert!(d <= MAX_HEAD_DIM && d.is_multiple_of(8), "head width {d} unsupported");
    assert!(group <= MAX_GROUP && group * n_kv_heads == n_head, "head grouping");
    let n_rows: usize = seqs.iter().map(|s| s.n_tokens).sum();
    assert_eq!(q.len(), n_rows * n_head * d);
    assert_eq!(out.len(), q.len());
    // Per sequence: its first query row and its first task number.
    let mut first_row = [0usize; MAX_BATCH_SEQS + 1];
    let mut first_task = [0usize; MAX_BATCH_SEQS + 1];
    for (i, seq) in seqs.iter().enumerate() {
        assert!(seq.kv.head_dim == d && seq.kv.n_kv_heads == n_kv_heads, "same head layout");
        assert!(seq.kv.pages.len() * KV_PAGE >= seq.start + seq.n_tokens, "cache holds them");
        first_row[i + 1] = first_row[i] + seq.n_tokens;
        first_task[i + 1] = first_task[i] + n_kv_heads * seq.n_tokens.div_ceil(TOKENS_PER_TASK);
    }
    let shared = SharedOut::new(out);
    let task = |i: usize| {
        let s = (0..seqs.len()).find(|&s| i < first_task[s + 1]).expect("task in range");
        let seq = &seqs[s];
        let local = i - first_task[s];
        let (head, block) = (local % n_kv_heads, local / n_kv_heads);
        let t0 = block * TOKENS_PER_TASK;
        let t1 = (t0 + TOKENS_PER_TASK).min(seq.n_tokens);
        let job = Job {
            q,
            n_head,
            group,
            head,
            start: seq.start,
            row0: first_row[s],
            kv: &seq.kv,
            scale,
            out: &shared,
        };
        // Tasks write disjoint (row, head-group) slices of `out`.
        for t in t0..t1 {
            run_query_group(isa, &job, t);
        }
    };
    pool.run(first_task[seqs.len()], &task);
}

struct Job<'a, T> {
    q: &'a [f32],
    n_head: usize,
    group: usize,
    head: usize,
    start: usize,
    /// The sequence's first row in `q` and `out`.
    row0: usize,
    kv: &'a KvView<'a, T>,
    scale: f32,
    out: &'a SharedOut<'a>,
}

fn run_query_group<T: KvElem>(isa: Isa, job: &Job<'_, T>, t: usize) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable && avx2_present() {
        // SAFETY: AVX2, FMA and F16C were detected on this CPU just above.
        unsafe { query_group_avx2(job, t) };
        return;
    }
    let _ = isa;
    query_group::<Portable, T>(job, t)
}

/// Every AVX2 CPU made has F16C (Haswell, Zen), so requiring it costs nothing and lets the
/// f16 pages be widened with `vcvtph2ps`.
#[cfg(target_arch = "x86_64")]
fn avx2_present() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn query_group_avx2<T: KvElem>(job: &Job<'_, T>, t: usize) {
    query_group::<Avx2, T>(job, t)
}

/// The vector operations the attention body needs, on `d`-long rows (`d % 8 == 0`).
trait Ops {
    fn dot(a: &[f32], b: &[f32]) -> f32;
    fn axpy(acc: &mut [f32], p: f32, x: &[f32]);
    fn scale(acc: &mut [f32], s: f32);
    /// `x[i] = exp(x[i] - max)`, returning the sum.
    fn exp_sub_sum(x: &mut [f32], max: f32) -> f32;
    /// `dst[i] = src[i]` widened from f16.
    fn widen(src: &[half::f16], dst: &mut [f32]);
}

/// A stored row as f32: f32 pages are read in place, f16 rows are widened into `buf`.
#[inline(always)]
fn as_f32<'a, O: Ops, T: KvElem>(row: &'a [T], buf: &'a mut [f32]) -> &'a [f32] {
    match T::row(row) {
        KvRow::F32(row) => row,
        KvRow::F16(row) => {
            let buf = &mut buf[..row.len()];
            O::widen(row, buf);
            buf
        }
    }
}

/// All of one token's query heads that share `job.head`, over keys `0..=start + t`.
// `g` indexes several per-head arrays at once (scores, max, sum, acc).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn query_group<O: Ops, T: KvElem>(job: &Job<'_, T>, t: usize) {
    let d = job.kv.head_dim;
    let group = job.group;
    let n_keys = job.start + t + 1;
    let q_base = ((job.row0 + t) * job.n_head + job.head * group) * d;
    let mut row_buf = [0f32; MAX_HEAD_DIM];
    let mut acc = [[0f32; MAX_HEAD_DIM]; MAX_GROUP];
    let mut scores = [[0f32; CHUNK]; MAX_GROUP];
    let mut max = [f32::NEG_INFINITY; MAX_GROUP];
    let mut sum = [0f32; MAX_GROUP];
    let mut s0 = 0;
    while s0 < n_keys {
        let s1 = (s0 + CHUNK).min(n_keys);
        for s in s0..s1 {
            let key = as_f32::<O, T>(job.kv.key(job.head, s), &mut row_buf);
            for g in 0..group {
                let q = &job.q[q_base + g * d..q_base + (g + 1) * d];
                scores[g][s - s0] = O::dot(q, key) * job.scale;
            }
        }
        for g in 0..group {
            let chunk = &mut scores[g][..s1 - s0];
            let chunk_max = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[g].max(chunk_max);
            if max[g] != f32::NEG_INFINITY && new_max > max[g] {
                let factor = (max[g] - new_max).exp();
                O::scale(&mut acc[g][..d], factor);
                sum[g] *= factor;
            }
            max[g] = new_max;
            sum[g] += O::exp_sub_sum(chunk, new_max);
        }
        for s in s0..s1 {
            let value = as_f32::<O, T>(job.kv.value(job.head, s), &mut row_buf);
            for g in 0..group {
                O::axpy(&mut acc[g][..d], scores[g][s - s0], value);
            }
        }
        s0 = s1;
    }
    for g in 0..group {
        let inv = 1.0 / sum[g];
        let at = q_base + g * d;
        for (i, value) in acc[g][..d].iter().enumerate() {
            job.out.write(at + i, value * inv);
        }
    }
}

struct Portable;

impl Ops for Portable {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0f32; 8];
        for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
            for i in 0..8 {
                lanes[i] += ca[i] * cb[i];
            }
        }
        lanes.iter().sum()
    }

    #[inline(always)]
    fn axpy(acc: &mut [f32], p: f32, x: &[f32]) {
        for (a, v) in acc.iter_mut().zip(x) {
            *a += p * v;
        }
    }

    #[inline(always)]
    fn scale(acc: &mut [f32], s: f32) {
        acc.iter_mut().for_each(|a| *a *= s);
    }

    #[inline(always)]
    fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
        let mut total = 0.0;
        for v in x.iter_mut() {
            *v = (*v - max).exp();
            total += *v;
        }
        total
    }

    #[inline(always)]
    fn widen(src: &[half::f16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

/// AVX2 + FMA operations. Its methods are safe fns that use intrinsics, so they
/// must only run inside `query_group_avx2` (the one place this private type is used),
/// whose `target_feature` they are inlined into.
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// e^x for 8 lanes (Cephes-style: 2^n · p(r), |rel. error| < 2e-7 on [-87, 88]);
    /// below -87 the result flushes to 0, which is what softmax wants.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.0));
        let underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_LT_OQ);
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
        p = _mm256_add_ps(p, _mm256_set1_ps(1.0));
        let pow2 =
            _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        let result = _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
        _mm256_andnot_ps(underflow, result)
    }
}

#[cfg(target_arch = "x86_64")]
impl Ops for Avx2 {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        assert!(a.len() == b.len() && a.len().is_multiple_of(8));
        // SAFETY: every load is at i + 8 ≤ len (asserted); AVX2/FMA enabled by the caller.
        unsafe {
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut i = 0;
            while i + 16 <= a.len() {
                acc0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    acc0,
                );
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                    _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                    acc1,
                );
                i += 16;
            }
            if i < a.len() {
                acc0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    acc0,
                );
            }
            avx2::hsum(_mm256_add_ps(acc0, acc1))
        }
    }

    #[inline(always)]
    fn axpy(acc: &mut [f32], p: f32, x: &[f32]) {
        use std::arch::x86_64::*;
        assert!(acc.len() == x.len() && x.len().is_multiple_of(8));
        // SAFETY: every access is at i + 8 ≤ len (asserted); AVX2/FMA enabled by the caller.
        unsafe {
            let pv = _mm256_set1_ps(p);
            for i in (0..x.len()).step_by(8) {
                let a = _mm256_loadu_ps(acc.as_ptr().add(i));
                let r = _mm256_fmadd_ps(pv, _mm256_loadu_ps(x.as_ptr().add(i)), a);
                _mm256_storeu_ps(acc.as_mut_ptr().add(i), r);
            }
        }
    }

    #[inline(always)]
    fn scale(acc: &mut [f32], s: f32) {
        use std::arch::x86_64::*;
        assert!(acc.len().is_multiple_of(8));
        // SAFETY: every access is at i + 8 ≤ len (asserted); AVX enabled by the caller.
        unsafe {
            let sv = _mm256_set1_ps(s);
            for i in (0..acc.len()).step_by(8) {
                let a = _mm256_loadu_ps(acc.as_ptr().add(i));
                _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_mul_ps(a, sv));
            }
        }
    }

    #[inline(always)]
    fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
        use std::arch::x86_64::*;
        let whole = x.len() / 8 * 8;
        // SAFETY: every vector access is at i + 8 ≤ whole ≤ len; AVX2/FMA enabled by caller.
        let mut total = unsafe {
            let m = _mm256_set1_ps(max);
            let mut sum = _mm256_setzero_ps();
            for i in (0..whole).step_by(8) {
                let e = avx2::exp(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), m));
                _mm256_storeu_ps(x.as_mut_ptr().add(i), e);
                sum = _mm256_add_ps(sum, e);
            }
            avx2::hsum(sum)
        };
        for v in &mut x[whole..] {
            *v = (*v - max).exp();
            total += *v;
        }
        total
    }

    #[inline(always)]
    fn widen(src: &[half::f16], dst: &mut [f32]) {
        use std::arch::x86_64::*;
        assert!(src.len() == dst.len() && src.len().is_multiple_of(8));
        // SAFETY: every access is at i + 8 ≤ len (asserted); `half::f16` is a
        // `repr(transparent)` u16, so 8 of them are the 128 bits `vcvtph2ps` reads; F16C is
        // enabled by the caller (`query_group_avx2`).
        unsafe {
            for i in (0..src.len()).step_by(8) {
                let halves = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(halves));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Rng;
    use super::*;

    /// Plain f64 attention, as the reference.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
        n_tokens: usize,
        start: usize,
        n_head: usize,
        n_kv: usize,
        d: usize,
        scale: f32,
    ) -> Vec<f32> {
        let group = n_head / n_kv;
        let mut out = vec![0f32; n_tokens * n_head * d];
        for t in 0..n_tokens {
            for h in 0..n_head {
                let kvh = h / group;
                let qv = &q[(t * n_head + h) * d..][..d];
                let n_keys = start + t + 1;
                let scores: Vec<f64> = (0..n_keys)
                    .map(|s| {
                        let k = &keys[s][kvh * d..][..d];
                        qv.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for i in 0..d {
                    let v: f64 = (0..n_keys).map(|s| exps[s] * values[s][kvh * d + i] as f64).sum();
                    out[(t * n_head + h) * d + i] = (v / total) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_f64_attention_across_pages_groups_and_threads() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        // (n_head, n_kv, d, start, n_tokens): decode deep in the cache across a page
        // boundary, prefill after a prefix, prefill from empty, MHA and wide groups.
        let cases = [
            (8, 2, 64, 300, 1),
            (9, 3, 64, 0, 37),
            (4, 4, 128, 250, 20),
            (32, 8, 128, 0, 1),
            (5, 1, 16, 520, 3),
        ];
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for &(n_head, n_kv, d, start, n_tokens) in &cases {
                let total: usize = start + n_tokens;
                let n_pages = total.div_ceil(KV_PAGE);
                let mut pages: Vec<Box<[f32]>> = (0..n_pages)
                    .map(|_| vec![0f32; page_values(n_kv, d)].into_boxed_slice())
                    .collect();
                let mut keys = Vec::new();
                let mut values = Vec::new();
                for pos in 0..total {
                    let k = rng.vec(n_kv * d, 2.0);
                    let v = rng.vec(n_kv * d, 1.0);
                    store_kv(&mut pages[pos / KV_PAGE], n_kv, d, pos, &k, &v);
                    keys.push(k);
                    values.push(v);
                }
                let q = rng.vec(n_tokens * n_head * d, 1.0);
                let scale = 1.0 / (d as f32).sqrt();
                let expected =
                    reference(&q, &keys, &values, n_tokens, start, n_head, n_kv, d, scale);
                let view = KvView { pages: &pages, n_kv_heads: n_kv, head_dim: d };
                for isa in Isa::available() {
                    let mut out = vec![f32::NAN; q.len()];
                    attention(&pool, isa, &q, n_tokens, start, n_head, &view, scale, &mut out);
                    let worst =
                        out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(
                        worst < 2e-5,
                        "{isa:?} threads {threads} case {:?}: max diff {worst}",
                        (n_head, n_kv, d, start, n_tokens)
                    );
                }
            }
        }
    }

    /// Random keys and values for `total` positions, stored in f32 and in f16 pages.
    #[allow(clippy::type_complexity)]
    fn random_pages(
        rng: &mut Rng,
        n_kv: usize,
        d: usize,
        total: usize,
    ) -> (Vec<Box<[f32]>>, Vec<Box<[half::f16]>>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let n_pages = total.div_ceil(KV_PAGE);
        let mut f32_pages: Vec<Box<[f32]>> =
            (0..n_pages).map(|_| vec![0f32; page_values(n_kv, d)].into_boxed_slice()).collect();
        let mut f16_pages: Vec<Box<[half::f16]>> = (0..n_pages)
            .map(|_| vec![half::f16::ZERO; page_values(n_kv, d)].into_boxed_slice())
            .collect();
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for pos in 0..total {
            let k = rng.vec(n_kv * d, 2.0);
            let v = rng.vec(n_kv * d, 1.0);
            store_kv(&mut f32_pages[pos / KV_PAGE], n_kv, d, pos, &k, &v);
            store_kv(&mut f16_pages[pos / KV_PAGE], n_kv, d, pos, &k, &v);
            keys.push(k);
            values.push(v);
        }
        (f32_pages, f16_pages, keys, values)
    }

    #[test]
    fn f16_pages_match_f64_attention_of_the_rounded_keys_on_every_isa() {
        // The f16 path must compute exactly what the f32 path computes on keys and values
        // rounded to f16 (same bound as above), whichever instruction set widens them; and
        // against the unrounded f64 reference it stays within the rounding's effect.
        let mut rng = Rng(0x0f16_0f16_0f16_0f16);
        let pool = ThreadPool::new(2);
        for &(n_head, n_kv, d, start, n_tokens) in
            &[(8, 2, 64, 300, 1), (9, 3, 64, 0, 37), (4, 4, 128, 250, 20)]
        {
            let total = start + n_tokens;
            let (_, f16_pages, keys, values) = random_pages(&mut rng, n_kv, d, total);
            let round = |rows: &[Vec<f32>]| -> Vec<Vec<f32>> {
                rows.iter()
                    .map(|r| r.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect())
                    .collect()
            };
            let q = rng.vec(n_tokens * n_head * d, 1.0);
            let scale = 1.0 / (d as f32).sqrt();
            let (rk, rv) = (round(&keys), round(&values));
            let rounded = reference(&q, &rk, &rv, n_tokens, start, n_head, n_kv, d, scale);
            let exact = reference(&q, &keys, &values, n_tokens, start, n_head, n_kv, d, scale);
            let view = KvView { pages: &f16_pages, n_kv_heads: n_kv, head_dim: d };
            let isas = Isa::available();
            // On a CPU with AVX2 + F16C the vector widening must be among what is tested.
            #[cfg(target_arch = "x86_64")]
            assert!(!avx2_present() || isas.contains(&Isa::Avx2), "AVX2 path not exercised");
            for isa in isas {
                let mut out = vec![f32::NAN; q.len()];
                attention(&pool, isa, &q, n_tokens, start, n_head, &view, scale, &mut out);
                let worst = |want: &[f32]| {
                    out.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
                };
                assert!(worst(&rounded) < 2e-5, "{isa:?}: {} vs rounded", worst(&rounded));
                assert!(worst(&exact) < 5e-3, "{isa:?}: {} vs exact", worst(&exact));
            }
        }
    }

    #[test]
    fn a_batch_of_sequences_equals_each_sequence_alone() {
        // Decode rows of three sequences at different depths plus a prefill chunk, as the
        // engine's batched step runs them: bit-identical to one call per sequence.
        let mut rng = Rng(0xba7c_4ba7_c4ba_7c4b);
        let (n_head, n_kv, d) = (8, 2, 64);
        let shapes = [(300, 1), (0, 1), (40, 23), (700, 1)];
        let seqs_data: Vec<_> =
            shapes.iter().map(|&(start, n)| random_pages(&mut rng, n_kv, d, start + n)).collect();
        let n_rows: usize = shapes.iter().map(|s| s.1).sum();
        let q = rng.vec(n_rows * n_head * d, 1.0);
        let scale = 0.125;
        for threads in [1, 3] {
            let pool = ThreadPool::new(threads);
            for isa in Isa::available() {
                let seqs: Vec<AttnSeq<'_, half::f16>> = shapes
                    .iter()
                    .zip(&seqs_data)
                    .map(|(&(start, n_tokens), data)| AttnSeq {
                        kv: KvView { pages: &data.1, n_kv_heads: n_kv, head_dim: d },
                        start,
                        n_tokens,
                    })
                    .collect();
                let mut batched = vec![f32::NAN; q.len()];
                attention_batch(&pool, isa, &q, &seqs, n_head, scale, &mut batched);
                let mut row = 0;
                for seq in &seqs {
                    let width = n_head * d;
                    let rows = row * width..(row + seq.n_tokens) * width;
                    let mut alone = vec![f32::NAN; rows.len()];
                    let q_rows = &q[rows.clone()];
                    attention(
                        &pool,
                        isa,
                        q_rows,
                        seq.n_tokens,
                        seq.start,
                        n_head,
                        &seq.kv,
                        scale,
                        &mut alone,
                    );
                    assert_eq!(&batched[rows], &alone[..], "{isa:?} threads {threads}");
                    row += seq.n_tokens;
                }
            }
        }
    }
}
