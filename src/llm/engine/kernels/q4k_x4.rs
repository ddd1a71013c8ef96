//! Q4_K and Q5_K weights repacked at load four rows at a time (`Q4Kx4`, the idea of
//! llama.cpp's `q4_K_8x8`), and their dot products against `BlockQ8K` activations whose
//! values are reordered to match (`pair_acts`).
//!
//! Why: in the GGUF row layout one 256-bit vector of nibbles is one sub-block (32 values) of
//! one row, so every `vpmaddubsw` (u8×i8 pairs into i16) must be followed by its own
//! `vpmaddwd` with that sub-block's scale before anything can be summed. With eight bytes of
//! each of four rows side by side in one vector, the `vpmaddubsw` of many vectors sum in i16
//! lanes that belong to one row each, and one `vpmaddwd` with the rows' scales finishes them.
//! Each i16 lane alternates between the two sub-blocks of a pair (`2j`, `2j + 1`), so one
//! `vpmaddwd` with the scales `[s₂ⱼ, s₂ⱼ₊₁, …]` finishes a whole pair: for Q4_K, 9
//! multiplies per 256 multiply-adds of a row group and token (8 `vpmaddubsw`, 1 `vpmaddwd`)
//! where one sub-block at a time took 10. That matters on CPUs whose vector integer
//! multiplier is the limit (every AVX2 CPU without VNNI here: two multiplies a cycle, which
//! the adds share). The same code serves decode (one token) and prefill (up to four tokens
//! per pass over a block).
//!
//! One packed block holds block `b` of rows `4g..4g+4`, 592 bytes (the four GGUF blocks are
//! 576: the scales are stored unpacked, 2.8 % more):
//! - `0..16`: f16 `d[0..4]`, then f16 `dmin[0..4]`;
//! - `16..48`: the 6-bit sub-block scales as bytes, row `r`'s scale of sub-block `s` at
//!   `16 + 8r + s` (rows 0, 1 in the low 128-bit lane, 2, 3 in the high one: one in-lane
//!   byte shuffle per pair spreads them);
//! - `48..80`: the 6-bit minimums as bytes, four per row in each half: at `48 + 16h + 4r`
//!   row `r`'s minimums of sub-blocks `MIN_ORDER[h]` (0, 1, 4, 5, then 2, 3, 6, 7), the
//!   order of the activations' `bsums32`, so that one `vpmaddwd` per half leaves each row's
//!   minimum sum in its own two i32 lanes (no horizontal add);
//! - `80..592`: the nibbles: for pair `j` (values `64j..64j+64`) and vector `v` (0..4), the
//!   vector at `80 + 128j + 32v` holds eight bytes of each of rows 0, 1, 2, 3. Byte `k` of a
//!   row belongs to sub-block `2j + (k/2)%2` (bytes 0, 1, 4, 5 to the first of the pair, 2,
//!   3, 6, 7 to the second), and holds two of its values: see `value_of` for which.
//!
//! Q5_K's packed block is the same plus, at `592..720`, the fifth bits: the vector at
//! `592 + 32v` holds for each byte of vector `v`'s nibbles (the same row and byte position,
//! in every pair) the fifth bits as bit `2j + h`: pair `j`, low (`h = 0`) or high nibble.
//! That is 720 bytes for the four GGUF blocks' 704.
//!
//! The i16 sums stay exact: for Q4_K a lane sums 16 products `q·a` of one pair, at most
//! `16·15·127 = 30480`; Q5_K's values reach 31, so its pair is finished in two halves of 8
//! products (`8·31·127 = 31496`), two `vpmaddwd` a pair as before.
//!
//! Owns only this layout and the activation order it reads; the row layout's kernels are
//! `kquants`, threads are `pool`.

use super::kquants::{k4_sums, read_f16, scale_min_k4};
use super::{BlockQ8K, Isa, WeightType, BSUMS32_ORDER};

