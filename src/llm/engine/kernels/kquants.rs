//! The 256-value K-quant formats (Q4_K, Q5_K, Q6_K) against `BlockQ8K` activations.
//!
//! Byte layouts (ggml's, little-endian, alignment 1):
//! - Q4_K, 144 bytes: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. Eight sub-blocks
//!   of 32 values, each with a 6-bit scale and a 6-bit minimum packed into `scales`
//!   (`scale_min_k4`); value = `d·sc·q − dmin·m` with `q` a nibble: in each 64-value chunk
//!   `j`, the low nibbles of `qs[32j..32j+32]` are values `64j..64j+32`, the high nibbles the
//!   next 32.
//! - Q5_K, 176 bytes: `d, dmin, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`: Q4_K plus a
//!   fifth bit, bit `s` of `qh[l]` for value `l` of sub-block `s` (so `q` is 0..31).
//! - Q6_K, 210 bytes: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: sixteen
//!   sub-blocks of 16 values with signed 8-bit scales; value = `d·sc·(q − 32)`, `q` 6 bits:
//!   four low bits from `ql`, two high from `qh` (see `unpack_q6k`).
//!
//! The dot products keep the weights' integers unsigned and subtract the minimums (Q4_K,
//! Q5_K) and Q6_K's −32 offset through the activations' `bsums`, so the inner loop is
//! u8×i8 products (`vpmaddubsw`: every pair sum fits i16, since `63·128·2 < 32767`) scaled
//! per sub-block by an i16 multiply-add into i32 lanes. That scaled multiply-accumulate is
//! the only thing that differs between `Isa::Avx2` (`vpmaddwd` + `vpaddd`) and
//! `Isa::Avx2Vnni` (`vpdpwssd`, which fuses the two).

use super::{f16_to_f32, BlockQ8K, Isa, WeightType};

/// Values per block of every format here.
const QK: usize = 256;
pub(super) const Q4K_BYTES: usize = 144;
const Q5K_BYTES: usize = 176;
pub(super) const Q6K_BYTES: usize = 210;

/// Quantize `x` (a whole number of 256-value blocks, any number of rows) into `out`.
///
/// ggml's `quantize_row_q8_K`: `d = amax / 127`, `qs[i] = round(x[i] / d)` (so `|qs| ≤ 127`),
/// `bsums[j] = Σ qs[16j..16j+16]` (and their pairs, `bsums32`); an all-zero (or
/// all-subnormal) block gets `d = 0`. ggml takes the sign of the value of largest magnitude
/// for `d`; we keep `d ≥ 0`, which gives the same values `d·qs` and makes the result
/// independent of which of `±amax` comes first.
pub(super) fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(
        x.len(),
        out.len() * QK,
        "quantize_q8k: {} values for {} blocks",
        x.len(),
        out.len()
    );
    for (x, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        quantize_block_q8k(x, y);
    }
}

fn quantize_block_q8k(x: &[f32], y: &mut BlockQ8K) {
    // The largest |x| through the bit patterns, whose order is the values' for non-negative
    // floats (an integer max vectorizes where a float one may not).
    let amax = f32::from_bits(x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)));
    // Zero, or so small (subnormal) that 127/amax would overflow: all zeros. (NaN goes on
    // and makes `d` NaN, so it shows in the products.)
    if amax < f32::MIN_POSITIVE {
        *y = BlockQ8K::ZERO;
        return;
    }
    let iscale = 127.0 / amax;
    for (q, &v) in y.qs.iter_mut().zip(x) {
        // Round to nearest even by adding 1.5·2²³ (ggml's `nearest_int`: exact for
        // |f| < 2²²); |iscale·v| ≤ 127 up to rounding, so the truncation to i8 is exact.
        let f = iscale * v + 12_582_912.0;
        *q = (f.to_bits() as i32).wrapping_sub(0x4b40_0000) as i8;
    }
    y.fill_sums();
    y.d = 1.0 / iscale;
}

pub(super) fn dequantize_row(ty: WeightType, w: &[u8], out: &mut [f32]) {
    let bytes = ty.block_bytes();
    assert_eq!(ty.block_len(), QK, "{ty:?} is not a K-quant");
    assert_eq!(w.len() % bytes, 0, "{ty:?} row of {} bytes", w.len());
    assert_eq!(out.len(), w.len() / bytes * QK, "{ty:?} dequantize_row width");
    for (blk, y) in w.chunks_exact(bytes).zip(out.chunks_exact_mut(QK)) {
        match ty {
            WeightType::Q4K => dequantize_q4k(blk, y),
            WeightType::Q5K => dequantize_q5k(blk, y),
            WeightType::Q6K => dequantize_q6k(blk, y),
            other => unreachable!("{other:?} is not a K-quant"),
        }
    }
}

#[inline(always)]
pub(super) fn read_f16(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// The eight 6-bit scales and eight 6-bit minimums packed in a Q4_K/Q5_K block's 12
/// `scales` bytes, as `(scales, mins)` (ggml's `get_scale_min_k4` for `j = 0..8`).
/// Returned as four little-endian u32 words: bytes of words 0-1 are the scales, of
/// words 2-3 the minimums (what the SIMD code loads as one 128-bit vector).
#[inline(always)]
fn scale_min_k4_words(s: &[u8]) -> [u32; 4] {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let w0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let w1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let w2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    [
        // sc[0..4] = s[0..4] & 63
        w0 & LOW6,
        // sc[4..8] = (s[8..12] & 15) | (s[0..4] >> 6) << 4
        (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4),
        // m[0..4] = s[4..8] & 63
        w1 & LOW6,
        // m[4..8] = (s[8..12] >> 4) | (s[4..8] >> 6) << 4
        ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4),
    ]
}

#[inline(always)]
pub(super) fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let words = scale_min_k4_words(s);
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    sc[..4].copy_from_slice(&words[0].to_le_bytes());
    sc[4..].copy_from_slice(&words[1].to_le_bytes());
    m[..4].copy_from_slice(&words[2].to_le_bytes());
    m[4..].copy_from_slice(&words[3].to_le_bytes());
    (sc, m)
}

// The portable code avoids index arithmetic and uses wrapping integer operations (none can
// overflow: the bounds are in the comments) so that the dev profile's overflow checks do
// not stop the loops from vectorizing.

