//! Causal self-attention over a paged KV cache. Keys and values of one sequence live in
//! fixed pages of `KV_PAGE` positions that are never moved or copied once written, so a
//! long conversation grows without reallocating; within a page each KV head's keys are
//! contiguous, so one head's scan is a linear read.
//!
//! One kernel, flash-style, serves prefill and decode: a task is one KV head × a tile of
//! consecutive query tokens with every query head of the GQA group (decode is a tile of
//! one token). The keys go by in chunks of `CHUNK` at absolute positions; each chunk of
//! keys and values is read (and widened from f16) once per tile into stack scratch, the
//! scores are computed two query rows × four keys at a time with one transpose-reduce per
//! four dots, softmax is online per row (vectorised `exp` on AVX2) and `P·V` reads each
//! value row once for two rows. Nothing is allocated. A row's arithmetic does not depend
//! on the tile it is in, so a token's output has the same bits in a prefill, alone in a
//! decode step, or in a batch of sequences (continuous batching runs as one job of the
//! pool, each query row over its own sequence's pages).
//!
//! Pages hold f32 or f16 (`KvElem`). f16 halves the cache and its reads at long context;
//! its rounding (2^-11 relative) flips some of the 8-bit roundings of the activations
//! downstream, so the engine's tests state its tolerance against f32 separately, and the
//! reference-logit comparisons run on f32 pages.
//!
//! Owns only the attention arithmetic; the KV cache's lifetime and the model glue are in
//! model.rs, the quantized matmuls in the sibling kernel files.

use std::mem::MaybeUninit;

use super::pool::{SharedOut, ThreadPool};
use super::Isa;

/// Positions per KV page.
pub const KV_PAGE: usize = 256;
/// Widest head the kernel takes (Qwen3 and Llama use 64 or 128).
pub const MAX_HEAD_DIM: usize = 256;
/// Most query heads per KV head.
pub const MAX_GROUP: usize = 16;
/// Keys scored per step of the online softmax, at absolute positions `64k..64(k+1)` (so a
/// chunk never crosses a page, and a row's chunks are the same in any tile).
const CHUNK: usize = 64;
/// Most query tokens of one tile (one task): their keys and values are read once for all.
const TILE_TOKENS: usize = 16;
/// Most query rows (tokens × query heads of the group) of one tile: bounds the stack
/// scratch (accumulators and scores) of a task.
const MAX_ROWS: usize = 64;
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
    /// Keys of positions `pos..pos + n` of KV head `head`, which lie in one page.
    #[inline(always)]
    fn keys(&self, head: usize, pos: usize, n: usize) -> &[T] {
        debug_assert!(pos % KV_PAGE + n <= KV_PAGE);
        let page = &self.pages[pos / KV_PAGE];
        let at = (head * KV_PAGE + pos % KV_PAGE) * self.head_dim;
        &page[at..at + n * self.head_dim]
    }

    /// Values of positions `pos..pos + n` of KV head `head`, which lie in one page.
    #[inline(always)]
    fn values(&self, head: usize, pos: usize, n: usize) -> &[T] {
        debug_assert!(pos % KV_PAGE + n <= KV_PAGE);
        let page = &self.pages[pos / KV_PAGE];
        let at = ((self.n_kv_heads + head) * KV_PAGE + pos % KV_PAGE) * self.head_dim;
        &page[at..at + n * self.head_dim]
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
    let tile = tile_tokens(group);
    // Per sequence: its first query row and its first task number.
    let mut first_row = [0usize; MAX_BATCH_SEQS + 1];
    let mut first_task = [0usize; MAX_BATCH_SEQS + 1];
    for (i, seq) in seqs.iter().enumerate() {
        assert!(seq.kv.head_dim == d && seq.kv.n_kv_heads == n_kv_heads, "same head layout");
        assert!(seq.kv.pages.len() * KV_PAGE >= seq.start + seq.n_tokens, "cache holds them");
        first_row[i + 1] = first_row[i] + seq.n_tokens;
        first_task[i + 1] = first_task[i] + n_kv_heads * seq.n_tokens.div_ceil(tile);
    }
    let shared = SharedOut::new(out);
    let task = |i: usize| {
        let s = (0..seqs.len()).find(|&s| i < first_task[s + 1]).expect("task in range");
        let seq = &seqs[s];
        let local = i - first_task[s];
        // The last tiles of a prefill see the most keys: hand them out first, so the job
        // does not end on one thread finishing a long tile while the others wait.
        let n_tiles = seq.n_tokens.div_ceil(tile);
        let (head, block) = (local % n_kv_heads, n_tiles - 1 - local / n_kv_heads);
        let t0 = block * tile;
        let t1 = (t0 + tile).min(seq.n_tokens);
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
        // Tasks write disjoint (token, head-group) slices of `out`.
        run_tile(isa, &job, t0, t1);
    };
    pool.run(first_task[seqs.len()], &task);
}