pub(super) use super::x4::ROWS;
/// Bytes of one packed Q4_K block (four rows' 256 values).
pub(super) const BLOCK_BYTES: usize = 592;
/// Bytes of one packed Q5_K block.
pub(super) const Q5K_BLOCK_BYTES: usize = 720;
const QK: usize = 256;
pub(super) const SC_AT: usize = 16;
const MIN_AT: usize = 48;
pub(super) const QS_AT: usize = 80;
/// Where Q5_K's fifth bits start.
const QH_AT: usize = BLOCK_BYTES;

/// Bytes of one packed block of `ty` (Q4_K or Q5_K).
pub(super) fn block_bytes(ty: WeightType) -> usize {
    match ty {
        WeightType::Q4K => BLOCK_BYTES,
        WeightType::Q5K => Q5K_BLOCK_BYTES,
        other => unreachable!("{other:?} is not packed by q4k_x4"),
    }
}
/// The sub-blocks whose minimums each half of the minimums holds, four per row: the order
/// of the activations' `bsums32` (see the module header).
const MIN_ORDER: [[usize; 4]; 2] = {
    let o = BSUMS32_ORDER;
    [[o[0], o[1], o[2], o[3]], [o[4], o[5], o[6], o[7]]]
};

/// Where a packed block keeps row `r`'s minimum of the `q`-th sub-block in `bsums32`
/// order (`MIN_ORDER[q / 4][q % 4]`).
#[inline(always)]
pub(super) const fn min_at(r: usize, q: usize) -> usize {
    MIN_AT + 16 * (q / 4) + 4 * r + q % 4
}

/// The value (0..256, in the block's natural order) that nibble `h` (0 low, 1 high) of byte
/// `k` (0..8) of a row in vector `v` of pair `j` holds; also where `pair_acts` takes the
/// activation at `64j + 16v + 8h + k` from, so that the eight bytes a `vpmaddubsw` pairs
/// with nibbles `h` of a vector are one load. Bytes `k` and `k + 1` (`k` even) form an i16
/// lane; lanes alternate between the pair's sub-blocks.
#[inline(always)]
const fn value_of(j: usize, v: usize, h: usize, k: usize) -> usize {
    64 * j + 32 * ((k / 2) % 2) + 8 * v + 4 * h + 2 * (k / 4) + k % 2
}

/// `value_of` for each of a block's 256 activation slots in `pair_acts`' order: slot
/// `64j + 16v + 8h + k` holds value `PAIR_ORDER[slot]`.
const PAIR_ORDER: [usize; QK] = {
    let mut order = [0; QK];
    let mut slot = 0;
    while slot < QK {
        let (j, v, h, k) = (slot / 64, slot / 16 % 4, slot / 8 % 2, slot % 8);
        order[slot] = value_of(j, v, h, k);
        slot += 1;
    }
    order
};

/// The activations in the order the packed kernels read them (`PAIR_ORDER`): `qs` permuted
/// within each 64-value pair, the sums and scale as they are (a sub-block's sum does not
/// depend on the order). `out` is resized to `natural`'s length.
pub(super) fn pair_acts(natural: &[BlockQ8K], out: &mut Vec<BlockQ8K>) {
    out.resize(natural.len(), BlockQ8K::ZERO);
    for (a, p) in natural.iter().zip(out.iter_mut()) {
        *p = *a;
        for (q, &value) in p.qs.iter_mut().zip(&PAIR_ORDER) {
            *q = a.qs[value];
        }
    }
}

/// `pair_acts` undone for one block: the activations in their natural order.
fn unpaired(p: &BlockQ8K) -> BlockQ8K {
    let mut a = *p;
    for (&q, &value) in p.qs.iter().zip(&PAIR_ORDER) {
        a.qs[value] = q;
    }
    a
}

