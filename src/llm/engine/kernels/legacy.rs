//! The 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) against `BlockQ8x32` activations,
//! and f32 weights against f32 activations.
//!
//! A dot product multiplies one weight row by 1 to `MAX_TOKENS_PER_DOT` activation rows
//! (`NT`, a const generic): each weight block is unpacked once and used for every token.
//! Integer products stay in i32 within a block; blocks are scaled and summed in f32, with one
//! horizontal sum per output. The AVX2 and AVX-512 VNNI variants are one generic body
//! (`x86::dot_body`) that differ only in the u8×i8 multiply-accumulate (`x86::U8I8Dot`).
//! Signed weights use the sign trick: `|w|` is the unsigned operand and the activation with
//! `w`'s sign the signed one (`|w| ≤ 128`, `|a| ≤ 127`, so a pair of products fits i16).

use super::{f16_to_f32, BlockQ8x32, Isa, WeightType, MAX_TOKENS_PER_DOT};

/// Values per block.
const QK: usize = 32;

/// Quantize `x` (a whole number of 32-value blocks, any number of rows) into `out`.
///
/// Per block: `d = max|x| / 127`, `qs = round(x / d)` (ties to even; all 0 when `d` is 0
/// or subnormal, and then `d = 0`), `s = d · Σ qs`. Every `qs` lies in `-127..=127`.
pub(super) fn quantize_q8x32(x: &[f32], out: &mut [BlockQ8x32]) {
    assert_eq!(x.len(), out.len() * QK, "quantize_q8x32: values vs blocks");
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: `has_avx2` checked at run time that the CPU has AVX2, FMA and F16C, the
        // features `quantize_avx2` is compiled for; the lengths were checked above.
        unsafe { x86::quantize_avx2(x, out) };
        return;
    }
    quantize_portable(x, out);
}

/// The reciprocal scale of a block whose largest magnitude is `amax`, and the scale itself
/// (0 when `amax / 127` is not a normal float, so `1 / d` is always finite).
#[inline(always)]
fn q8_scales(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    if d >= f32::MIN_POSITIVE {
        (d, 1.0 / d)
    } else {
        (0.0, 0.0)
    }
}

/// The block's `d` and `s` as kept: at f16 precision, computed as ggml's `block_q8_1`
/// (and candle's) compute them: `d` rounded to f16, `s = f16(f16(Σqs) · d)`. Keeping f32
/// would be a hair more precise, but then our products would differ from llama.cpp's and
/// candle's in the rounding of every activation scale, and comparisons with them would
/// measure that instead of the kernels.
#[inline(always)]
fn stored_scales(d: f32, sum: i32) -> (f32, f32) {
    let round = |v: f32| super::f16_to_f32(super::f32_to_f16(v));
    let d = round(d);
    (d, round(round(sum as f32) * d))
}

fn quantize_portable(x: &[f32], out: &mut [BlockQ8x32]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d, id) = q8_scales(amax);
        let mut sum = 0i32;
        for (q, &v) in ob.qs.iter_mut().zip(xb) {
            *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
            sum += i32::from(*q);
        }
        (ob.d, ob.s) = stored_scales(d, sum);
        ob.sum = sum;
    }
}

pub(super) fn dequantize_row(ty: WeightType, w: &[u8], out: &mut [f32]) {
    match ty {
        WeightType::Q4_0 => dequantize::<Q4_0>(w, out),
        WeightType::Q4_1 => dequantize::<Q4_1>(w, out),
        WeightType::Q5_0 => dequantize::<Q5_0>(w, out),
        WeightType::Q5_1 => dequantize::<Q5_1>(w, out),
        WeightType::Q8_0 => dequantize::<Q8_0>(w, out),
        other => panic!("legacy dequantize_row: {other:?} is not a 32-value block format"),
    }
}

fn dequantize<F: Format>(w: &[u8], out: &mut [f32]) {
    assert_eq!(w.len() % F::BYTES, 0, "dequantize_row: ragged block bytes");
    assert_eq!(out.len(), w.len() / F::BYTES * QK, "dequantize_row: output width");
    for (block, o) in w.chunks_exact(F::BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, m, q) = F::unpack(block);
        for (o, &q) in o.iter_mut().zip(&q) {
            *o = if F::OFFSET { d * f32::from(q) + m } else { d * f32::from(q) };
        }
    }
}

pub(super) fn dot_f32(isa: Isa, w: &[f32], acts: &[&[f32]], out: &mut [f32]) {
    let nt = check_tokens(acts.len(), out.len());
    for a in acts {
        assert_eq!(a.len(), w.len(), "dot_f32: activation width vs weight width");
    }
    match nt {
        1 => dot_f32_nt::<1>(isa, w, acts, out),
        2 => dot_f32_nt::<2>(isa, w, acts, out),
        3 => dot_f32_nt::<3>(isa, w, acts, out),
        _ => dot_f32_nt::<4>(isa, w, acts, out),
    }
}