/// Unpack a Q4_K block's 256 nibbles (0..15) in value order.
#[inline(always)]
fn unpack_q4k(qs: &[u8], q: &mut [u8; QK]) {
    // Fixed-size chunks, so that the compiler sees whole vectors: with slice iterators it
    // once compiled this to a byte at a time (the portable Q4_K row product ran 5× slower).
    for j in 0..4 {
        let src: &[u8; 32] = qs[32 * j..32 * j + 32].try_into().expect("32 bytes");
        let dst: &mut [u8; 64] = (&mut q[64 * j..64 * j + 64]).try_into().expect("64 values");
        for i in 0..32 {
            dst[i] = src[i] & 0x0f;
            dst[32 + i] = src[i] >> 4;
        }
    }
}

/// Unpack a Q5_K block's 256 five-bit values (0..31) in value order.
#[inline(always)]
fn unpack_q5k(qh: &[u8], qs: &[u8], q: &mut [u8; QK]) {
    for (j, (qs, q)) in qs.chunks_exact(32).zip(q.chunks_exact_mut(64)).enumerate() {
        let (lo, hi) = q.split_at_mut(32);
        let shift = 2 * j as u32; // ≤ 6
        for (((&byte, &h), lo), hi) in qs.iter().zip(qh).zip(lo).zip(hi) {
            let h = h >> shift;
            *lo = (byte & 0x0f) | ((h & 1) << 4);
            *hi = (byte >> 4) | ((h & 2) << 3);
        }
    }
}

/// Unpack a Q6_K block's 256 six-bit values (0..63, before the −32 offset) in value order.
#[inline(always)]
fn unpack_q6k(ql: &[u8], qh: &[u8], q: &mut [u8; QK]) {
    for ((ql, qh), q) in ql.chunks_exact(64).zip(qh.chunks_exact(32)).zip(q.chunks_exact_mut(128)) {
        let (ql0, ql1) = ql.split_at(32);
        let (q01, q23) = q.split_at_mut(64);
        let (q0, q1) = q01.split_at_mut(32);
        let (q2, q3) = q23.split_at_mut(32);
        let outs = q0.iter_mut().zip(q1.iter_mut()).zip(q2.iter_mut().zip(q3.iter_mut()));
        for (((&a, &b), &h), ((q0, q1), (q2, q3))) in ql0.iter().zip(ql1).zip(qh).zip(outs) {
            *q0 = (a & 0x0f) | ((h & 3) << 4);
            *q1 = (b & 0x0f) | (((h >> 2) & 3) << 4);
            *q2 = (a >> 4) | (((h >> 4) & 3) << 4);
            *q3 = (b >> 4) | (((h >> 6) & 3) << 4);
        }
    }
}

// The dequantizers compute in the same order as ggml (`d·sc` first, then `·q − dmin·m`), so
// they agree with it bit for bit.

fn dequantize_q4k(blk: &[u8], y: &mut [f32]) {
    let (d, dmin) = (read_f16(blk, 0), read_f16(blk, 2));
    let (sc, m) = scale_min_k4(&blk[4..16]);
    let mut q = [0u8; QK];
    unpack_q4k(&blk[16..144], &mut q);
    for s in 0..8 {
        let (ds, ms) = (d * sc[s] as f32, dmin * m[s] as f32);
        for i in 32 * s..32 * s + 32 {
            y[i] = ds * q[i] as f32 - ms;
        }
    }
}

fn dequantize_q5k(blk: &[u8], y: &mut [f32]) {
    let (d, dmin) = (read_f16(blk, 0), read_f16(blk, 2));
    let (sc, m) = scale_min_k4(&blk[4..16]);
    let mut q = [0u8; QK];
    unpack_q5k(&blk[16..48], &blk[48..176], &mut q);
    for s in 0..8 {
        let (ds, ms) = (d * sc[s] as f32, dmin * m[s] as f32);
        for i in 32 * s..32 * s + 32 {
            y[i] = ds * q[i] as f32 - ms;
        }
    }
}

fn dequantize_q6k(blk: &[u8], y: &mut [f32]) {
    let d = read_f16(blk, 208);
    let mut q = [0u8; QK];
    unpack_q6k(&blk[0..128], &blk[128..192], &mut q);
    for s in 0..16 {
        let ds = d * (blk[192 + s] as i8) as f32;
        for i in 16 * s..16 * s + 16 {
            y[i] = ds * (q[i] as i32 - 32) as f32;
        }
    }
}

pub(super) fn dot_q4k(isa: Isa, w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
    dot::<Q4K>(isa, w, acts, out)
}

pub(super) fn dot_q5k(isa: Isa, w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
    dot::<Q5K>(isa, w, acts, out)
}

pub(super) fn dot_q6k(isa: Isa, w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
    dot::<Q6K>(isa, w, acts, out)
}

struct Q4K;
struct Q5K;
struct Q6K;

/// One K-quant format's portable dot product (and, on x86-64, its AVX2 body).
trait Format {
    const BYTES: usize;

    /// `Σ_i w[i]·a_t[i]` for each of the `NT` activation rows (each `w.len() / BYTES`
    /// blocks long).
    fn dot_portable<const NT: usize>(w: &[u8], acts: [&[BlockQ8K]; NT]) -> [f32; NT];
}

/// The shared front of the three dot products: check the shapes, pick the code for the
/// instruction set and the number of tokens.
#[inline(always)]
fn dot<F: Format + Simd>(isa: Isa, w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
    let nt = acts.len();
    assert!((1..=4).contains(&nt), "1 to 4 activation rows, not {nt}");
    assert!(out.len() >= nt, "output of {} for {nt} rows", out.len());
    assert_eq!(w.len() % F::BYTES, 0, "weight row of {} bytes", w.len());
    let nb = w.len() / F::BYTES;
    for a in acts {
        assert_eq!(a.len(), nb, "activation row of {} blocks for {nb} weight blocks", a.len());
    }
    if F::simd(isa, w, acts, out) {
        return;
    }
    match nt {
        1 => out[..1].copy_from_slice(&F::dot_portable(w, [acts[0]])),
        2 => out[..2].copy_from_slice(&F::dot_portable(w, [acts[0], acts[1]])),
        3 => out[..3].copy_from_slice(&F::dot_portable(w, [acts[0], acts[1], acts[2]])),
        _ => out[..4].copy_from_slice(&F::dot_portable(w, [acts[0], acts[1], acts[2], acts[3]])),
    }
}