/// Repack four rows of `ty` blocks (Q4_K or Q5_K, GGUF layout, the same length) into `out`.
pub(super) fn pack(ty: WeightType, rows: [&[u8]; ROWS], out: &mut [u8]) {
    let (gguf_bytes, packed_bytes) = (ty.block_bytes(), block_bytes(ty));
    // Q5_K's GGUF block has its 32 bytes of fifth bits before the nibbles.
    let (qh_at, qs_at) = if ty == WeightType::Q5K { (Some(16), 48) } else { (None, 16) };
    let nb = rows[0].len() / gguf_bytes;
    assert!(rows.iter().all(|r| r.len() == nb * gguf_bytes), "four whole rows of blocks");
    assert_eq!(out.len(), nb * packed_bytes, "packed size");
    for (b, dst) in out.chunks_exact_mut(packed_bytes).enumerate() {
        dst.fill(0);
        for (r, row) in rows.iter().enumerate() {
            let blk = &row[b * gguf_bytes..(b + 1) * gguf_bytes];
            dst[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            dst[8 + 2 * r..8 + 2 * r + 2].copy_from_slice(&blk[2..4]);
            let (sc, m) = scale_min_k4(&blk[4..16]);
            dst[SC_AT + 8 * r..SC_AT + 8 * r + 8].copy_from_slice(&sc);
            for (h, order) in MIN_ORDER.iter().enumerate() {
                for (i, &s) in order.iter().enumerate() {
                    dst[min_at(r, 4 * h + i)] = m[s];
                }
            }
            // Value `x` of sub-block `s` is nibble `s % 2` of `qs[32(s/2) + x]`, its fifth
            // bit (Q5_K) bit `s` of `qh[x]`.
            let nibble = |value: usize| {
                (blk[qs_at + 32 * (value / 64) + value % 32] >> (4 * ((value / 32) % 2))) & 0x0f
            };
            for j in 0..4 {
                for v in 0..4 {
                    for k in 0..8 {
                        let at = QS_AT + 128 * j + 32 * v + 8 * r + k;
                        dst[at] = nibble(value_of(j, v, 0, k)) | nibble(value_of(j, v, 1, k)) << 4;
                        if let Some(qh_at) = qh_at {
                            for h in 0..2 {
                                let value = value_of(j, v, h, k);
                                let bit = (blk[qh_at + value % 32] >> (value / 32)) & 1;
                                dst[QH_AT + 32 * v + 8 * r + k] |= bit << (2 * j + h);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Row `r` of one packed block: `(d, dmin, scales, minimums, the 256 values in value
/// order)`, with Q5_K's fifth bits where the block has them.
#[inline(always)]
fn row_of(blk: &[u8], r: usize) -> (f32, f32, [u8; 8], [u8; 8], [u8; QK]) {
    let (d, dmin) = (read_f16(blk, 2 * r), read_f16(blk, 8 + 2 * r));
    let sc: [u8; 8] = blk[SC_AT + 8 * r..SC_AT + 8 * r + 8].try_into().expect("8 scales");
    let mut m = [0u8; 8];
    for (h, order) in MIN_ORDER.iter().enumerate() {
        for (i, &s) in order.iter().enumerate() {
            m[s] = blk[min_at(r, 4 * h + i)];
        }
    }
    let five = blk.len() == Q5K_BLOCK_BYTES;
    let mut q = [0u8; QK];
    for j in 0..4 {
        for v in 0..4 {
            for k in 0..8 {
                let byte = blk[QS_AT + 128 * j + 32 * v + 8 * r + k];
                for h in 0..2 {
                    let mut value = (byte >> (4 * h)) & 0x0f;
                    if five {
                        let bits = blk[QH_AT + 32 * v + 8 * r + k];
                        value |= ((bits >> (2 * j + h)) & 1) << 4;
                    }
                    q[value_of(j, v, h, k)] = value;
                }
            }
        }
    }
    (d, dmin, sc, m, q)
}

/// Row `r` (0..4) of a packed group of `ty` as f32, bit for bit what the GGUF row
/// dequantizes to.
pub(super) fn dequantize_row(ty: WeightType, group: &[u8], r: usize, out: &mut [f32]) {
    let block = block_bytes(ty);
    assert_eq!(out.len(), group.len() / block * QK, "dequantize_row width");
    for (blk, y) in group.chunks_exact(block).zip(out.chunks_exact_mut(QK)) {
        let (d, dmin, sc, m, q) = row_of(blk, r);
        for s in 0..8 {
            let (ds, ms) = (d * sc[s] as f32, dmin * m[s] as f32);
            for i in 32 * s..32 * s + 32 {
                y[i] = ds * q[i] as f32 - ms;
            }
        }
    }
}

/// For every packed group `g` of `ty` (Q4_K or Q5_K) in `groups` and the activation rows
/// `acts` (in `pair_acts`' order), four at a time from `t`: `emit(g, t, out)` with
/// `out[j][r]` the dot product of row `4g + r` with `acts[t + j]`.
pub(super) fn dot_groups(
    ty: WeightType,
    isa: Isa,
    groups: &[u8],
    acts: &[&[BlockQ8K]],
    mut emit: impl FnMut(usize, usize, &[[f32; ROWS]]),
) {
    let block = block_bytes(ty);
    let group_len = super::x4::check_groups(groups, block, acts);
    #[cfg(target_arch = "x86_64")]
    {
        use super::x4::x86::run_k;
        let done = if ty == WeightType::Q5K {
            run_k::<x86::Body<Q5K_BLOCK_BYTES>>(isa, groups, group_len, acts, &mut emit)
        } else {
            run_k::<x86::Body<BLOCK_BYTES>>(isa, groups, group_len, acts, &mut emit)
        };
        if done {
            return;
        }
    }
    let _ = isa;
    for (g, group) in groups.chunks_exact(group_len).enumerate() {
        for (c, chunk) in acts.chunks(4).enumerate() {
            emit(g, 4 * c, &dot_portable(block, group, chunk)[..chunk.len()]);
        }
    }
}

/// `out[t][r] = Σ_i w_r[i]·a_t[i]` for the four rows of one packed group and 1 to 4
/// activation rows: `dot_groups` on one group.
#[cfg(test)]
fn dot(ty: WeightType, isa: Isa, group: &[u8], acts: &[&[BlockQ8K]], out: &mut [[f32; ROWS]]) {
    assert!(acts.len() <= out.len(), "an output row per activation row");
    dot_groups(ty, isa, group, acts, |_, t, rows| out[t..t + rows.len()].copy_from_slice(rows));
}

/// The portable dot product: the row layout's arithmetic, in the same order, so it gives
/// the same bits as `kquants`' portable code on the unpacked rows and natural activations.
/// Up to four activation rows (paired); the result has a row for each, then zeros.
fn dot_portable(block: usize, group: &[u8], acts: &[&[BlockQ8K]]) -> [[f32; ROWS]; 4] {
    let mut sums = [[0f32; ROWS]; 4];
    for (b, blk) in group.chunks_exact(block).enumerate() {
        let natural: [BlockQ8K; 4] =
            std::array::from_fn(|t| acts.get(t).map_or(BlockQ8K::ZERO, |a| unpaired(&a[b])));
        for r in 0..ROWS {
            let (d, dmin, sc, m, q) = row_of(blk, r);
            for (sum, a) in sums.iter_mut().zip(&natural[..acts.len()]) {
                let (sumi, summ) = k4_sums(&q, &sc, &m, a);
                sum[r] += a.d * (d * sumi as f32 - dmin * summ as f32);
            }
        }
    }
    sums
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::kquants::x86::prefetch;
    use super::super::x4::x86::{bcast_bsums32, fold, token_pair_sums, v128, v256, KBody, Lanes};
    use super::{BlockQ8K, MIN_AT, Q5K_BLOCK_BYTES, QH_AT, QS_AT, ROWS, SC_AT};
    use std::arch::x86_64::*;

    /// The packed format's SIMD body (run through `x4::x86::run_k`) for blocks of `N`
    /// bytes: Q4_K's, or Q5_K's with the fifth bits.
    pub(super) struct Body<const N: usize>;

    /// Shuffle control that spreads the scales of pair `j` (sub-blocks `2j`, `2j + 1`) over
    /// i16 lanes: in each 128-bit lane (rows 0, 1 or rows 2, 3, eight scale bytes a row),
    /// each row's four i16 lanes get `[s₂ⱼ, s₂ⱼ₊₁, s₂ⱼ, s₂ⱼ₊₁]`, the order of its nibbles'
    /// sub-blocks (see `value_of`).
    #[inline(always)]
    unsafe fn scale_control(j: usize) -> __m256i {
        // 0x80: a zero byte.
        let z = -128i8;
        let lane = |i: usize| (8 * (i / 4) + 2 * j + i % 2) as i8;
        let c: [i8; 16] = std::array::from_fn(|b| if b % 2 == 1 { z } else { lane(b / 2) });
        // SAFETY: AVX is enabled in every caller; 32 bytes of plain data to a vector.
        unsafe {
            let half = std::mem::transmute::<[i8; 16], __m128i>(c);
            _mm256_set_m128i(half, half)
        }
    }

    /// The four rows' dot products with `NT` activation rows (paired, `pair_acts`). i32
    /// lanes `2r, 2r+1` of the integer accumulators belong to row `r`; the float ones hold
    /// two tokens each (see `token_pair_sums`). The nibble
    /// vectors go `L::SPAN` at a time (see `Lanes`).
    impl<const N: usize> KBody for Body<N> {
        #[inline(always)]
        unsafe fn body<L: Lanes, const NT: usize>(
            group: &[u8],
            acts: [&[BlockQ8K]; NT],
        ) -> [[f32; ROWS]; NT] {
            // SAFETY: AVX2, FMA and F16C (and `L`'s features) are enabled by the entry point;
            // every load goes through a bounds-checked fixed-size array.
            unsafe {
                let m4 = L::splat8(0x0f);
                // Each row's `d` (and `dmin`) in the lanes `token_pair_sums` reads it from.
                let dup_d = _mm256_setr_epi32(0, 1, 0, 1, 2, 3, 2, 3);
                let dup_dmin = _mm256_setr_epi32(4, 5, 4, 5, 6, 7, 6, 7);
                let controls =
                    [scale_control(0), scale_control(1), scale_control(2), scale_control(3)];
                let mut acc = [_mm256_setzero_ps(); NT];
                let five = N == Q5K_BLOCK_BYTES;
                let ones = L::splat8(1);
                for (b, blk) in group.chunks_exact(N).enumerate() {
                    prefetch(blk);
                    let blk: &[u8; N] = blk.try_into().expect("whole block");
                    let a: [&BlockQ8K; NT] = std::array::from_fn(|t| &acts[t][b]);
                    let dm = _mm256_cvtph_ps(v128(blk, 0));
                    let d = _mm256_permutevar8x32_ps(dm, dup_d);
                    let dmin = _mm256_permutevar8x32_ps(dm, dup_dmin);
                    let scales = v256(blk, SC_AT);
                    let mut sumi = [L::zero(); NT];
                    for (j, control) in controls.iter().enumerate() {
                        let scale = L::per_half(|_| _mm256_shuffle_epi8(scales, *control));
                        // Two i16 sums a token (vectors 0, 2 and 1, 3; for `Z` vectors 0, 1
                        // side by side, then 2, 3): shorter add chains, and Q5_K's halves,
                        // which must not be summed in i16.
                        let mut part = [[L::zero(); NT]; 2];
                        for v in (0..4).step_by(L::SPAN) {
                            let raw = L::load(blk, QS_AT + 128 * j + 32 * v);
                            let mut lo = L::and(raw, m4);
                            let mut hi = L::and(L::srli16::<4>(raw), m4);
                            if five {
                                // Bit `2j + h` of each byte to bit 4 (a 16-bit shift moves
                                // the high byte's bits into the low byte's top bits, which
                                // the mask drops).
                                let qh = L::load(blk, QH_AT + 32 * v);
                                let bit = |h: i32| {
                                    let count = _mm_cvtsi32_si128(2 * j as i32 + h);
                                    L::slli16::<4>(L::and(L::srl16(qh, count), ones))
                                };
                                lo = L::or(lo, bit(0));
                                hi = L::or(hi, bit(1));
                            }
                            for t in 0..NT {
                                // Lows then highs of vector `v`, then of `v + 1` (half 1
                                // of `Z`): the paired activations' order.
                                let base = 64 * j + 16 * v;
                                let both = L::add16(
                                    L::maddubs(lo, L::spread(a[t], base, 0, 2)),
                                    L::maddubs(hi, L::spread(a[t], base, 1, 3)),
                                );
                                let p = &mut part[v / L::SPAN % 2][t];
                                *p = L::add16(*p, both);
                            }
                        }
                        for t in 0..NT {
                            sumi[t] = if five {
                                L::madd_acc(
                                    L::madd_acc(sumi[t], part[0][t], scale),
                                    part[1][t],
                                    scale,
                                )
                            } else {
                                L::madd_acc(sumi[t], L::add16(part[0][t], part[1][t]), scale)
                            };
                        }
                    }
                    let sumi = fold::<L, NT>(sumi);
                    // Each row's minimums of sub-blocks (0, 1, 4, 5) and (2, 3, 6, 7) as i16,
                    // rows 0, 1 in the low lane and 2, 3 in the high one, against the
                    // activations' sums of those sub-blocks: one `vpmaddwd` per half leaves row
                    // `r`'s Σ m·bsum in i32 lanes 2r, 2r+1 (at most 2·2·63·4096 in each).
                    let mins = [
                        _mm256_cvtepu8_epi16(v128(blk, MIN_AT)),
                        _mm256_cvtepu8_epi16(v128(blk, MIN_AT + 16)),
                    ];
                    // A plain loop: `array::from_fn` closures returning vectors were left out
                    // of line before (see PROGRESS, fifth session).
                    let mut msum = [_mm256_setzero_si256(); NT];
                    for t in 0..NT {
                        msum[t] = _mm256_add_epi32(
                            _mm256_madd_epi16(mins[0], bcast_bsums32(a[t], 0)),
                            _mm256_madd_epi16(mins[1], bcast_bsums32(a[t], 4)),
                        );
                    }
                    // A row's two lanes are summed in integers (exactly) before the float
                    // step, two tokens to a vector, so each row and token takes one float
                    // step per block: `d·a.d·Σ − dmin·a.d·Σm`, what the AMX path computes
                    // for sixteen rows at a time (`amx`), to the bit.
                    for (p, acc) in acc.iter_mut().enumerate().take(NT.div_ceil(2)) {
                        let (t0, t1) = (2 * p, (2 * p + 1).min(NT - 1));
                        // Lanes [t0 r0, t0 r1, t1 r0, t1 r1 | t0 r2, t0 r3, t1 r2, t1 r3].
                        let s = _mm256_hadd_epi32(sumi[t0], sumi[t1]);
                        let m = _mm256_hadd_epi32(msum[t0], msum[t1]);
                        let (x, y) = (a[t0].d, a[t1].d);
                        let ad = _mm256_setr_ps(x, x, y, y, x, x, y, y);
                        *acc = _mm256_fmadd_ps(_mm256_mul_ps(d, ad), _mm256_cvtepi32_ps(s), *acc);
                        *acc =
                            _mm256_fnmadd_ps(_mm256_mul_ps(dmin, ad), _mm256_cvtepi32_ps(m), *acc);
                    }
                }
                token_pair_sums(acc)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::kquants;
    use super::super::testing::{check_packed_dot, random_rows, Rng};
    use super::super::{Acts, QMatrix, WeightType};
    use super::*;

    const TYPES: [WeightType; 2] = [WeightType::Q4K, WeightType::Q5K];

    fn packed(ty: WeightType, rows: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![0u8; rows[0].len() / ty.block_bytes() * block_bytes(ty)];
        pack(ty, [&rows[0], &rows[1], &rows[2], &rows[3]], &mut out);
        out
    }

    /// `value_of` maps each pair's 64 slots onto its 64 values one to one, so `pair_acts`
    /// loses nothing and `unpaired` undoes it; sums and scale are kept.
    #[test]
    fn pairing_permutes_each_pair_and_is_undone() {
        for j in 0..4 {
            let mut seen = [false; 64];
            for (v, h, k) in
                (0..4).flat_map(|v| (0..2).flat_map(move |h| (0..8).map(move |k| (v, h, k))))
            {
                let value = value_of(j, v, h, k);
                assert_eq!(value / 64, j, "slot {v} {h} {k} of pair {j} left its pair");
                assert!(!std::mem::replace(&mut seen[value % 64], true), "value {value} twice");
            }
        }
        let mut rng = Rng(0x5eed_0f9a_1f00_d00d);
        let mut acts = Acts::new();
        let x = rng.vec(2 * QK, 3.0);
        let w = QMatrix::from_bytes_as_stored(
            WeightType::Q4K,
            1,
            2 * QK,
            random_rows(WeightType::Q4K, 2, &mut rng).swap_remove(0),
        )
        .expect("matrix");
        acts.prepare(&x, 1, 2 * QK, &[&w]);
        let mut paired = Vec::new();
        pair_acts(&acts.q8k, &mut paired);
        assert_eq!(paired.len(), 2);
        for (a, p) in acts.q8k.iter().zip(&paired) {
            assert_ne!(a.qs, p.qs, "random activations come out reordered");
            assert_eq!((a.bsums, a.bsums32, a.d.to_bits()), (p.bsums, p.bsums32, p.d.to_bits()));
            assert_eq!(unpaired(p).qs, a.qs);
        }
    }

    /// Repacking loses nothing: each row dequantizes to the same bits as its GGUF blocks.
    #[test]
    fn packed_rows_dequantize_as_the_stored_rows() {
        let mut rng = Rng(0x1234_5678_9abc_def0);
        for ty in TYPES {
            let rows = random_rows(ty, 3, &mut rng);
            let group = packed(ty, &rows);
            for (r, row) in rows.iter().enumerate() {
                let (mut want, mut got) = (vec![0f32; 768], vec![0f32; 768]);
                kquants::dequantize_row(ty, row, &mut want);
                dequantize_row(ty, &group, r, &mut got);
                assert_eq!(want, got, "{ty:?} row {r}");
            }
        }
    }

    /// The portable packed product gives the row layout's portable bits; every SIMD path
    /// that runs here agrees with it to float summation order, for 1 to 4 tokens, including
    /// the largest values (every value 15 or 31, activations at full scale of one sign,
    /// the i16 sums' worst case); a token's bits do not depend on the tokens beside it.
    #[test]
    fn packed_dot_matches_the_row_kernels_on_every_isa() {
        let mut rng = Rng(0x0f0f_1e1e_2d2d_3c3c);
        let nb = 5;
        let mut ran = Vec::new();
        for ty in TYPES {
            for extreme in [None, Some(2.0f32), Some(-2.0)] {
                let mut rows = random_rows(ty, nb, &mut rng);
                let x = match extreme {
                    None => rng.vec(4 * nb * QK, 2.0),
                    Some(v) => {
                        // Every nibble and fifth bit set (d, dmin and scales stay random).
                        let block = ty.block_bytes();
                        for blk in rows.iter_mut().flat_map(|r| r.chunks_exact_mut(block)) {
                            blk[16..].fill(0xff);
                        }
                        vec![v; 4 * nb * QK]
                    }
                };
                let group = packed(ty, &rows);
                let w = QMatrix::from_bytes_as_stored(ty, 1, nb * QK, rows[0].clone());
                let mut acts = Acts::new();
                acts.prepare(&x, 4, nb * QK, &[&w.expect("matrix")]);
                let act_rows: Vec<&[BlockQ8K]> = acts.q8k.chunks_exact(nb).collect();
                let mut paired = Vec::new();
                pair_acts(&acts.q8k, &mut paired);
                let paired_rows: Vec<&[BlockQ8K]> = paired.chunks_exact(nb).collect();
                let row_dot = |r: usize, nt: usize, out: &mut [f32; 4]| {
                    let a = &act_rows[..nt];
                    if ty == WeightType::Q5K {
                        kquants::dot_q5k(Isa::Portable, &rows[r], a, out)
                    } else {
                        kquants::dot_q4k(Isa::Portable, &rows[r], a, out)
                    }
                };
                let isas = check_packed_dot(
                    &format!("{ty:?} {extreme:?}"),
                    row_dot,
                    |isa, first, nt, out| {
                        dot(ty, isa, &group, &paired_rows[first..first + nt], out)
                    },
                );
                for isa in isas {
                    if !ran.contains(&isa) {
                        ran.push(isa);
                    }
                }
            }
        }
        eprintln!("packed Q4_K and Q5_K dot ran on: {ran:?}");
    }
}