#[inline(always)]
fn dot_f32_nt<const NT: usize>(isa: Isa, w: &[f32], acts: &[&[f32]], out: &mut [f32]) {
    let rows: [&[f32]; NT] = std::array::from_fn(|j| acts[j]);
    #[cfg(target_arch = "x86_64")]
    if usable(isa) != Isa::Portable {
        // SAFETY: `usable` confirmed at run time that the CPU has AVX2 and FMA (dot_f32 has
        // no VNNI variant: the AVX2 code serves both); the widths were checked by `dot_f32`
        // and `out` holds at least NT values (`check_tokens`).
        unsafe {
            // Four accumulators per token (enough independent FMA chains) fit the 16
            // registers for two tokens at a time; more tokens go by pairs, so each token's
            // sum is the same however many share the call (batched rows equal single rows).
            let mut j = 0;
            while j < NT {
                if j + 1 < NT {
                    x86::dot_f32_avx2::<2, 4>(w, [rows[j], rows[j + 1]], &mut out[j..j + 2]);
                    j += 2;
                } else {
                    x86::dot_f32_avx2::<1, 4>(w, [rows[j]], &mut out[j..j + 1]);
                    j += 1;
                }
            }
        }
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    dot_f32_portable(w, rows, out);
}

fn dot_f32_portable<const NT: usize>(w: &[f32], acts: [&[f32]; NT], out: &mut [f32]) {
    const LANES: usize = 8;
    let mut acc = [[0f32; LANES]; NT];
    let body = w.len() / LANES * LANES;
    for (i, wc) in w[..body].chunks_exact(LANES).enumerate() {
        for (acc, a) in acc.iter_mut().zip(&acts) {
            let ac = &a[i * LANES..(i + 1) * LANES];
            for l in 0..LANES {
                acc[l] += wc[l] * ac[l];
            }
        }
    }
    for j in 0..NT {
        let mut s: f32 = acc[j].iter().sum();
        for k in body..w.len() {
            s += w[k] * acts[j][k];
        }
        out[j] = s;
    }
}

pub(super) fn dot_q4_0(isa: Isa, w: &[u8], acts: &[&[BlockQ8x32]], out: &mut [f32]) {
    dot_blocks::<Q4_0>(isa, w, acts, out)
}

pub(super) fn dot_q4_1(isa: Isa, w: &[u8], acts: &[&[BlockQ8x32]], out: &mut [f32]) {
    dot_blocks::<Q4_1>(isa, w, acts, out)
}

pub(super) fn dot_q5_0(isa: Isa, w: &[u8], acts: &[&[BlockQ8x32]], out: &mut [f32]) {
    dot_blocks::<Q5_0>(isa, w, acts, out)
}

pub(super) fn dot_q5_1(isa: Isa, w: &[u8], acts: &[&[BlockQ8x32]], out: &mut [f32]) {
    dot_blocks::<Q5_1>(isa, w, acts, out)
}

pub(super) fn dot_q8_0(isa: Isa, w: &[u8], acts: &[&[BlockQ8x32]], out: &mut [f32]) {
    dot_blocks::<Q8_0>(isa, w, acts, out)
}

/// The number of tokens, checked: 1..=MAX_TOKENS_PER_DOT, and `out` holds that many.
fn check_tokens(nt: usize, out_len: usize) -> usize {
    assert!(
        (1..=MAX_TOKENS_PER_DOT).contains(&nt),
        "a dot product takes 1 to {MAX_TOKENS_PER_DOT} activation rows, not {nt}"
    );
    assert!(out_len >= nt, "dot product output of {out_len} for {nt} tokens");
    nt
}

fn dot_blocks<F: Format>(isa: Isa, w: &[u8], acts: &[&[BlockQ8x32]], out: &mut [f32]) {
    let nt = check_tokens(acts.len(), out.len());
    assert_eq!(w.len() % F::BYTES, 0, "dot: ragged weight row");
    let nb = w.len() / F::BYTES;
    for a in acts {
        assert_eq!(a.len(), nb, "dot: activation blocks vs weight blocks");
    }
    match nt {
        1 => dot_blocks_nt::<F, 1>(isa, w, acts, out),
        2 => dot_blocks_nt::<F, 2>(isa, w, acts, out),
        3 => dot_blocks_nt::<F, 3>(isa, w, acts, out),
        _ => dot_blocks_nt::<F, 4>(isa, w, acts, out),
    }
}

#[inline(always)]
fn dot_blocks_nt<F: Format, const NT: usize>(
    isa: Isa,
    w: &[u8],
    acts: &[&[BlockQ8x32]],
    out: &mut [f32],
) {
    let rows: [&[BlockQ8x32]; NT] = std::array::from_fn(|j| acts[j]);
    #[cfg(target_arch = "x86_64")]
    match usable(isa) {
        Isa::Avx2Vnni => {
            // SAFETY: `usable` confirmed at run time that the CPU has AVX2, FMA, F16C,
            // AVX512_VNNI and AVX512VL. (Bounds are checked inside: slices, not pointers.)
            unsafe { x86::dot_vnni::<F, NT>(w, rows, out) };
            return;
        }
        Isa::Avx2 => {
            // SAFETY: `usable` confirmed at run time that the CPU has AVX2, FMA and F16C.
            unsafe { x86::dot_avx2::<F, NT>(w, rows, out) };
            return;
        }
        Isa::Amx | Isa::Avx512Vnni | Isa::Portable => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    dot_blocks_portable::<F, NT>(w, rows, out);
}

fn dot_blocks_portable<F: Format, const NT: usize>(
    w: &[u8],
    acts: [&[BlockQ8x32]; NT],
    out: &mut [f32],
) {
    let mut sum = [0f32; NT];
    let mut offset = [0f32; NT];
    for (b, block) in w.chunks_exact(F::BYTES).enumerate() {
        let (d, m, q) = F::unpack(block);
        for j in 0..NT {
            let a = &acts[j][b];
            let isum: i32 = q.iter().zip(&a.qs).map(|(&x, &y)| i32::from(x) * i32::from(y)).sum();
            sum[j] += d * a.d * isum as f32;
            if F::OFFSET {
                offset[j] += m * a.s;
            }
        }
    }
    for j in 0..NT {
        out[j] = sum[j] + offset[j];
    }
}

/// The instruction set to really run: `isa`, or the best below it that this CPU has. `Isa`
/// is a public enum, so a caller could name one the CPU lacks; the target-feature code must
/// never run then. `is_x86_feature_detected!` caches, so this is a few loads.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn usable(isa: Isa) -> Isa {
    match isa {
        Isa::Amx | Isa::Avx512Vnni | Isa::Avx2Vnni if x86::has_vnni() => Isa::Avx2Vnni,
        Isa::Amx | Isa::Avx512Vnni | Isa::Avx2Vnni | Isa::Avx2 if x86::has_avx2() => Isa::Avx2,
        _ => Isa::Portable,
    }
}

/// One 32-value weight block format (ggml's byte layout).
pub(super) trait Format {
    /// Bytes per block.
    const BYTES: usize;
    /// `true` for Q4_1 and Q5_1: values are `d·q + m` with `q` in 0..=15 (0..=31);
    /// otherwise `d·q`, `q` signed.
    const OFFSET: bool;
    /// `[u8; BYTES]`: one block's bytes, so the SIMD code reads them at fixed offsets
    /// with no bounds checks.
    type Block;

    /// Scale `d`, offset `m` (0 for the signed formats) and the 32 integer values of
    /// `block` (`BYTES` long).
    fn unpack(block: &[u8]) -> (f32, f32, [i8; QK]);

    /// SIMD form of `unpack`: `d` broadcast to 8 lanes, `m`, and the 32 values as bytes
    /// (i8 for the signed formats, u8 for Q4_1 and Q5_1), in activation order.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C, and the caller is compiled with them (this is inlined
    /// into a `target_feature` function).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load(
        block: &Self::Block,
    ) -> (std::arch::x86_64::__m256, f32, std::arch::x86_64::__m256i);
}