/// `Σ a[i]·b[i]` in i32 (at most `32·63·128`).
#[inline(always)]
fn idot(a: &[u8], b: &[i8]) -> i32 {
    a.iter().zip(b).fold(0i32, |s, (&x, &y)| s.wrapping_add((x as i32).wrapping_mul(y as i32)))
}

/// Q4_K's and Q5_K's integer sums for one activation block: `(Σ_s sc_s·(q·a)_s,
/// Σ_s m_s·Σa_s)` (each below `8·63·32·31·128` in magnitude).
#[inline(always)]
pub(super) fn k4_sums(q: &[u8; QK], sc: &[u8; 8], m: &[u8; 8], a: &BlockQ8K) -> (i32, i32) {
    let mut sumi = 0i32;
    let mut summ = 0i32;
    let subs = q.chunks_exact(32).zip(a.qs.chunks_exact(32)).zip(a.bsums.chunks_exact(2));
    for (((q, aq), bs), (&sc, &m)) in subs.zip(sc.iter().zip(m)) {
        sumi = sumi.wrapping_add((sc as i32).wrapping_mul(idot(q, aq)));
        let asum = (bs[0] as i32).wrapping_add(bs[1] as i32);
        summ = summ.wrapping_add((m as i32).wrapping_mul(asum));
    }
    (sumi, summ)
}

impl Format for Q4K {
    const BYTES: usize = Q4K_BYTES;

    fn dot_portable<const NT: usize>(w: &[u8], acts: [&[BlockQ8K]; NT]) -> [f32; NT] {
        let mut sums = [0f32; NT];
        let mut q = [0u8; QK];
        for (b, blk) in w.chunks_exact(Q4K_BYTES).enumerate() {
            let (d, dmin) = (read_f16(blk, 0), read_f16(blk, 2));
            let (sc, m) = scale_min_k4(&blk[4..16]);
            unpack_q4k(&blk[16..144], &mut q);
            for (sum, a) in sums.iter_mut().zip(acts) {
                let a = &a[b];
                let (sumi, summ) = k4_sums(&q, &sc, &m, a);
                *sum += a.d * (d * sumi as f32 - dmin * summ as f32);
            }
        }
        sums
    }
}

impl Format for Q5K {
    const BYTES: usize = Q5K_BYTES;

    fn dot_portable<const NT: usize>(w: &[u8], acts: [&[BlockQ8K]; NT]) -> [f32; NT] {
        let mut sums = [0f32; NT];
        let mut q = [0u8; QK];
        for (b, blk) in w.chunks_exact(Q5K_BYTES).enumerate() {
            let (d, dmin) = (read_f16(blk, 0), read_f16(blk, 2));
            let (sc, m) = scale_min_k4(&blk[4..16]);
            unpack_q5k(&blk[16..48], &blk[48..176], &mut q);
            for (sum, a) in sums.iter_mut().zip(acts) {
                let a = &a[b];
                let (sumi, summ) = k4_sums(&q, &sc, &m, a);
                *sum += a.d * (d * sumi as f32 - dmin * summ as f32);
            }
        }
        sums
    }
}

/// A Q6_K block's 256 weights as `sc·(q − 32)` in value order (at most `128·32`), so each
/// token's dot product is one long i16×i8 sum.
#[inline(always)]
pub(super) fn unpack_scaled_q6k(blk: &[u8], w: &mut [i16; QK]) {
    let (ql, rest) = blk.split_at(128);
    let (qh, scales) = rest.split_at(64);
    let halves = ql.chunks_exact(64).zip(qh.chunks_exact(32)).zip(scales.chunks_exact(8));
    for (((ql, qh), sc), w) in halves.zip(w.chunks_exact_mut(128)) {
        let (ql0, ql1) = ql.split_at(32);
        let (w01, w23) = w.split_at_mut(64);
        let (w0, w1) = w01.split_at_mut(32);
        let (w2, w3) = w23.split_at_mut(32);
        // Values l of each 32 are sub-block l / 16 of the four groups of two.
        for p in 0..2 {
            let r = 16 * p..16 * p + 16;
            let s = [0, 2, 4, 6].map(|g| sc[g + p] as i8 as i16);
            let outs = w0[r.clone()].iter_mut().zip(w1[r.clone()].iter_mut());
            let outs = outs.zip(w2[r.clone()].iter_mut().zip(w3[r.clone()].iter_mut()));
            let ins = ql0[r.clone()].iter().zip(&ql1[r.clone()]).zip(&qh[r]);
            for (((&a, &b), &h), ((w0, w1), (w2, w3))) in ins.zip(outs) {
                let q0 = ((a & 0x0f) | ((h & 3) << 4)) as i16;
                let q1 = ((b & 0x0f) | (((h >> 2) & 3) << 4)) as i16;
                let q2 = ((a >> 4) | (((h >> 4) & 3) << 4)) as i16;
                let q3 = ((b >> 4) | (((h >> 6) & 3) << 4)) as i16;
                *w0 = s[0].wrapping_mul(q0.wrapping_sub(32));
                *w1 = s[1].wrapping_mul(q1.wrapping_sub(32));
                *w2 = s[2].wrapping_mul(q2.wrapping_sub(32));
                *w3 = s[3].wrapping_mul(q3.wrapping_sub(32));
            }
        }
    }
}

impl Format for Q6K {
    const BYTES: usize = Q6K_BYTES;

    fn dot_portable<const NT: usize>(w: &[u8], acts: [&[BlockQ8K]; NT]) -> [f32; NT] {
        let mut sums = [0f32; NT];
        let mut wq = [0i16; QK];
        for (b, blk) in w.chunks_exact(Q6K_BYTES).enumerate() {
            let d = read_f16(blk, 208);
            unpack_scaled_q6k(blk, &mut wq);
            for (sum, a) in sums.iter_mut().zip(acts) {
                let a = &a[b];
                // Below 256·4096·128 < 2³¹.
                let sumi = wq
                    .iter()
                    .zip(&a.qs)
                    .fold(0i32, |s, (&x, &y)| s.wrapping_add((x as i32).wrapping_mul(y as i32)));
                *sum += a.d * d * sumi as f32;
            }
        }
        sums
    }
}