/// Query tokens per tile: as many as keep `tokens × group` rows within `MAX_ROWS`.
fn tile_tokens(group: usize) -> usize {
    (MAX_ROWS / group).clamp(1, TILE_TOKENS)
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

fn run_tile<T: KvElem>(isa: Isa, job: &Job<'_, T>, t0: usize, t1: usize) {
    // The 512-bit dots and `P·V` take whole 16-float vectors of a head (64 and 128 wide,
    // Qwen3's and Llama's, are); other widths stay on 8 lanes.
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512Vnni | Isa::Amx)
        && job.kv.head_dim.is_multiple_of(16)
        && avx2_present()
        && is_x86_feature_detected!("avx512f")
    {
        // SAFETY: AVX2, FMA, F16C and AVX512F were detected on this CPU just above.
        unsafe { tile_avx512(job, t0, t1) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable && avx2_present() {
        // SAFETY: AVX2, FMA and F16C were detected on this CPU just above.
        unsafe { tile_avx2(job, t0, t1) };
        return;
    }
    let _ = isa;
    tile::<Portable, T>(job, t0, t1)
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
unsafe fn tile_avx2<T: KvElem>(job: &Job<'_, T>, t0: usize, t1: usize) {
    tile::<Avx2<avx2::Lanes8>, T>(job, t0, t1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn tile_avx512<T: KvElem>(job: &Job<'_, T>, t0: usize, t1: usize) {
    tile::<Avx2<avx2::Lanes16>, T>(job, t0, t1)
}

/// The vector operations of the tile, on `d`-long rows (`d % 8 == 0`). Each (query row,
/// key) dot and each output element has one fixed order of operations, whichever of the
/// one-row and two-row forms computes it: that is what makes a row's result independent of
/// the tile it is in.
trait Ops {
    /// `out[j] = dot(q, keys[j·d..][..d]) · scale` for `j < out.len()` (a multiple of 4).
    fn dots1(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]);
    /// `dots1` for two query rows at once, each key row read once for both.
    fn dots2(qa: &[f32], qb: &[f32], keys: &[f32], scale: f32, oa: &mut [f32], ob: &mut [f32]);
    /// The largest of `x` (`x.len() % 8 == 0`, not empty).
    fn max(x: &[f32]) -> f32;
    /// `x[i] = exp(x[i] - max)` (`x.len() % 8 == 0`), returning the sum.
    fn exp_sub_sum(x: &mut [f32], max: f32) -> f32;
    fn scale(acc: &mut [f32], s: f32);
    /// `acc[i] += p[j] · values[j·d + i]` for `j` in order (`d = acc.len()`).
    fn pv1(acc: &mut [f32], p: &[f32], values: &[f32]);
    /// `pv1` for two rows with the same number of keys, each value row read once for both.
    fn pv2(acc_a: &mut [f32], acc_b: &mut [f32], pa: &[f32], pb: &[f32], values: &[f32]);
    /// `dst[i] = src[i]` widened from f16 (`src.len() % 8 == 0`); writes all of `dst`.
    fn widen(src: &[half::f16], dst: &mut [MaybeUninit<f32>]);
}

/// The first `len` elements of a stack scratch area, cleared. The areas are sized for the
/// widest tile; a decode step clears (and touches) only what it uses.
#[inline(always)]
fn cleared(buf: &mut [MaybeUninit<f32>], len: usize) -> &mut [f32] {
    let part = &mut buf[..len];
    part.iter_mut().for_each(|x| {
        x.write(0.0);
    });
    // SAFETY: every element of `part` was initialised just above; `MaybeUninit<f32>` has
    // the layout of `f32`.
    unsafe { &mut *(part as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Stored rows as f32: f32 pages are read in place, f16 rows are widened into `buf`.
#[inline(always)]
fn as_f32<'a, O: Ops, T: KvElem>(rows: &'a [T], buf: &'a mut [MaybeUninit<f32>]) -> &'a [f32] {
    match T::row(rows) {
        KvRow::F32(rows) => rows,
        KvRow::F16(rows) => {
            let buf = &mut buf[..rows.len()];
            O::widen(rows, buf);
            // SAFETY: `widen` wrote every element of `buf`; same layout as `f32`.
            unsafe { &*(buf as *const [MaybeUninit<f32>] as *const [f32]) }
        }
    }
}

/// Query tokens `t0..t1` of the job's sequence with all `group` query heads of each (row
/// `r` is token `t0 + r / group`, head `r % group` of the group), over the keys of KV head
/// `job.head`, flash-style: the keys in chunks of `CHUNK` at absolute positions, each chunk
/// of keys and values widened once for the whole tile, scores of two rows at a time,
/// online softmax per row, `P·V` with each value row read once for two rows.
///
/// What a row computes depends only on its own query and position: its keys per chunk are
/// `s0..=pos` (the causal mask cuts exactly there, padding to the vector width with -inf
/// whose exponential is 0), every dot and every accumulation runs in one order whichever
/// rows share the pass. So a token gives the same bits in a prefill tile, alone in a
/// decode step, or in a batch.
#[inline(always)]
fn tile<O: Ops, T: KvElem>(job: &Job<'_, T>, t0: usize, t1: usize) {
    let d = job.kv.head_dim;
    let group = job.group;
    let rows = (t1 - t0) * group;
    assert!(rows <= MAX_ROWS && d <= MAX_HEAD_DIM && d.is_multiple_of(8));
    let first_pos = job.start + t0;
    let pos = |r: usize| first_pos + r / group;
    // Row `r`'s offset in `q` and `out`.
    let at =
        |r: usize| ((job.row0 + t0 + r / group) * job.n_head + job.head * group + r % group) * d;
    let mut acc_area = [MaybeUninit::<f32>::uninit(); MAX_ROWS * MAX_HEAD_DIM];
    let acc = cleared(&mut acc_area, rows * d);
    let mut score_area = [MaybeUninit::<f32>::uninit(); MAX_ROWS * CHUNK];
    let scores = cleared(&mut score_area, rows * CHUNK);
    let mut key_area = [MaybeUninit::<f32>::uninit(); CHUNK * MAX_HEAD_DIM];
    let mut value_area = [MaybeUninit::<f32>::uninit(); CHUNK * MAX_HEAD_DIM];
    let mut max = [f32::NEG_INFINITY; MAX_ROWS];
    let mut sum = [0f32; MAX_ROWS];
    let n_keys = job.start + t1;
    let mut s0 = 0;
    while s0 < n_keys {
        let in_chunk = (n_keys - s0).min(CHUNK);
        // Keys of this chunk that row `r` sees.
        let seen = |r: usize| (pos(r) + 1).saturating_sub(s0).min(CHUNK);
        // A chunk lies within one page (CHUNK divides KV_PAGE), so rounding the key count
        // up to the dot block stays inside the page; the extra rows' scores are masked.
        let keys =
            as_f32::<O, T>(job.kv.keys(job.head, s0, in_chunk.next_multiple_of(4)), &mut key_area);
        let values = as_f32::<O, T>(job.kv.values(job.head, s0, in_chunk), &mut value_area);
        // Rows whose token comes before the chunk see none of it.
        let r_first = s0.saturating_sub(first_pos) * group;
        let mut r = r_first;
        while r < rows {
            let qa = &job.q[at(r)..][..d];
            if r + 1 < rows {
                // Row r + 1 sees at least what row r sees.
                let n = seen(r + 1).next_multiple_of(4);
                let (a, b) = scores[r * CHUNK..(r + 2) * CHUNK].split_at_mut(CHUNK);
                let qb = &job.q[at(r + 1)..][..d];
                O::dots2(qa, qb, &keys[..n * d], job.scale, &mut a[..n], &mut b[..n]);
                r += 2;
            } else {
                let n = seen(r).next_multiple_of(4);
                O::dots1(qa, &keys[..n * d], job.scale, &mut scores[r * CHUNK..][..n]);
                r += 1;
            }
        }
        for r in r_first..rows {
            let seen_r = seen(r);
            let row = &mut scores[r * CHUNK..][..seen_r.next_multiple_of(8)];
            row[seen_r..].fill(f32::NEG_INFINITY);
            let chunk_max = O::max(row);
            let new_max = max[r].max(chunk_max);
            if max[r] != f32::NEG_INFINITY && new_max > max[r] {
                let factor = (max[r] - new_max).exp();
                O::scale(&mut acc[r * d..][..d], factor);
                sum[r] *= factor;
            }
            max[r] = new_max;
            sum[r] += O::exp_sub_sum(row, new_max);
        }
        let mut r = r_first;
        while r < rows {
            let seen_a = seen(r);
            let pa = &scores[r * CHUNK..][..seen_a];
            if r + 1 < rows {
                let seen_b = seen(r + 1);
                let pb = &scores[(r + 1) * CHUNK..][..seen_b];
                let (acc_a, acc_b) = acc[r * d..(r + 2) * d].split_at_mut(d);
                O::pv2(acc_a, acc_b, pa, &pb[..seen_a], &values[..seen_a * d]);
                if seen_b > seen_a {
                    O::pv1(acc_b, &pb[seen_a..], &values[seen_a * d..seen_b * d]);
                }
                r += 2;
            } else {
                O::pv1(&mut acc[r * d..][..d], pa, &values[..seen_a * d]);
                r += 1;
            }
        }
        s0 += CHUNK;
    }
    for r in 0..rows {
        let inv = 1.0 / sum[r];
        let at = at(r);
        for (i, value) in acc[r * d..][..d].iter().enumerate() {
            job.out.write(at + i, value * inv);
        }
    }
}

struct Portable;

impl Portable {
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
}

impl Ops for Portable {
    #[inline(always)]
    fn dots1(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        let d = q.len();
        for (o, key) in out.iter_mut().zip(keys.chunks_exact(d)) {
            *o = Self::dot(q, key) * scale;
        }
    }

    #[inline(always)]
    fn dots2(qa: &[f32], qb: &[f32], keys: &[f32], scale: f32, oa: &mut [f32], ob: &mut [f32]) {
        Self::dots1(qa, keys, scale, oa);
        Self::dots1(qb, keys, scale, ob);
    }

    #[inline(always)]
    fn max(x: &[f32]) -> f32 {
        x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
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
    fn scale(acc: &mut [f32], s: f32) {
        acc.iter_mut().for_each(|a| *a *= s);
    }

    #[inline(always)]
    fn pv1(acc: &mut [f32], p: &[f32], values: &[f32]) {
        for (pj, value) in p.iter().zip(values.chunks_exact(acc.len())) {
            for (a, v) in acc.iter_mut().zip(value) {
                *a += pj * v;
            }
        }
    }

    #[inline(always)]
    fn pv2(acc_a: &mut [f32], acc_b: &mut [f32], pa: &[f32], pb: &[f32], values: &[f32]) {
        Self::pv1(acc_a, pa, values);
        Self::pv1(acc_b, pb, values);
    }

    #[inline(always)]
    fn widen(src: &[half::f16], dst: &mut [MaybeUninit<f32>]) {
        assert_eq!(src.len(), dst.len());
        for (d, s) in dst.iter_mut().zip(src) {
            d.write(s.to_f32());
        }
    }
}

/// AVX2 + FMA operations, the score dots and `P·V` (nearly all of the arithmetic) on
/// vectors of width `F`: 8 lanes, or 16 with AVX-512F. Its methods are safe fns that use
/// intrinsics, so they must only run inside `tile_avx2` (`Avx2<Lanes8>`) or `tile_avx512`
/// (`Avx2<Lanes16>`, for heads a multiple of 16 wide), the only places this private type
/// is used, whose `target_feature` they are inlined into.
#[cfg(target_arch = "x86_64")]
struct Avx2<F>(std::marker::PhantomData<F>);

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

    /// Largest of the 8 lanes.
    #[inline(always)]
    pub(super) unsafe fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        _mm_cvtss_f32(m)
    }

    /// The lane sums of four vectors, `[Σa0, Σa1, Σa2, Σa3]`, each summed as
    /// `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`: one transpose-reduce for four
    /// dots instead of a horizontal sum per dot.
    #[inline(always)]
    unsafe fn reduce4(a: &[__m256; 4]) -> __m128 {
        let t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1))
    }

    /// A float vector width for the score dots and `P·V`: 8 lanes (AVX2) or 16 (AVX-512F).
    /// Each method is one intrinsic of the width's features, which the caller enables.
    pub(super) trait Floats {
        type V: Copy;
        const LANES: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn load(p: *const f32) -> Self::V;
        unsafe fn store(p: *mut f32, v: Self::V);
        unsafe fn splat(x: f32) -> Self::V;
        unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        /// The halves added down to 8 lanes (nothing to do at 8).
        unsafe fn fold(v: Self::V) -> __m256;
    }

    /// 8 lanes.
    pub(super) struct Lanes8;
    /// 16 lanes.
    pub(super) struct Lanes16;

    // SAFETY (both impls): one intrinsic each, of AVX/FMA (`Lanes8`) or AVX512F (`Lanes16`),
    // which the entry point that uses the width enables; pointers are the caller's to vouch
    // for.
    impl Floats for Lanes8 {
        type V = __m256;
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fold(v: __m256) -> __m256 {
            v
        }
    }

    impl Floats for Lanes16 {
        type V = __m512;
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fold(v: __m512) -> __m256 {
            let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v));
            _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(hi))
        }
    }

    /// `out[r][j] = dot(q[r], key j) · scale` for `R` query rows and `j < n` (`n % 4 == 0`),
    /// keys `d` apart from `keys`: four keys at a time, each key vector loaded once for
    /// the `R` rows, one accumulator per (row, key) over `d`, folded to 8 lanes before one
    /// transpose-reduce per four keys.
    ///
    /// Safety: `q[r]` readable for `d`, `keys` for `n · d`, `out[r]` writable for `n`
    /// floats; `d % F::LANES == 0`; AVX2, FMA and `F`'s features enabled by the caller.
    // The indices walk several register arrays at once (rows × columns), fully unrolled.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    pub(super) unsafe fn dots<F: Floats, const R: usize>(
        q: [*const f32; R],
        keys: *const f32,
        d: usize,
        n: usize,
        scale: f32,
        out: [*mut f32; R],
    ) {
        let sv = _mm_set1_ps(scale);
        let mut j = 0;
        while j < n {
            let k = keys.add(j * d);
            let mut acc = [[F::zero(); 4]; R];
            let mut i = 0;
            while i < d {
                let mut qv = [F::zero(); R];
                for r in 0..R {
                    qv[r] = F::load(q[r].add(i));
                }
                for c in 0..4 {
                    let kv = F::load(k.add(c * d + i));
                    for r in 0..R {
                        acc[r][c] = F::fmadd(qv[r], kv, acc[r][c]);
                    }
                }
                i += F::LANES;
            }
            for r in 0..R {
                // A loop, not `array::map`, whose closure may stay out of line.
                let mut lanes = [_mm256_setzero_ps(); 4];
                for c in 0..4 {
                    lanes[c] = F::fold(acc[r][c]);
                }
                _mm_storeu_ps(out[r].add(j), _mm_mul_ps(reduce4(&lanes), sv));
            }
            j += 4;
        }
    }

    /// `acc[r][0..LANES·W] += p[r][j] · v[j·d..][..LANES·W]` for `R` rows and `j < n` in
    /// order, the `LANES·W` accumulators of each row in registers, each value vector loaded
    /// once for the `R` rows.
    ///
    /// Safety: `acc[r]` read-writable for `LANES·W`, `p[r]` readable for `n`, `v` for
    /// `(n - 1) · d + LANES·W` floats; AVX2, FMA and `F`'s features enabled by the caller.
    // The indices walk several register arrays at once (rows × columns), fully unrolled.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    pub(super) unsafe fn pv<F: Floats, const R: usize, const W: usize>(
        acc: [*mut f32; R],
        p: [*const f32; R],
        v: *const f32,
        d: usize,
        n: usize,
    ) {
        let mut a = [[F::zero(); W]; R];
        for r in 0..R {
            for w in 0..W {
                a[r][w] = F::load(acc[r].add(F::LANES * w));
            }
        }
        for j in 0..n {
            let row = v.add(j * d);
            let mut vs = [F::zero(); W];
            for w in 0..W {
                vs[w] = F::load(row.add(F::LANES * w));
            }
            for r in 0..R {
                let pj = F::splat(*p[r].add(j));
                for w in 0..W {
                    a[r][w] = F::fmadd(pj, vs[w], a[r][w]);
                }
            }
        }
        for r in 0..R {
            for w in 0..W {
                F::store(acc[r].add(F::LANES * w), a[r][w]);
            }
        }
    }

    /// `dots` over whole slices: the checks, then the product.
    #[inline(always)]
    pub(super) fn dots_rows<F: Floats, const R: usize>(
        q: [&[f32]; R],
        keys: &[f32],
        scale: f32,
        out: [&mut [f32]; R],
    ) {
        let (d, n) = (q[0].len(), out[0].len());
        assert!(d.is_multiple_of(F::LANES) && n.is_multiple_of(4) && keys.len() >= n * d);
        assert!((0..R).all(|r| q[r].len() == d && out[r].len() == n));
        // SAFETY: bounds as `dots` needs them, asserted above; the features are enabled by
        // the caller (`tile_avx2`, `tile_avx512`), whose width `F` is.
        unsafe {
            dots::<F, R>(
                q.map(|q| q.as_ptr()),
                keys.as_ptr(),
                d,
                n,
                scale,
                out.map(|o| o.as_mut_ptr()),
            )
        }
    }

    /// `pv` over a whole row of `d = acc[0].len()`: `4·LANES` columns at a time, then
    /// `LANES`.
    #[inline(always)]
    pub(super) fn pv_rows<F: Floats, const R: usize>(
        acc: [&mut [f32]; R],
        p: [&[f32]; R],
        values: &[f32],
    ) {
        let d = acc[0].len();
        let n = p[0].len();
        assert!(d.is_multiple_of(F::LANES) && values.len() >= n * d);
        assert!((0..R).all(|r| acc[r].len() == d && p[r].len() == n));
        let acc = acc.map(|a| a.as_mut_ptr());
        let p = p.map(|p| p.as_ptr());
        let mut i = 0;
        // SAFETY: columns i..i + LANES·W ≤ d of n rows d apart, within `values` (n · d
        // floats) and each `acc` (d floats), as asserted; features as in `dots_rows`.
        unsafe {
            while i + 4 * F::LANES <= d {
                pv::<F, R, 4>(acc.map(|a| a.add(i)), p, values.as_ptr().add(i), d, n);
                i += 4 * F::LANES;
            }
            while i < d {
                pv::<F, R, 1>(acc.map(|a| a.add(i)), p, values.as_ptr().add(i), d, n);
                i += F::LANES;
            }
        }
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
impl<F: avx2::Floats> Ops for Avx2<F> {
    #[inline(always)]
    fn dots1(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        avx2::dots_rows::<F, 1>([q], keys, scale, [out])
    }

    #[inline(always)]
    fn dots2(qa: &[f32], qb: &[f32], keys: &[f32], scale: f32, oa: &mut [f32], ob: &mut [f32]) {
        avx2::dots_rows::<F, 2>([qa, qb], keys, scale, [oa, ob])
    }

    #[inline(always)]
    fn max(x: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        assert!(x.len().is_multiple_of(8) && !x.is_empty());
        // SAFETY: every load is at i + 8 ≤ len (asserted); AVX enabled by the caller.
        unsafe {
            let mut m = _mm256_loadu_ps(x.as_ptr());
            for i in (8..x.len()).step_by(8) {
                m = _mm256_max_ps(m, _mm256_loadu_ps(x.as_ptr().add(i)));
            }
            avx2::hmax(m)
        }
    }

    #[inline(always)]
    fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
        use std::arch::x86_64::*;
        assert!(x.len().is_multiple_of(8));
        // SAFETY: every access is at i + 8 ≤ len (asserted); AVX2/FMA enabled by caller.
        unsafe {
            let m = _mm256_set1_ps(max);
            let mut sum = _mm256_setzero_ps();
            for i in (0..x.len()).step_by(8) {
                let e = avx2::exp(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), m));
                _mm256_storeu_ps(x.as_mut_ptr().add(i), e);
                sum = _mm256_add_ps(sum, e);
            }
            avx2::hsum(sum)
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
    fn pv1(acc: &mut [f32], p: &[f32], values: &[f32]) {
        avx2::pv_rows::<F, 1>([acc], [p], values)
    }

    #[inline(always)]
    fn pv2(acc_a: &mut [f32], acc_b: &mut [f32], pa: &[f32], pb: &[f32], values: &[f32]) {
        avx2::pv_rows::<F, 2>([acc_a, acc_b], [pa, pb], values)
    }

    #[inline(always)]
    fn widen(src: &[half::f16], dst: &mut [MaybeUninit<f32>]) {
        use std::arch::x86_64::*;
        assert!(src.len() == dst.len() && src.len().is_multiple_of(8));
        // SAFETY: every access is at i + 8 ≤ len (asserted); `half::f16` is a
        // `repr(transparent)` u16, so 8 of them are the 128 bits `vcvtph2ps` reads, and
        // `MaybeUninit<f32>` has the layout of `f32`; F16C is enabled by the caller
        // (`tile_avx2`, `tile_avx512`).
        unsafe {
            for i in (0..src.len()).step_by(8) {
                let halves = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i) as *mut f32, _mm256_cvtph_ps(halves));
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
            // Tile tails: token counts that are not multiples of the tile, key counts that
            // end inside a chunk or cross chunks and pages, on groups of 1, 3, 4 and 16
            // (16 tokens a tile up to group 4, then `MAX_ROWS / group`).
            (3, 3, 64, 250, 23),
            (12, 4, 128, 60, 37),
            (16, 4, 64, 190, 70),
            (8, 2, 128, 0, 67),
            (9, 3, 64, 245, 19),
            (16, 1, 64, 5, 11),
            (16, 1, 128, 254, 7),
        ];
        let isas = Isa::available();
        eprintln!("attention vs f64: ISAs {isas:?}");
        #[cfg(target_arch = "x86_64")]
        assert!(!avx2_present() || isas.contains(&Isa::Avx2), "AVX2 path not exercised");
        #[cfg(target_arch = "x86_64")]
        assert!(
            !super::super::testing::cpu_has_avx512_path() || isas.contains(&Isa::Avx512Vnni),
            "AVX-512 attention not exercised"
        );
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
                for &isa in &isas {
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
            eprintln!("f16 pages vs f64: ISAs {isas:?}");
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

    /// Every row of a prefill call, compared bit for bit with the same token computed alone
    /// (`n_tokens = 1` at its position, as a decode step does) and with the whole prefill
    /// run as one tile per token.
    fn prefill_rows_equal_tokens_alone<T: KvElem>(
        pages: &[Box<[T]>],
        q: &[f32],
        (shape, start, n_tokens): ((usize, usize, usize), usize, usize),
        isa: Isa,
        pool: &ThreadPool,
    ) {
        let (n_head, n_kv, d) = shape;
        let view = KvView { pages, n_kv_heads: n_kv, head_dim: d };
        let scale = 1.0 / (d as f32).sqrt();
        let width = n_head * d;
        let q = &q[..n_tokens * width];
        let mut prefill = vec![f32::NAN; q.len()];
        attention(pool, isa, q, n_tokens, start, n_head, &view, scale, &mut prefill);
        for t in 0..n_tokens {
            let rows = t * width..(t + 1) * width;
            let mut alone = vec![f32::NAN; width];
            attention(pool, isa, &q[rows.clone()], 1, start + t, n_head, &view, scale, &mut alone);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&prefill[rows]),
                bits(&alone),
                "{isa:?} {} pages, shape {shape:?}, start {start}, {n_tokens} tokens: row {t}",
                std::any::type_name::<T>()
            );
        }
    }

    #[test]
    fn a_prefill_row_has_the_bits_of_its_token_alone_on_every_isa() {
        let mut rng = Rng(0x7115_d1a6_0a11_b175);
        let isas = Isa::available();
        eprintln!("prefill rows vs tokens alone: ISAs {isas:?}");
        #[cfg(target_arch = "x86_64")]
        assert!(!avx2_present() || isas.contains(&Isa::Avx2), "AVX2 path not exercised");
        let pool = ThreadPool::new(2);
        // (n_head, n_kv, d): SmolLM2's group of 3, Qwen3's 4 on 128-wide heads, and a group
        // of MAX_GROUP (4 tokens a tile).
        for shape in [(9, 3, 64), (8, 2, 128), (MAX_GROUP, 1, 32)] {
            let (n_head, n_kv, d) = shape;
            let max_tokens = 67;
            for start in [0, 3, 250, 300] {
                let (f32_pages, f16_pages, _, _) =
                    random_pages(&mut rng, n_kv, d, start + max_tokens);
                let q = rng.vec(max_tokens * n_head * d, 1.0);
                for n_tokens in [1, 2, 5, 16, 17, 67] {
                    for &isa in &isas {
                        let case = (shape, start, n_tokens);
                        prefill_rows_equal_tokens_alone(&f32_pages, &q, case, isa, &pool);
                        prefill_rows_equal_tokens_alone(&f16_pages, &q, case, isa, &pool);
                    }
                }
            }
        }
    }
}