/// The f16 at byte `i` of `b`.
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// The 32 five-bit values of Q5_0 and Q5_1, minus `offset`: value `j` is nibble `j` of
/// `qs` (low nibbles first, as Q4_0's) with bit `j` of `qh` as its fifth bit.
#[inline(always)]
fn five_bits(qh: u32, qs: &[u8], offset: i8) -> [i8; QK] {
    let mut q = [0i8; QK];
    for j in 0..16 {
        let x = qs[j];
        let lo = (x & 15) | (((qh >> j) & 1) as u8) << 4;
        let hi = (x >> 4) | (((qh >> (j + 16)) & 1) as u8) << 4;
        q[j] = lo as i8 - offset;
        q[j + 16] = hi as i8 - offset;
    }
    q
}

/// `d: f16, qs: [u8; 16]`: value `j` is `(qs[j] & 15) - 8`, value `j + 16` is
/// `(qs[j] >> 4) - 8`, times `d`.
pub(super) struct Q4_0;

/// `d: f16, m: f16, qs: [u8; 16]`: nibbles as Q4_0, unsigned; value `d·q + m`.
pub(super) struct Q4_1;

/// `d: f16, qh: u32 (LE), qs: [u8; 16]`: nibbles as Q4_0, with bit `j` of `qh` the fifth
/// bit of value `j` (and bit `j + 16` of value `j + 16`); value `(q - 16) · d`.
pub(super) struct Q5_0;

/// `d: f16, m: f16, qh: u32 (LE), qs: [u8; 16]`: the values of Q5_0 unsigned (0..=31);
/// value `d·q + m`.
pub(super) struct Q5_1;

/// `d: f16, qs: [i8; 32]`: value `d · qs[j]`.
pub(super) struct Q8_0;

impl Format for Q4_0 {
    const BYTES: usize = 18;
    type Block = [u8; 18];
    const OFFSET: bool = false;

    #[inline(always)]
    fn unpack(b: &[u8]) -> (f32, f32, [i8; QK]) {
        let mut q = [0i8; QK];
        for j in 0..16 {
            let x = b[2 + j];
            q[j] = (x & 15) as i8 - 8;
            q[j + 16] = (x >> 4) as i8 - 8;
        }
        (f16_at(b, 0), 0.0, q)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(
        b: &Self::Block,
    ) -> (std::arch::x86_64::__m256, f32, std::arch::x86_64::__m256i) {
        use std::arch::x86_64::*;
        // SAFETY: the nibbles are bytes 2..18 of the block, in bounds;
        // AVX2 and F16C are present (the caller's contract).
        unsafe {
            let q = x86::nibbles(b.as_ptr().wrapping_add(2));
            (x86::scale8(b[0], b[1]), 0.0, _mm256_sub_epi8(q, _mm256_set1_epi8(8)))
        }
    }
}

impl Format for Q4_1 {
    const BYTES: usize = 20;
    type Block = [u8; 20];
    const OFFSET: bool = true;

    #[inline(always)]
    fn unpack(b: &[u8]) -> (f32, f32, [i8; QK]) {
        let mut q = [0i8; QK];
        for j in 0..16 {
            let x = b[4 + j];
            q[j] = (x & 15) as i8;
            q[j + 16] = (x >> 4) as i8;
        }
        (f16_at(b, 0), f16_at(b, 2), q)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(
        b: &Self::Block,
    ) -> (std::arch::x86_64::__m256, f32, std::arch::x86_64::__m256i) {
        // SAFETY: d and m are bytes 0..4, the nibbles 4..20, in bounds;
        // AVX2 and F16C are present (the caller's contract).
        unsafe {
            let (d, m) = x86::scale_and_min(b);
            (d, m, x86::nibbles(b.as_ptr().wrapping_add(4)))
        }
    }
}

impl Format for Q5_0 {
    const BYTES: usize = 22;
    type Block = [u8; 22];
    const OFFSET: bool = false;

    #[inline(always)]
    fn unpack(b: &[u8]) -> (f32, f32, [i8; QK]) {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        (f16_at(b, 0), 0.0, five_bits(qh, &b[6..22], 16))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(
        b: &Self::Block,
    ) -> (std::arch::x86_64::__m256, f32, std::arch::x86_64::__m256i) {
        use std::arch::x86_64::*;
        // SAFETY: d is bytes 0..2, qh 2..6, the nibbles 6..22, in bounds;
        // AVX2 and F16C are present (the caller's contract).
        unsafe {
            let q = x86::nibbles(b.as_ptr().wrapping_add(6));
            let qh = i32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            // Byte k of `set` is 0xFF where bit k of qh is set.
            let set = x86::bits_to_bytes(qh);
            // Where the fifth bit is clear, q | 0xF0 is q - 16 as i8; where set, q + 16 - 16.
            let high = _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8));
            (x86::scale8(b[0], b[1]), 0.0, _mm256_or_si256(q, high))
        }
    }
}

impl Format for Q5_1 {
    const BYTES: usize = 24;
    type Block = [u8; 24];
    const OFFSET: bool = true;