/// The SIMD front: runs the product and returns `true` where `isa` (re-checked against the
/// CPU) has code, `false` to take the portable path.
trait Simd {
    fn simd(isa: Isa, w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) -> bool;
}

#[cfg(not(target_arch = "x86_64"))]
impl<F: Format> Simd for F {
    #[inline(always)]
    fn simd(_: Isa, _: &[u8], _: &[&[BlockQ8K]], _: &mut [f32]) -> bool {
        false
    }
}

#[cfg(target_arch = "x86_64")]
impl<F: Format + x86::Body> Simd for F {
    #[inline(always)]
    fn simd(isa: Isa, w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) -> bool {
        // `Isa` is a public enum, so a caller could name one this CPU lacks: check the CPU
        // (the detection macro caches its answer) and fall back rather than trust it.
        if isa == Isa::Portable
            || !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
        {
            return false;
        }
        if matches!(isa, Isa::Avx2Vnni | Isa::Avx512Vnni | Isa::Amx)
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the CPU has AVX2, FMA, AVX512-VNNI and AVX512VL (checked just above);
            // `dot` checked that there are 1 to 4 activation rows and a slot in `out` for
            // each (the bodies index the rows with bounds checks).
            unsafe { x86::entry_vnni::<F>(w, acts, out) };
        } else {
            // SAFETY: the CPU has AVX2 and FMA (checked above); shapes as above.
            unsafe { x86::entry_avx2::<F>(w, acts, out) };
        }
        true
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{BlockQ8K, Format, Q4K, Q4K_BYTES, Q5K, Q5K_BYTES, Q6K, Q6K_BYTES};
    use std::arch::x86_64::*;

    /// Ask for the cache lines of the block that lies `PREFETCH_AHEAD` bytes past `blk`:
    /// the weights stream from memory once per product, and the hardware prefetcher alone
    /// left the products waiting on them (with this, one stream of the Qwen3-4B shape
    /// decoded 7.8 → 9.5 tok/s and four streams 20.1 → 22.9, on a 2-core AMD EPYC with
    /// AVX2). A prefetch never faults, so the address may lie past the end of the weights.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) fn prefetch(blk: &[u8]) {
        let ahead = blk.as_ptr().wrapping_add(PREFETCH_AHEAD);
        for line in (0..blk.len()).step_by(64) {
            // SAFETY: SSE is part of x86-64; a prefetch reads nothing and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast::<i8>()) };
        }
    }

    /// How far ahead of the block in use `prefetch` asks for weights: two to four blocks
    /// of the packed K-quants, some twenty of the 32-value formats; near enough that they
    /// stay in L1 until used.
    const PREFETCH_AHEAD: usize = 2048;

    /// The scaled u8×i8 multiply-accumulate, the one operation that differs between the
    /// AVX2 and the VNNI code: `acc + Σ_pairs s·(w₀a₀ + w₁a₁)` per i32 lane, where `w` is
    /// u8, `a` i8, `s` i16 (a pair of equal i16 lanes per i32 lane). Exact when every pair
    /// sum `w₀a₀ + w₁a₁` fits i16 (weights ≤ 63 here: `63·128·2 = 16128`) and the sums
    /// fit i32.
    pub(in crate::llm::engine::kernels) trait Mac {
        /// # Safety
        /// The CPU has the implementation's target features.
        unsafe fn scaled_dot(acc: __m256i, w: __m256i, a: __m256i, s: __m256i) -> __m256i;

        /// `acc + Σ_pairs s·x` per i32 lane (`x`, `s` i16): the second half of
        /// `scaled_dot`, for callers that sum several u8×i8 products in i16 first.
        ///
        /// # Safety
        /// The CPU has the implementation's target features.
        unsafe fn madd_acc(acc: __m256i, x: __m256i, s: __m256i) -> __m256i;
    }

    pub(in crate::llm::engine::kernels) struct Avx2;
    pub(in crate::llm::engine::kernels) struct Vnni;

    impl Mac for Avx2 {
        #[inline(always)]
        unsafe fn scaled_dot(acc: __m256i, w: __m256i, a: __m256i, s: __m256i) -> __m256i {
            // SAFETY: only reached from `entry_avx2`/`entry_vnni`, which enable AVX2.
            unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), s)) }
        }

        #[inline(always)]
        unsafe fn madd_acc(acc: __m256i, x: __m256i, s: __m256i) -> __m256i {
            // SAFETY: only reached from entry points that enable AVX2.
            unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(x, s)) }
        }
    }

    impl Mac for Vnni {
        #[inline(always)]
        unsafe fn scaled_dot(acc: __m256i, w: __m256i, a: __m256i, s: __m256i) -> __m256i {
            // SAFETY: only reached from `entry_vnni`, which enables AVX2, AVX512-VNNI and
            // AVX512VL (`vpdpwssd` on 256-bit vectors).
            unsafe { _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(w, a), s) }
        }

        #[inline(always)]
        unsafe fn madd_acc(acc: __m256i, x: __m256i, s: __m256i) -> __m256i {
            // SAFETY: only reached from entry points that enable AVX2, AVX512-VNNI and
            // AVX512VL.
            unsafe { _mm256_dpwssd_epi32(acc, x, s) }
        }
    }

    /// A format's SIMD body for `NT` activation rows.
    pub(super) trait Body: Format {
        /// `Σ_i w[i]·a_t[i]` for each row `t`.
        ///
        /// # Safety
        /// The CPU has AVX2 and FMA and what `M` needs. (Shapes are checked: a row with
        /// fewer blocks than `w` panics.)
        unsafe fn body<M: Mac, const NT: usize>(w: &[u8], acts: [&[BlockQ8K]; NT]) -> [f32; NT];
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `1 ≤ acts.len() ≤ 4`, `out.len() ≥ acts.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn entry_avx2<F: Body>(w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
        // SAFETY: the caller's guarantees are `by_tokens`'s.
        unsafe { by_tokens::<F, Avx2>(w, acts, out) }
    }

    /// # Safety
    /// As `entry_avx2`, and the CPU has AVX512-VNNI and AVX512VL.
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub(super) unsafe fn entry_vnni<F: Body>(w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
        // SAFETY: the caller's guarantees are `by_tokens`'s.
        unsafe { by_tokens::<F, Vnni>(w, acts, out) }
    }

    #[inline(always)]
    unsafe fn by_tokens<F: Body, M: Mac>(w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
        // SAFETY (all arms): the features are enabled by the calling entry point.
        unsafe {
            match acts.len() {
                1 => out[..1].copy_from_slice(&F::body::<M, 1>(w, [acts[0]])),
                2 => out[..2].copy_from_slice(&F::body::<M, 2>(w, [acts[0], acts[1]])),
                3 => out[..3].copy_from_slice(&F::body::<M, 3>(w, [acts[0], acts[1], acts[2]])),
                _ => out[..4]
                    .copy_from_slice(&F::body::<M, 4>(w, [acts[0], acts[1], acts[2], acts[3]])),
            }
        }
    }

    // Loads go through fixed-size arrays: a by-value copy of `[u8; 32]` transmuted to a
    // vector is a plain unaligned load (folded into the instruction using it), and with
    // constant offsets into a fixed-size block the bounds checks disappear at compile time.
    // (`_mm256_loadu_si256` and `read_unaligned` carry debug-build precondition checks that
    // force every vector through the stack in the dev profile.)

    /// `b[at..at + 32]` as a vector.
    #[inline(always)]
    fn v256(b: &[u8], at: usize) -> __m256i {
        let bytes: [u8; 32] = b[at..at + 32].try_into().expect("32 bytes");
        // SAFETY: 32 bytes of plain data to a 32-byte vector of integers; every bit
        // pattern is valid.
        unsafe { std::mem::transmute::<[u8; 32], __m256i>(bytes) }
    }

    /// `q[at..at + 32]` as a vector.
    #[inline(always)]
    fn v256_i8(q: &[i8; 256], at: usize) -> __m256i {
        let bytes: [i8; 32] = q[at..at + 32].try_into().expect("32 bytes");
        // SAFETY: as `v256`.
        unsafe { std::mem::transmute::<[i8; 32], __m256i>(bytes) }
    }

    /// An activation block's `bsums` as a vector of 16 i16.
    #[inline(always)]
    fn bsums(a: &BlockQ8K) -> __m256i {
        // SAFETY: as `v256`, 16 i16 are 32 bytes.
        unsafe { std::mem::transmute::<[i16; 16], __m256i>(a.bsums) }
    }

    /// Sum of the eight lanes.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: AVX is enabled in every caller (the entry points).
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// Shuffle control broadcasting i16 element `k` of each 128-bit lane over the lane.
    #[inline(always)]
    unsafe fn bcast16(k: i32) -> __m256i {
        // SAFETY: AVX is enabled in every caller.
        unsafe { _mm256_set1_epi16((((2 * k + 1) << 8) | (2 * k)) as i16) }
    }

    /// Shuffle control broadcasting i16 element `k0` over the low 128-bit lane and `k1`
    /// over the high one.
    #[inline(always)]
    unsafe fn bcast16_pair(k0: i32, k1: i32) -> __m256i {
        let lo = (((2 * k0 + 1) << 8) | (2 * k0)) as i16;
        let hi = (((2 * k1 + 1) << 8) | (2 * k1)) as i16;
        // SAFETY: AVX is enabled in every caller.
        unsafe { _mm256_setr_epi16(lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi) }
    }

    /// A Q4_K/Q5_K block's scales and minimums: `scales` as i16 `[sc0..sc7 | sc0..sc7]`
    /// (both lanes), `mins` as i16 `[m0, m0, m1, m1, .., m7, m7]` (one per 16 values, the
    /// `bsums` granularity). `packed` is the 16 bytes from the block's `scales` field on
    /// (the last 4 are not used). `scale_min_k4_words` in vector registers, so that the
    /// block's integer work does not wait on a chain of scalar-to-vector moves.
    #[inline(always)]
    unsafe fn k4_scales(packed: &[u8]) -> (__m256i, __m256i) {
        let bytes: [u8; 16] = packed[..16].try_into().expect("16 bytes");
        // SAFETY: AVX2 is enabled in every caller; 16 bytes of plain data to a vector.
        unsafe {
            let x = std::mem::transmute::<[u8; 16], __m128i>(bytes);
            // Words w0 (s[0..4]), w1 (s[4..8]), w2 (s[8..12]). The result's words:
            // [w0 & 0x3f.., (w2 & 0x0f..) | (w0 >> 2) & 0x30.., w1 & 0x3f..,
            //  (w2 >> 4) & 0x0f.. | (w1 >> 2) & 0x30..].
            let a = _mm_shuffle_epi32(x, 0b10_01_10_00); // [w0, w2, w1, w2]
            let b = _mm_shuffle_epi32(x, 0b01_01_00_00); // [w0, w0, w1, w1]
            let low = _mm_and_si128(
                _mm_srlv_epi32(a, _mm_setr_epi32(0, 0, 0, 4)),
                _mm_setr_epi32(0x3f3f_3f3f, 0x0f0f_0f0f, 0x3f3f_3f3f, 0x0f0f_0f0f),
            );
            let high =
                _mm_and_si128(_mm_srli_epi32(b, 2), _mm_setr_epi32(0, 0x3030_3030, 0, 0x3030_3030));
            let x = _mm_or_si128(low, high); // bytes: sc0..sc7, m0..m7
            let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(x));
            let mins = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(x, x));
            (scales, mins)
        }
    }

    /// Q4_K's and Q5_K's integer part for one 64-value chunk `j` of a block, the two
    /// sub-blocks' weights unpacked in `lo` and `hi`: `sumi[t] += sc·(w·a)` per sub-block.
    #[inline(always)]
    unsafe fn k4_chunk<M: Mac, const NT: usize>(
        sumi: &mut [__m256i; NT],
        a: &[&BlockQ8K; NT],
        j: usize,
        (lo, hi): (__m256i, __m256i),
        scales: __m256i,
    ) {
        // SAFETY: AVX2 (and `M`'s features) are enabled in every caller.
        unsafe {
            let s_lo = _mm256_shuffle_epi8(scales, bcast16(2 * j as i32));
            let s_hi = _mm256_shuffle_epi8(scales, bcast16(2 * j as i32 + 1));
            for t in 0..NT {
                sumi[t] = M::scaled_dot(sumi[t], lo, v256_i8(&a[t].qs, 64 * j), s_lo);
                sumi[t] = M::scaled_dot(sumi[t], hi, v256_i8(&a[t].qs, 64 * j + 32), s_hi);
            }
        }
    }

    /// The per-block float step shared by Q4_K and Q5_K:
    /// `acc += d8·(d·sumi − dmin·Σ m·bsums)`.
    #[inline(always)]
    unsafe fn k4_finish<const NT: usize>(
        acc: &mut [__m256; NT],
        sumi: &[__m256i; NT],
        a: &[&BlockQ8K; NT],
        mins: __m256i,
        d: f32,
        dmin: f32,
    ) {
        // SAFETY: AVX2 and FMA are enabled in every caller.
        unsafe {
            for t in 0..NT {
                let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bsums(a[t])));
                let s = _mm256_cvtepi32_ps(sumi[t]);
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * a[t].d), s, acc[t]);
                acc[t] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * a[t].d), m, acc[t]);
            }
        }
    }

    #[inline(always)]
    unsafe fn finish<const NT: usize>(acc: [__m256; NT]) -> [f32; NT] {
        let mut sums = [0f32; NT];
        for t in 0..NT {
            // SAFETY: AVX is enabled in every caller.
            sums[t] = unsafe { hsum(acc[t]) };
        }
        sums
    }

    impl Body for Q4K {
        #[inline(always)]
        unsafe fn body<M: Mac, const NT: usize>(w: &[u8], acts: [&[BlockQ8K]; NT]) -> [f32; NT] {
            // SAFETY: AVX2 and FMA (and `M`'s features) are enabled by the entry point.
            unsafe {
                let m4 = _mm256_set1_epi8(0x0f);
                let mut acc = [_mm256_setzero_ps(); NT];
                for (b, blk) in w.chunks_exact(Q4K_BYTES).enumerate() {
                    prefetch(blk);
                    let blk: &[u8; Q4K_BYTES] = blk.try_into().expect("whole block");
                    let a: [&BlockQ8K; NT] = std::array::from_fn(|t| &acts[t][b]);
                    let (d, dmin) = (super::read_f16(blk, 0), super::read_f16(blk, 2));
                    let (scales, mins) = k4_scales(&blk[4..20]);
                    let mut sumi = [_mm256_setzero_si256(); NT];
                    for j in 0..4 {
                        let raw = v256(blk, 16 + 32 * j);
                        let lo = _mm256_and_si256(raw, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                        k4_chunk::<M, NT>(&mut sumi, &a, j, (lo, hi), scales);
                    }
                    k4_finish(&mut acc, &sumi, &a, mins, d, dmin);
                }
                finish(acc)
            }
        }
    }

    impl Body for Q5K {
        #[inline(always)]
        unsafe fn body<M: Mac, const NT: usize>(w: &[u8], acts: [&[BlockQ8K]; NT]) -> [f32; NT] {
            // SAFETY: AVX2 and FMA (and `M`'s features) are enabled by the entry point.
            unsafe {
                let m4 = _mm256_set1_epi8(0x0f);
                let bit0 = _mm256_set1_epi8(0x01);
                let bit1 = _mm256_set1_epi8(0x02);
                let mut acc = [_mm256_setzero_ps(); NT];
                for (b, blk) in w.chunks_exact(Q5K_BYTES).enumerate() {
                    prefetch(blk);
                    let blk: &[u8; Q5K_BYTES] = blk.try_into().expect("whole block");
                    let a: [&BlockQ8K; NT] = std::array::from_fn(|t| &acts[t][b]);
                    let (d, dmin) = (super::read_f16(blk, 0), super::read_f16(blk, 2));
                    let (scales, mins) = k4_scales(&blk[4..20]);
                    // Bit 2j of qh[l] is the fifth bit of value l of sub-block 2j, bit 2j+1
                    // of sub-block 2j+1. Shifting the 16-bit lanes right by 2 per chunk brings
                    // them to bits 0-1; after a shift by 2j ≤ 6 the bits that came in from
                    // the neighbouring byte sit at bits ≥ 2, so bits 0-1 are still this byte's.
                    let mut qh = v256(blk, 16);
                    let mut sumi = [_mm256_setzero_si256(); NT];
                    for j in 0..4 {
                        let raw = v256(blk, 48 + 32 * j);
                        let h_lo = _mm256_slli_epi16(_mm256_and_si256(qh, bit0), 4);
                        let h_hi = _mm256_slli_epi16(_mm256_and_si256(qh, bit1), 3);
                        qh = _mm256_srli_epi16(qh, 2);
                        let lo = _mm256_or_si256(_mm256_and_si256(raw, m4), h_lo);
                        let hi =
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), h_hi);
                        k4_chunk::<M, NT>(&mut sumi, &a, j, (lo, hi), scales);
                    }
                    k4_finish(&mut acc, &sumi, &a, mins, d, dmin);
                }
                finish(acc)
            }
        }
    }

    impl Body for Q6K {
        #[inline(always)]
        unsafe fn body<M: Mac, const NT: usize>(w: &[u8], acts: [&[BlockQ8K]; NT]) -> [f32; NT] {
            // SAFETY: AVX2 and FMA (and `M`'s features) are enabled by the entry point.
            unsafe {
                let m4 = _mm256_set1_epi8(0x0f);
                let m30 = _mm256_set1_epi8(0x30);
                let mut acc = [_mm256_setzero_ps(); NT];
                for (b, blk) in w.chunks_exact(Q6K_BYTES).enumerate() {
                    prefetch(blk);
                    // ql at 0, qh at 128, scales at 192, d at 208.
                    let blk: &[u8; Q6K_BYTES] = blk.try_into().expect("whole block");
                    let a: [&BlockQ8K; NT] = std::array::from_fn(|t| &acts[t][b]);
                    let d = super::read_f16(blk, 208);
                    let sc_bytes: [u8; 16] = blk[192..208].try_into().expect("16 scales");
                    // SAFETY: 16 bytes of plain data to a 16-byte integer vector.
                    let sc_bytes = std::mem::transmute::<[u8; 16], __m128i>(sc_bytes);
                    let mut sumi = [_mm256_setzero_si256(); NT];
                    for n in 0..2 {
                        // The eight scales of this half as i16, in both lanes.
                        let half = if n == 0 { sc_bytes } else { _mm_srli_si128(sc_bytes, 8) };
                        let sc = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(half));
                        let ql0 = v256(blk, 64 * n);
                        let ql1 = v256(blk, 64 * n + 32);
                        let qh = v256(blk, 128 + 32 * n);
                        // Each 32-value vector spans two sub-blocks: the low 128-bit lane
                        // has the first 16 values, the high lane the next 16.
                        let q = [
                            _mm256_or_si256(
                                _mm256_and_si256(ql0, m4),
                                _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(ql1, m4),
                                _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                                _mm256_and_si256(qh, m30),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                            ),
                        ];
                        for (i, &qi) in q.iter().enumerate() {
                            let k = 2 * i as i32;
                            let s = _mm256_shuffle_epi8(sc, bcast16_pair(k, k + 1));
                            for t in 0..NT {
                                let a8 = v256_i8(&a[t].qs, 128 * n + 32 * i);
                                sumi[t] = M::scaled_dot(sumi[t], qi, a8, s);
                            }
                        }
                    }
                    // The −32 offset: Σ_s sc_s·32·bsum_s, subtracted from the integer sum.
                    let sc_all = _mm256_cvtepi8_epi16(sc_bytes);
                    for t in 0..NT {
                        let offset = _mm256_slli_epi32(_mm256_madd_epi16(sc_all, bsums(a[t])), 5);
                        let s = _mm256_cvtepi32_ps(_mm256_sub_epi32(sumi[t], offset));
                        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * a[t].d), s, acc[t]);
                    }
                }
                finish(acc)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::f32_to_f16;
    use super::super::testing::{candle_dequantize, Rng};
    use super::*;

    /// A sane block scale: ±[1e-3, 1e-1], log-uniform, as f16 bytes.
    fn scale(rng: &mut Rng) -> [u8; 2] {
        let mag = 10f32.powf(-3.0 + 2.0 * rng.unit());
        let v = if rng.next() & 1 == 0 { mag } else { -mag };
        f32_to_f16(v).to_le_bytes()
    }

    const TYPES: [WeightType; 3] = [WeightType::Q4K, WeightType::Q5K, WeightType::Q6K];
    const ALL_ISAS: [Isa; 5] = [Isa::Portable, Isa::Avx2, Isa::Avx2Vnni, Isa::Avx512Vnni, Isa::Amx];

    /// `blocks` random blocks of `ty`: random quant bytes, sane f16 scales.
    fn random_row(ty: WeightType, blocks: usize, rng: &mut Rng) -> Vec<u8> {
        let bytes = ty.block_bytes();
        let mut row = vec![0u8; blocks * bytes];
        for blk in row.chunks_exact_mut(bytes) {
            rng.bytes(blk);
            match ty {
                WeightType::Q4K | WeightType::Q5K => {
                    blk[0..2].copy_from_slice(&scale(rng));
                    blk[2..4].copy_from_slice(&scale(rng));
                }
                WeightType::Q6K => blk[208..210].copy_from_slice(&scale(rng)),
                other => unreachable!("{other:?}"),
            }
        }
        row
    }

    /// Activations of `blocks` blocks with varied ranges, one block all zeros when
    /// `blocks > 2`, one with a single large outlier.
    fn random_acts(blocks: usize, rng: &mut Rng) -> Vec<f32> {
        let mut x: Vec<f32> = Vec::with_capacity(blocks * QK);
        for b in 0..blocks {
            let range = 10f32.powf(-2.0 + 4.0 * rng.unit());
            for _ in 0..QK {
                x.push(if blocks > 2 && b == 1 { 0.0 } else { range * rng.signed() });
            }
            if b == 2 {
                x[b * QK + 17] = -40.0 * range;
            }
        }
        x
    }

    fn quantize(x: &[f32]) -> Vec<BlockQ8K> {
        let mut q = vec![BlockQ8K::ZERO; x.len() / QK];
        quantize_q8k(x, &mut q);
        q
    }

    fn dequantize(ty: WeightType, w: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; w.len() / ty.block_bytes() * QK];
        dequantize_row(ty, w, &mut out);
        out
    }

    fn dot(ty: WeightType, isa: Isa, w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
        match ty {
            WeightType::Q4K => dot_q4k(isa, w, acts, out),
            WeightType::Q5K => dot_q5k(isa, w, acts, out),
            WeightType::Q6K => dot_q6k(isa, w, acts, out),
            other => unreachable!("{other:?}"),
        }
    }

    fn q8k_values(a: &[BlockQ8K]) -> Vec<f64> {
        a.iter().flat_map(|b| b.qs.iter().map(move |&q| b.d as f64 * q as f64)).collect()
    }

    #[test]
    fn quantize_round_trip() {
        let mut rng = Rng(1);
        let x = random_acts(10, &mut rng);
        let q = quantize(&x);
        for (b, (blk, x)) in q.iter().zip(x.chunks_exact(QK)).enumerate() {
            // The largest |x| through the bit patterns, whose order is the values' for non-negative
            // floats (an integer max vectorizes where a float one may not).
            let amax = f32::from_bits(x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)));
            if amax == 0.0 {
                assert_eq!(blk.d, 0.0, "block {b}");
                assert!(blk.qs.iter().all(|&q| q == 0) && blk.bsums.iter().all(|&s| s == 0));
                continue;
            }
            assert!((blk.d - amax / 127.0).abs() <= 1e-6 * blk.d, "block {b}: d {}", blk.d);
            for (i, (&q, &v)) in blk.qs.iter().zip(x).enumerate() {
                assert!(q != -128, "block {b}[{i}]");
                let err = (blk.d * q as f32 - v).abs();
                assert!(err <= 0.5 * blk.d * (1.0 + 1e-5), "block {b}[{i}]: {v} vs {q}·{}", blk.d);
            }
            for j in 0..16 {
                let sum: i32 = blk.qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
                assert_eq!(blk.bsums[j] as i32, sum, "block {b} bsums[{j}]");
            }
            for (i, s) in [0, 1, 4, 5, 2, 3, 6, 7].into_iter().enumerate() {
                let sum: i32 = blk.qs[32 * s..32 * s + 32].iter().map(|&q| q as i32).sum();
                assert_eq!(blk.bsums32[i] as i32, sum, "block {b} bsums32[{i}]");
            }
            // The largest value lands on ±127.
            assert!(blk.qs.iter().any(|&q| q.unsigned_abs() == 127), "block {b}");
        }
        // All-subnormal values (127/amax would overflow) quantize to zeros, not garbage.
        let tiny: Vec<f32> = (0..QK).map(|i| if i % 3 == 0 { 1e-39 } else { -2e-39 }).collect();
        let q = quantize(&tiny);
        assert_eq!(q[0].d, 0.0);
        assert!(q[0].qs.iter().all(|&q| q == 0) && q[0].bsums.iter().all(|&s| s == 0));
    }

    #[test]
    fn dequantize_matches_candle() {
        let mut rng = Rng(2);
        for ty in TYPES {
            for blocks in [1, 3, 10] {
                let w = random_row(ty, blocks, &mut rng);
                let ours = dequantize(ty, &w);
                let theirs = candle_dequantize(ty, &w, 1, blocks * QK);
                assert_eq!(ours.len(), theirs.len());
                for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{ty:?} x{blocks} [{i}]: {a} vs {b}");
                }
            }
        }
    }

    /// Every format, every instruction set (ones the CPU lacks fall back), 1 to 4 tokens,
    /// rows of 1, 3 and 10 blocks: against the f64 dot of the dequantized weights with the
    /// dequantized activations (tight), and with the original activations (within the
    /// activation quantization's bound).
    #[test]
    fn dots_match_reference() {
        let mut rng = Rng(3);
        for ty in TYPES {
            for blocks in [1, 3, 10] {
                let w = random_row(ty, blocks, &mut rng);
                let wf: Vec<f64> = dequantize(ty, &w).iter().map(|&v| v as f64).collect();
                let xs: Vec<Vec<f32>> = (0..4).map(|_| random_acts(blocks, &mut rng)).collect();
                let qs: Vec<Vec<BlockQ8K>> = xs.iter().map(|x| quantize(x)).collect();
                for nt in 1..=4 {
                    let acts: Vec<&[BlockQ8K]> = qs[..nt].iter().map(|q| q.as_slice()).collect();
                    for isa in ALL_ISAS {
                        let mut out = [f32::NAN; 6];
                        dot(ty, isa, &w, &acts, &mut out);
                        assert!(out[nt..].iter().all(|v| v.is_nan()), "wrote past {nt}");
                        for t in 0..nt {
                            let what = format!("{ty:?} x{blocks} {} nt={nt} t={t}", isa.name());
                            let aq = q8k_values(&qs[t]);
                            let exact: f64 = wf.iter().zip(&aq).map(|(w, a)| w * a).sum();
                            let mag: f64 = wf.iter().zip(&aq).map(|(w, a)| (w * a).abs()).sum();
                            let got = out[t] as f64;
                            assert!(
                                (got - exact).abs() <= 1e-4 * mag + 1e-30,
                                "{what}: {got} vs {exact} (Σ|w·a| {mag})"
                            );
                            // Against the unquantized activations: each activation is off by
                            // at most d/2 of its block.
                            let x = &xs[t];
                            let real: f64 = wf.iter().zip(x).map(|(w, &a)| w * a as f64).sum();
                            let bound: f64 = wf
                                .chunks_exact(QK)
                                .zip(&qs[t])
                                .map(|(w, b)| w.iter().map(|v| v.abs()).sum::<f64>() * b.d as f64)
                                .sum::<f64>()
                                * 0.5
                                * (1.0 + 1e-4)
                                + 1e-4 * mag;
                            assert!(
                                (got - real).abs() <= bound,
                                "{what}: {got} vs unquantized {real} (bound {bound})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Extreme integers: every weight bit set (the largest unsigned values) against
    /// activations of −128 and 127 (−128 never comes from `quantize_q8k`, but the kernels
    /// must not saturate on it either), and the alternating pattern.
    #[test]
    fn dots_exact_at_extremes() {
        for ty in TYPES {
            let bytes = ty.block_bytes();
            let mut w = vec![0xffu8; 2 * bytes];
            for blk in w.chunks_exact_mut(bytes) {
                let d = f32_to_f16(0.0625).to_le_bytes();
                match ty {
                    WeightType::Q6K => {
                        blk[208..210].copy_from_slice(&d);
                        // Scales of −128 and 127 alternating.
                        for s in 0..16 {
                            blk[192 + s] = if s % 2 == 0 { 0x80 } else { 0x7f };
                        }
                    }
                    _ => {
                        blk[0..2].copy_from_slice(&d);
                        blk[2..4].copy_from_slice(&f32_to_f16(0.5).to_le_bytes());
                    }
                }
            }
            let wf: Vec<f64> = dequantize(ty, &w).iter().map(|&v| v as f64).collect();
            let patterns: [fn(usize) -> i8; 3] =
                [|_| -128, |_| 127, |i| if i % 2 == 0 { -128 } else { 127 }];
            for pattern in patterns {
                let mut a = vec![BlockQ8K { d: 0.5, ..BlockQ8K::ZERO }; 2];
                for blk in &mut a {
                    for (i, q) in blk.qs.iter_mut().enumerate() {
                        *q = pattern(i);
                    }
                    blk.fill_sums();
                }
                let aq = q8k_values(&a);
                let exact: f64 = wf.iter().zip(&aq).map(|(w, a)| w * a).sum();
                let mag: f64 = wf.iter().zip(&aq).map(|(w, a)| (w * a).abs()).sum();
                for isa in ALL_ISAS {
                    for nt in 1..=4 {
                        let acts = vec![a.as_slice(); nt];
                        let mut out = [0f32; 4];
                        dot(ty, isa, &w, &acts, &mut out);
                        for (t, &got) in out[..nt].iter().enumerate() {
                            assert!(
                                (got as f64 - exact).abs() <= 1e-6 * mag,
                                "{ty:?} {} nt={nt} t={t}: {got} vs {exact}",
                                isa.name()
                            );
                        }
                    }
                }
            }
        }
    }
}