    #[inline(always)]
    fn unpack(b: &[u8]) -> (f32, f32, [i8; QK]) {
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        (f16_at(b, 0), f16_at(b, 2), five_bits(qh, &b[8..24], 0))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(
        b: &Self::Block,
    ) -> (std::arch::x86_64::__m256, f32, std::arch::x86_64::__m256i) {
        use std::arch::x86_64::*;
        // SAFETY: d and m are bytes 0..4, qh 4..8, the nibbles 8..24, in bounds;
        // AVX2 and F16C are present (the caller's contract).
        unsafe {
            let (d, m) = x86::scale_and_min(b);
            let q = x86::nibbles(b.as_ptr().wrapping_add(8));
            let set = x86::bits_to_bytes(i32::from_le_bytes([b[4], b[5], b[6], b[7]]));
            (d, m, _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(0x10))))
        }
    }
}

impl Format for Q8_0 {
    const BYTES: usize = 34;
    type Block = [u8; 34];
    const OFFSET: bool = false;

    #[inline(always)]
    fn unpack(b: &[u8]) -> (f32, f32, [i8; QK]) {
        let q = std::array::from_fn(|j| b[2 + j] as i8);
        (f16_at(b, 0), 0.0, q)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(
        b: &Self::Block,
    ) -> (std::arch::x86_64::__m256, f32, std::arch::x86_64::__m256i) {
        // SAFETY: the values are bytes 2..34 of the block, in bounds;
        // AVX2 and F16C are present (the caller's contract).
        unsafe { (x86::scale8(b[0], b[1]), 0.0, x86::load32(b.as_ptr().wrapping_add(2))) }
    }
}

/// The AVX2 / AVX-512 VNNI kernels.
///
/// Loads use `lddqu` and pointer offsets `wrapping_add`: both compile to the same
/// instructions as `loadu` and `add`, but carry none of the debug-build precondition
/// checks, which would otherwise triple the dev profile's time in these loops.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{q8_scales, BlockQ8x32, Format, QK};
    use std::arch::x86_64::*;

    /// AVX2, FMA and F16C: what the `Isa::Avx2` code is compiled for.
    #[inline(always)]
    pub(super) fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// `has_avx2` plus AVX512_VNNI and AVX512VL (`vpdpbusd` on 256-bit vectors).
    #[inline(always)]
    pub(super) fn has_vnni() -> bool {
        has_avx2() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
    }

    /// The u8×i8 multiply-accumulate, the one thing the AVX2 and VNNI kernels do differently.
    pub(super) trait U8I8Dot {
        /// `acc` plus, per 32-bit lane, the sum of its four u8×i8 products of `u` and `s`.
        ///
        /// # Safety
        /// The CPU has the implementation's features and the caller is compiled with them.
        /// For `Avx2Dot`, each adjacent pair's product sum must fit i16 (callers pass
        /// `u ≤ 128`, `|s| ≤ 127`: at most 32512 in magnitude).
        unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
    }

    /// `vpmaddubsw` then `vpmaddwd` with ones.
    pub(super) struct Avx2Dot;

    /// `vpdpbusd` (AVX512_VNNI + AVX512VL on 256-bit vectors).
    pub(super) struct VnniDot;

    impl U8I8Dot for Avx2Dot {
        #[inline(always)]
        unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
            // SAFETY: AVX2 is present (the caller's contract); pair sums fit i16 (ditto).
            unsafe {
                let pairs = _mm256_maddubs_epi16(u, s);
                _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
            }
        }
    }

    impl U8I8Dot for VnniDot {
        #[inline(always)]
        unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
            // SAFETY: AVX512_VNNI and AVX512VL are present (the caller's contract).
            unsafe { _mm256_dpbusd_epi32(acc, u, s) }
        }
    }

    /// 32 bytes at `p`.
    ///
    /// # Safety
    /// `p` points to 32 readable bytes; AVX is present.
    #[inline(always)]
    pub(super) unsafe fn load32(p: *const u8) -> __m256i {
        // SAFETY: the caller's contract.
        unsafe { _mm256_lddqu_si256(p.cast()) }
    }

    /// 8 floats at `p`.
    ///
    /// # Safety
    /// `p` points to 8 readable floats; AVX is present.
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm256_castsi256_ps(_mm256_lddqu_si256(p.cast())) }
    }

    /// The little-endian f16 `lo, hi` as f32, in all 8 lanes.
    ///
    /// # Safety
    /// F16C and AVX2 are present.
    #[inline(always)]
    pub(super) unsafe fn scale8(lo: u8, hi: u8) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([lo, hi]))) }
    }

    /// The f16 scale and minimum at the start of a block (Q4_1, Q5_1): `d` in all 8 lanes,
    /// and `m`.
    ///
    /// # Safety
    /// F16C and AVX2 are present.
    #[inline(always)]
    pub(super) unsafe fn scale_and_min(b: &[u8]) -> (__m256, f32) {
        // SAFETY: the caller's contract; the four bytes are read through the slice.
        unsafe {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            (_mm256_broadcastss_ps(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
        }
    }

    /// 16 bytes at `p` as 32 nibbles: the low nibbles in bytes 0..16, the high in 16..32.
    ///
    /// # Safety
    /// `p` points to 16 readable bytes; AVX2 is present.
    #[inline(always)]
    pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
        // SAFETY: the caller's contract.
        unsafe {
            let x = _mm_lddqu_si128(p.cast());
            let both = _mm256_set_m128i(_mm_srli_epi16(x, 4), x);
            _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
        }
    }

    /// Byte `k` is 0xFF where bit `k` of `bits` is set, else 0.
    ///
    /// # Safety
    /// AVX2 is present.
    #[inline(always)]
    pub(super) unsafe fn bits_to_bytes(bits: i32) -> __m256i {
        // SAFETY: the caller's contract.
        unsafe {
            // Byte k takes byte k / 8 of `bits` (each 128-bit lane holds all four)...
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(bits),
                _mm256_set_epi64x(
                    0x0303_0303_0303_0303,
                    0x0202_0202_0202_0202,
                    0x0101_0101_0101_0101,
                    0,
                ),
            );
            // ...and is all ones once every bit but bit k % 8 is forced on.
            let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
            _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
        }
    }

    /// Sum of the 8 lanes.
    ///
    /// # Safety
    /// AVX is present.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: the caller's contract.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }

    /// Weight block `wb` times block `b` of each token, added into `acc` and `offset`.
    ///
    /// # Safety
    /// As `dot_body`.
    #[inline(always)]
    unsafe fn block<F: Format, D: U8I8Dot, const NT: usize>(
        wb: &F::Block,
        b: usize,
        acts: &[&[BlockQ8x32]; NT],
        acc: &mut [__m256; NT],
        offset: &mut [f32; NT],
    ) {
        // SAFETY: the features are present (the caller's contract); every memory access
        // here is through a bounds-checked slice or a reference.
        unsafe {
            let (d, m, q) = F::load(wb);
            // Unsigned operand: Q4_1's and Q5_1's values are already 0..=31; otherwise
            // |w| ≤ 128.
            let u = if F::OFFSET { q } else { _mm256_abs_epi8(q) };
            for j in 0..NT {
                let a = &acts[j][b];
                let aq = load32(a.qs.as_ptr().cast());
                // |a| ≤ 127 (the quantizer clamps), so negating it cannot overflow.
                let s = if F::OFFSET { aq } else { _mm256_sign_epi8(aq, q) };
                let isum = D::dot(_mm256_setzero_si256(), u, s);
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[j]);
                if F::OFFSET {
                    offset[j] += m * a.s;
                }
            }
        }
    }

    /// `out[j] = Σ_b` (weight block b) · (activation block b of token j), for j < NT.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA, F16C and `D`'s features, and the caller is compiled with them.
    #[inline(always)]
    unsafe fn dot_body<F: Format, D: U8I8Dot, const NT: usize>(
        w: &[u8],
        acts: [&[BlockQ8x32]; NT],
        out: &mut [f32],
    ) {
        let nb = w.len() / F::BYTES;
        assert!(
            std::mem::size_of::<F::Block>() == F::BYTES && std::mem::align_of::<F::Block>() == 1
        );
        // SAFETY: `F::Block` is `[u8; BYTES]` (size and alignment checked above), and the
        // `nb` blocks lie within `w`.
        let blocks: &[F::Block] =
            unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<F::Block>(), nb) };
        // Every row cut to `nb` blocks, so indexing with `b < nb` needs no bounds checks.
        let acts = acts.map(|a| &a[..nb]);
        let mut acc0 = [_mm256_setzero_ps(); NT];
        let mut acc1 = [_mm256_setzero_ps(); NT];
        let mut off0 = [0f32; NT];
        let mut off1 = [0f32; NT];
        // SAFETY: the caller's contract.
        unsafe {
            if NT <= 2 {
                // Few tokens: a second set of accumulators for the odd blocks, so the loop
                // is not bound by the FMA latency of one chain.
                let mut b = 0;
                while b + 1 < nb {
                    block::<F, D, NT>(&blocks[b], b, &acts, &mut acc0, &mut off0);
                    block::<F, D, NT>(&blocks[b + 1], b + 1, &acts, &mut acc1, &mut off1);
                    b += 2;
                }
                if b < nb {
                    block::<F, D, NT>(&blocks[b], b, &acts, &mut acc0, &mut off0);
                }
            } else {
                // The tokens' chains are independent already, and a second set of
                // accumulators for every token would spill registers; so the even blocks,
                // then the odd ones. Each token gets exactly the sums of the interleaved
                // loop above, so a result does not depend on how many tokens share the
                // pass (a batched decode row equals the row decoded alone).
                let mut b = 0;
                while b < nb {
                    block::<F, D, NT>(&blocks[b], b, &acts, &mut acc0, &mut off0);
                    b += 2;
                }
                let mut b = 1;
                while b < nb {
                    block::<F, D, NT>(&blocks[b], b, &acts, &mut acc1, &mut off1);
                    b += 2;
                }
            }
            for j in 0..NT {
                out[j] = hsum(_mm256_add_ps(acc0[j], acc1[j])) + (off0[j] + off1[j]);
            }
        }
    }

    /// AVX2 entry point of `dot_body`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2<F: Format, const NT: usize>(
        w: &[u8],
        acts: [&[BlockQ8x32]; NT],
        out: &mut [f32],
    ) {
        // SAFETY: this function's contract, and it is compiled with the features.
        unsafe { dot_body::<F, Avx2Dot, NT>(w, acts, out) }
    }

    /// AVX-512 VNNI entry point of `dot_body`: the same code with `vpdpbusd`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA, F16C, AVX512_VNNI and AVX512VL.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn dot_vnni<F: Format, const NT: usize>(
        w: &[u8],
        acts: [&[BlockQ8x32]; NT],
        out: &mut [f32],
    ) {
        // SAFETY: this function's contract, and it is compiled with the features.
        unsafe { dot_body::<F, VnniDot, NT>(w, acts, out) }
    }

    /// f32 weights times NT f32 rows, `U` 8-lane accumulators per token.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32_avx2<const NT: usize, const U: usize>(
        w: &[f32],
        acts: [&[f32]; NT],
        out: &mut [f32],
    ) {
        let n = w.len();
        assert!(acts.iter().all(|a| a.len() == n) && out.len() >= NT);
        let wp = w.as_ptr();
        let ap = acts.map(|a| a.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); U]; NT];
        let mut i = 0;
        // SAFETY: every load reads 8 floats ending at or before n, within `w` and every
        // row (all n long: checked above); AVX2 and FMA are present.
        unsafe {
            while i + 8 * U <= n {
                // `u` is an offset as much as an index: a range reads best.
                #[allow(clippy::needless_range_loop)]
                for u in 0..U {
                    let wv = load8(wp.wrapping_add(i + 8 * u));
                    for j in 0..NT {
                        let av = load8(ap[j].wrapping_add(i + 8 * u));
                        acc[j][u] = _mm256_fmadd_ps(wv, av, acc[j][u]);
                    }
                }
                i += 8 * U;
            }
            while i + 8 <= n {
                let wv = load8(wp.wrapping_add(i));
                for j in 0..NT {
                    acc[j][0] = _mm256_fmadd_ps(wv, load8(ap[j].wrapping_add(i)), acc[j][0]);
                }
                i += 8;
            }
            for j in 0..NT {
                let mut v = acc[j][0];
                for part in &acc[j][1..] {
                    v = _mm256_add_ps(v, *part);
                }
                let mut s = hsum(v);
                for k in i..n {
                    s += w[k] * acts[j][k];
                }
                out[j] = s;
            }
        }
    }

    /// `quantize_portable`, 32 values at a time; the same results bit for bit.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C (the features it is compiled with).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_avx2(x: &[f32], out: &mut [BlockQ8x32]) {
        for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
            // SAFETY: `xb` is 32 floats, read as four 8-float loads; AVX2 is present.
            unsafe {
                let p = xb.as_ptr();
                let v = [
                    load8(p),
                    load8(p.wrapping_add(8)),
                    load8(p.wrapping_add(16)),
                    load8(p.wrapping_add(24)),
                ];
                let sign = _mm256_set1_ps(-0.0);
                let m = _mm256_max_ps(
                    _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                    _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
                );
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
                let (d, id) = q8_scales(amax);
                let idv = _mm256_set1_ps(id);
                let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
                // No closures here: they would not inherit this function's target features.
                let mut q = [_mm256_setzero_si256(); 4];
                for k in 0..4 {
                    let r = _mm256_round_ps(
                        _mm256_mul_ps(v[k], idv),
                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                    );
                    q[k] = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, hi), lo));
                }
                let total =
                    _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let t = _mm_add_epi32(
                    _mm256_castsi256_si128(total),
                    _mm256_extracti128_si256(total, 1),
                );
                let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
                let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01));
                let sum = _mm_cvtsi128_si32(t);
                // Packing works within 128-bit lanes: the dwords come out as
                // q0a q1a q2a q3a | q0b q1b q2b q3b (a, b: the halves of each vector).
                let packed = _mm256_packs_epi16(
                    _mm256_packs_epi32(q[0], q[1]),
                    _mm256_packs_epi32(q[2], q[3]),
                );
                let ordered =
                    _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                // SAFETY: both are 32 bytes of plain integers; every bit pattern is valid.
                ob.qs = std::mem::transmute::<__m256i, [i8; QK]>(ordered);
                (ob.d, ob.s) = super::stored_scales(d, sum);
                ob.sum = sum;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{candle_dequantize, Rng};
    use super::*;

    use super::super::testing::LEGACY_TYPES as TYPES;

    /// Every instruction set, including ones this CPU lacks: those must fall back safely.
    const ALL_ISAS: [Isa; 5] = [Isa::Portable, Isa::Avx2, Isa::Avx2Vnni, Isa::Avx512Vnni, Isa::Amx];

    /// A sane block scale: ±[1e-3, 1e-1].
    fn scale(rng: &mut Rng) -> f32 {
        let magnitude = 1e-3 + (1e-1 - 1e-3) * rng.unit();
        if rng.next() & 1 == 0 {
            magnitude
        } else {
            -magnitude
        }
    }

    fn put_f16(bytes: &mut [u8], at: usize, value: f32) {
        bytes[at..at + 2].copy_from_slice(&super::super::f32_to_f16(value).to_le_bytes());
    }

    /// `nb` blocks of `ty` with random quant bytes and sane scales.
    fn random_blocks(rng: &mut Rng, ty: WeightType, nb: usize) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..nb * ty.block_bytes()).map(|_| rng.next() as u8).collect();
        for block in bytes.chunks_exact_mut(ty.block_bytes()) {
            put_f16(block, 0, scale(rng));
            if matches!(ty, WeightType::Q4_1 | WeightType::Q5_1) {
                put_f16(block, 2, scale(rng));
            }
        }
        bytes
    }

    /// Activations of `nb` blocks, each block its own magnitude; block 1 all zeros.
    fn random_acts(rng: &mut Rng, nb: usize) -> Vec<f32> {
        let mut x = Vec::with_capacity(nb * QK);
        for b in 0..nb {
            let magnitude = 10f32.powf(rng.signed() * 2.0);
            for _ in 0..QK {
                x.push(if b == 1 { 0.0 } else { rng.signed() * magnitude });
            }
        }
        x
    }

    fn quantize(x: &[f32]) -> Vec<BlockQ8x32> {
        let mut q = vec![BlockQ8x32 { d: 0.0, s: 0.0, sum: 0, qs: [0; 32] }; x.len() / QK];
        quantize_q8x32(x, &mut q);
        q
    }

    fn dequantize_acts(q: &[BlockQ8x32]) -> Vec<f32> {
        q.iter().flat_map(|b| b.qs.iter().map(move |&v| b.d * f32::from(v))).collect()
    }

    fn dequantize_weights(ty: WeightType, w: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; w.len() / ty.block_bytes() * QK];
        dequantize_row(ty, w, &mut out);
        out
    }

    fn dot(ty: WeightType, isa: Isa, w: &[u8], acts: &[&[BlockQ8x32]], out: &mut [f32]) {
        match ty {
            WeightType::Q4_0 => dot_q4_0(isa, w, acts, out),
            WeightType::Q4_1 => dot_q4_1(isa, w, acts, out),
            WeightType::Q5_0 => dot_q5_0(isa, w, acts, out),
            WeightType::Q5_1 => dot_q5_1(isa, w, acts, out),
            WeightType::Q8_0 => dot_q8_0(isa, w, acts, out),
            other => unreachable!("{other:?}"),
        }
    }

    /// (Σ w·a, Σ |w·a|) in f64.
    fn reference(w: &[f32], a: &[f32]) -> (f64, f64) {
        w.iter().zip(a).fold((0.0, 0.0), |(s, abs), (&w, &a)| {
            let p = f64::from(w) * f64::from(a);
            (s + p, abs + p.abs())
        })
    }

    #[test]
    fn block_sizes_match_weight_type() {
        assert_eq!(Q4_0::BYTES, WeightType::Q4_0.block_bytes());
        assert_eq!(Q4_1::BYTES, WeightType::Q4_1.block_bytes());
        assert_eq!(Q5_0::BYTES, WeightType::Q5_0.block_bytes());
        assert_eq!(Q5_1::BYTES, WeightType::Q5_1.block_bytes());
        assert_eq!(Q8_0::BYTES, WeightType::Q8_0.block_bytes());
        assert_eq!(std::mem::size_of::<BlockQ8x32>(), 44);
    }

    #[test]
    fn dequantize_matches_candle() {
        let mut rng = Rng(1);
        for ty in TYPES {
            for nb in [1, 3, 10] {
                let rows = 3;
                let bytes = random_blocks(&mut rng, ty, rows * nb);
                let ours: Vec<f32> = bytes
                    .chunks_exact(nb * ty.block_bytes())
                    .flat_map(|row| dequantize_weights(ty, row))
                    .collect();
                let theirs = candle_dequantize(ty, &bytes, rows, nb * QK);
                assert_eq!(ours.len(), theirs.len());
                for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                    assert!(a == b, "{ty:?} {nb} blocks: value {i}: ours {a}, candle {b}");
                }
            }
        }
    }

    #[test]
    fn dequantize_known_block() {
        // Q5_0 with d = 0.5, qh bits 0 and 17 set, nibbles j: low j & 15, high 15 - j.
        let mut block = vec![0u8; 22];
        put_f16(&mut block, 0, 0.5);
        block[2..6].copy_from_slice(&(1u32 | 1 << 17).to_le_bytes());
        for j in 0..16 {
            block[6 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let v = dequantize_weights(WeightType::Q5_0, &block);
        assert_eq!(v[0], 0.5 * (16.0 - 16.0));
        assert_eq!(v[1], 0.5 * (1.0 - 16.0));
        assert_eq!(v[16], 0.5 * (15.0 - 16.0));
        assert_eq!(v[17], 0.5 * (14.0 + 16.0 - 16.0));

        // The same values as Q5_1, unsigned, with m = -2.
        let mut q51 = vec![0u8; 24];
        put_f16(&mut q51, 0, 0.5);
        put_f16(&mut q51, 2, -2.0);
        q51[4..8].copy_from_slice(&block[2..6]);
        q51[8..24].copy_from_slice(&block[6..22]);
        let v = dequantize_weights(WeightType::Q5_1, &q51);
        assert_eq!(v[0], 0.5 * 16.0 - 2.0);
        assert_eq!(v[1], 0.5 * 1.0 - 2.0);
        assert_eq!(v[16], 0.5 * 15.0 - 2.0);
        assert_eq!(v[17], 0.5 * (14.0 + 16.0) - 2.0);
    }

    #[test]
    fn quantize_round_trip() {
        let mut rng = Rng(2);
        let mut x = random_acts(&mut rng, 40);
        // A block of subnormal-scale values, and one with a single large value.
        x[2 * QK..3 * QK].iter_mut().for_each(|v| *v = 1e-39);
        x[3 * QK..4 * QK]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = if i == 5 { -3.0 } else { 0.0 });
        let q = quantize(&x);
        for (b, (xb, qb)) in x.chunks_exact(QK).zip(&q).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let sum: i32 = qb.qs.iter().map(|&v| i32::from(v)).sum();
            // d and s are kept at f16 precision (relative step 2^-11).
            let s = qb.d * sum as f32;
            assert!((qb.s - s).abs() <= 1e-3 * s.abs(), "block {b}: s {} vs {s}", qb.s);
            assert!(qb.qs.iter().all(|&v| v != i8::MIN), "block {b}: -128");
            if amax < 1e-30 {
                assert_eq!(qb.d, 0.0, "block {b}");
                assert!(qb.qs.iter().all(|&v| v == 0), "block {b}");
                continue;
            }
            let d = amax / 127.0;
            assert!((qb.d - d).abs() <= d * 5e-4, "block {b}: d {} vs {d}", qb.d);
            assert!(qb.qs.iter().any(|&v| v.unsigned_abs() == 127), "block {b}: amax maps to 127");
            for (i, (&v, &q)) in xb.iter().zip(&qb.qs).enumerate() {
                let err = (qb.d * f32::from(q) - v).abs();
                // Half a step, plus 127 times the f16 rounding of d.
                assert!(err <= d * 0.57, "block {b} value {i}: {v} -> {q}·{}", qb.d);
            }
        }
        assert_eq!(q[3].qs[5], -127);
        assert_eq!(q[3].d, super::super::f16_to_f32(super::super::f32_to_f16(3.0 / 127.0)));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn quantize_simd_matches_portable() {
        if !x86::has_avx2() {
            return;
        }
        let mut rng = Rng(3);
        let mut x = random_acts(&mut rng, 64);
        // Exact halves of the step (ties), with 127 as the largest magnitude.
        for (i, v) in x[4 * QK..5 * QK].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { i as f32 - 0.5 * (i % 2) as f32 - 16.0 };
        }
        let mut portable = vec![BlockQ8x32 { d: 0.0, s: 0.0, sum: 0, qs: [0; 32] }; 64];
        let mut simd = portable.clone();
        quantize_portable(&x, &mut portable);
        // SAFETY: AVX2, FMA and F16C were detected above; the lengths match.
        unsafe { x86::quantize_avx2(&x, &mut simd) };
        for (b, (p, s)) in portable.iter().zip(&simd).enumerate() {
            assert_eq!(p.d.to_bits(), s.d.to_bits(), "block {b}: d");
            assert_eq!(p.s.to_bits(), s.s.to_bits(), "block {b}: s");
            assert_eq!(p.qs, s.qs, "block {b}: qs");
        }
    }

    #[test]
    fn dots_match_reference() {
        let mut rng = Rng(4);
        for ty in TYPES {
            for nb in [1, 2, 3, 10, 17] {
                let w = random_blocks(&mut rng, ty, nb);
                let wf = dequantize_weights(ty, &w);
                let xs: Vec<Vec<f32>> = (0..4).map(|_| random_acts(&mut rng, nb)).collect();
                let qs: Vec<Vec<BlockQ8x32>> = xs.iter().map(|x| quantize(x)).collect();
                for nt in 1..=4 {
                    let rows: Vec<&[BlockQ8x32]> = qs[..nt].iter().map(|q| q.as_slice()).collect();
                    for isa in ALL_ISAS {
                        let mut out = [f32::NAN; 4];
                        dot(ty, isa, &w, &rows, &mut out[..nt]);
                        for j in 0..nt {
                            let got = f64::from(out[j]);
                            // Tight: the same quantized activations, only float order differs.
                            let (want, abs) = reference(&wf, &dequantize_acts(&qs[j]));
                            assert!(
                                (got - want).abs() <= 1e-4 * abs + 1e-12,
                                "{ty:?} {isa:?} nb {nb} nt {nt} token {j}: {got} vs {want} (Σ|wa| {abs})"
                            );
                            // Loose: the unquantized activations, within the quantization step.
                            let (exact, abs_exact) = reference(&wf, &xs[j]);
                            let bound: f64 = wf
                                .chunks_exact(QK)
                                .zip(xs[j].chunks_exact(QK))
                                .map(|(wb, xb)| {
                                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                                    let half_step = f64::from(amax) / 127.0 / 2.0;
                                    wb.iter().map(|&v| f64::from(v).abs()).sum::<f64>() * half_step
                                })
                                .sum();
                            assert!(
                                (got - exact).abs() <= bound * 1.001 + 1e-4 * abs_exact + 1e-12,
                                "{ty:?} {isa:?} nb {nb} nt {nt} token {j}: {got} vs exact {exact} (bound {bound})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The extreme values: Q8_0's -128 against ±127, Q5_0's -16, Q4_0's -8, Q4_1's 15,
    /// Q5_1's 31. A saturating i16 pair sum or a wrong sign trick would show here.
    #[test]
    fn dots_at_extremes() {
        let nb = 5;
        let acts_pos =
            vec![BlockQ8x32 { d: 0.25, s: 0.25 * 127.0 * 32.0, sum: 127 * 32, qs: [127; 32] }; nb];
        let acts_neg =
            vec![
                BlockQ8x32 { d: 0.25, s: -0.25 * 127.0 * 32.0, sum: -127 * 32, qs: [-127; 32] };
                nb
            ];
        let mut alt = BlockQ8x32 { d: 0.25, s: 0.0, sum: 0, qs: [127; 32] };
        alt.qs.iter_mut().skip(1).step_by(2).for_each(|v| *v = -127);
        let acts_alt = vec![alt; nb];
        for (ty, fill, value) in [
            (WeightType::Q8_0, 0x80u8, -128.0f64),
            (WeightType::Q8_0, 0x7f, 127.0),
            (WeightType::Q5_0, 0x00, -16.0),
            (WeightType::Q5_0, 0xff, 15.0),
            (WeightType::Q4_0, 0x00, -8.0),
            (WeightType::Q4_1, 0xff, 15.0),
            (WeightType::Q5_1, 0xff, 31.0),
        ] {
            let mut w = vec![fill; nb * ty.block_bytes()];
            for block in w.chunks_exact_mut(ty.block_bytes()) {
                put_f16(block, 0, 2.0);
                if matches!(ty, WeightType::Q4_1 | WeightType::Q5_1) {
                    put_f16(block, 2, 0.0);
                }
            }
            let rows: [&[BlockQ8x32]; 3] = [&acts_pos, &acts_neg, &acts_alt];
            let want = [
                2.0 * value * 0.25 * 127.0 * (32 * nb) as f64,
                -2.0 * value * 0.25 * 127.0 * (32 * nb) as f64,
                0.0,
            ];
            for isa in ALL_ISAS {
                let mut out = [0f32; 3];
                dot(ty, isa, &w, &rows, &mut out);
                for j in 0..3 {
                    assert!(
                        (f64::from(out[j]) - want[j]).abs() <= 1e-6 * want[0].abs(),
                        "{ty:?} fill {fill:#x} {isa:?} token {j}: {} vs {}",
                        out[j],
                        want[j]
                    );
                }
            }
        }
    }

    #[test]
    fn dots_write_only_their_tokens() {
        let mut rng = Rng(5);
        let w = random_blocks(&mut rng, WeightType::Q8_0, 3);
        let q = quantize(&random_acts(&mut rng, 3));
        for isa in ALL_ISAS {
            let mut out = [f32::NAN; 4];
            dot_q8_0(isa, &w, &[&q, &q], &mut out);
            assert!(out[0].is_finite() && out[0] == out[1], "{isa:?}: {out:?}");
            assert!(out[2].is_nan() && out[3].is_nan(), "{isa:?}: {out:?}");
            let wf: Vec<f32> = (0..40).map(|i| i as f32).collect();
            let mut out = [f32::NAN; 4];
            dot_f32(isa, &wf, &[&wf], &mut out);
            assert_eq!(out[0], (0..40).map(|i| (i * i) as f32).sum::<f32>());
            assert!(out[1..].iter().all(|v| v.is_nan()), "{isa:?}: {out:?}");
        }
    }

    #[test]
    fn dot_f32_matches_f64() {
        let mut rng = Rng(6);
        for n in [1, 5, 8, 15, 16, 31, 32, 33, 63, 64, 100, 257, 1000, 2560] {
            let w: Vec<f32> = (0..n).map(|_| rng.signed()).collect();
            let xs: Vec<Vec<f32>> =
                (0..4).map(|_| (0..n).map(|_| rng.signed() * 3.0).collect()).collect();
            for nt in 1..=4 {
                let rows: Vec<&[f32]> = xs[..nt].iter().map(|x| x.as_slice()).collect();
                for isa in ALL_ISAS {
                    let mut out = [f32::NAN; 4];
                    dot_f32(isa, &w, &rows, &mut out[..nt]);
                    for j in 0..nt {
                        let (want, abs) = reference(&w, &xs[j]);
                        assert!(
                            (f64::from(out[j]) - want).abs() <= 1e-5 * abs,
                            "n {n} {isa:?} nt {nt} token {j}: {} vs {want}",
                            out[j]
                        );
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "activation blocks vs weight blocks")]
    fn dot_rejects_mismatched_rows() {
        let w = vec![0u8; 2 * 34];
        let q = vec![BlockQ8x32 { d: 0.0, s: 0.0, sum: 0, qs: [0; 32] }; 3];
        dot_q8_0(Isa::Portable, &w, &[&q], &mut [0.0]);
    }
}
