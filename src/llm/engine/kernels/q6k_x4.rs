//! Q6_K weights repacked at load four rows at a time (`Q6Kx4`), and their dot products
//! against `BlockQ8K` activations: the `q4k_x4` idea for Q6_K's 16-value sub-blocks. With
//! eight values of each of four rows side by side, the two `vpmaddubsw` that cover a
//! sub-block for the four rows sum in i16 (at most `2·2·63·127 = 32004`), then one
//! `vpmaddwd` with the four rows' signed scales; the −32 offset is taken out once per block
//! through the activations' `bsums`, four rows at a time.
//!
//! One packed block holds block `b` of rows `4g..4g+4`, 840 bytes (exactly the four GGUF
//! blocks, rearranged):
//! - `0..8`: f16 `d[0..4]`;
//! - `8..72`: the 16 signed scales of each row, rows in the order 0, 2, 1, 3 (so that one
//!   byte unpack pairs rows 0, 1 in the low 128-bit lane and 2, 3 in the high one);
//! - `72..584`: the low four bits: for half `n` (values `128n..128n+128`), group `g`
//!   (0..4), part `p` (0..2): eight bytes `ql[64n + 32p + 8g..+8]` of each row, so the
//!   vector at `72 + 256n + 64g + 32p` holds them for rows 0, 1, 2, 3;
//! - `584..840`: the two high bits: the vector at `584 + 128n + 32g` holds
//!   `qh[32n + 8g..+8]` of each row.
//!
//! In the GGUF layout `ql[64n + l]` carries values `128n + l` (low nibble) and
//! `128n + 64 + l` (high nibble), `ql[64n + 32 + l]` values `128n + 32 + l` and
//! `128n + 96 + l`, and `qh[32n + l]` their high bits (bits 0-1, 4-5, 2-3, 6-7 in that
//! order); so vector group `g` gives values `128n + 32k + 8g..+8` for `k` = 0..4, all in
//! sub-block `8n + 2k + g/2`.
//!
//! Owns only this layout; the row layout's kernels are `kquants`, threads are `pool`.

use super::kquants::{self, Q6K_BYTES};
use super::{BlockQ8K, Isa, WeightType};

pub(super) use super::x4::ROWS;
/// Bytes of one packed block (four rows' 256 values).
pub(super) const BLOCK_BYTES: usize = 4 * Q6K_BYTES;
const QK: usize = 256;
const SC_AT: usize = 8;
const QL_AT: usize = 72;
const QH_AT: usize = 584;
/// Where each row's scales sit (in units of 16 bytes from `SC_AT`).
const SC_SLOT: [usize; ROWS] = [0, 2, 1, 3];

/// Repack four rows of Q6_K blocks (GGUF layout, the same length) into `out`.
pub(super) fn pack(rows: [&[u8]; ROWS], out: &mut [u8]) {
    let nb = rows[0].len() / Q6K_BYTES;
    assert!(rows.iter().all(|r| r.len() == nb * Q6K_BYTES), "four whole rows of blocks");
    assert_eq!(out.len(), nb * BLOCK_BYTES, "packed size");
    for (b, packed) in out.chunks_exact_mut(BLOCK_BYTES).enumerate() {
        for (r, row) in rows.iter().enumerate() {
            pack_row(&row[b * Q6K_BYTES..(b + 1) * Q6K_BYTES], packed, r);
        }
    }
}

/// Row `r`'s GGUF block `blk` into a packed block.
fn pack_row(blk: &[u8], packed: &mut [u8], r: usize) {
    packed[2 * r..2 * r + 2].copy_from_slice(&blk[208..210]);
    let sc = SC_AT + 16 * SC_SLOT[r];
    packed[sc..sc + 16].copy_from_slice(&blk[192..208]);
    for n in 0..2 {
        for g in 0..4 {
            for p in 0..2 {
                let at = QL_AT + 256 * n + 64 * g + 32 * p + 8 * r;
                let from = 64 * n + 32 * p + 8 * g;
                packed[at..at + 8].copy_from_slice(&blk[from..from + 8]);
            }
            let at = QH_AT + 128 * n + 32 * g + 8 * r;
            let from = 128 + 32 * n + 8 * g;
            packed[at..at + 8].copy_from_slice(&blk[from..from + 8]);
        }
    }
}

/// Row `r`'s GGUF block out of a packed block: the inverse of `pack_row` (a test checks
/// the round trip).
#[inline(always)]
fn unpack_row(packed: &[u8], r: usize, blk: &mut [u8; Q6K_BYTES]) {
    blk[208..210].copy_from_slice(&packed[2 * r..2 * r + 2]);
    let sc = SC_AT + 16 * SC_SLOT[r];
    blk[192..208].copy_from_slice(&packed[sc..sc + 16]);
    for n in 0..2 {
        for g in 0..4 {
            for p in 0..2 {
                let at = QL_AT + 256 * n + 64 * g + 32 * p + 8 * r;
                let to = 64 * n + 32 * p + 8 * g;
                blk[to..to + 8].copy_from_slice(&packed[at..at + 8]);
            }
            let at = QH_AT + 128 * n + 32 * g + 8 * r;
            let to = 128 + 32 * n + 8 * g;
            blk[to..to + 8].copy_from_slice(&packed[at..at + 8]);
        }
    }
}

/// Row `r` (0..4) of a packed group as f32, bit for bit what the GGUF row dequantizes to.
pub(super) fn dequantize_row(group: &[u8], r: usize, out: &mut [f32]) {
    let mut blk = [0u8; Q6K_BYTES];
    for (packed, y) in group.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        unpack_row(packed, r, &mut blk);
        kquants::dequantize_row(WeightType::Q6K, &blk, y);
    }
}

/// For every packed group `g` in `groups` and the activation rows `acts`, four at a time
/// from `t`: `emit(g, t, out)` with `out[j][r]` the dot product of row `4g + r` with
/// `acts[t + j]`.
pub(super) fn dot_groups(
    isa: Isa,
    groups: &[u8],
    acts: &[&[BlockQ8K]],
    mut emit: impl FnMut(usize, usize, &[[f32; ROWS]]),
) {
    let group_len = super::x4::check_groups(groups, BLOCK_BYTES, acts);
    #[cfg(target_arch = "x86_64")]
    if super::x4::x86::run_k::<x86::Body>(isa, groups, group_len, acts, &mut emit) {
        return;
    }
    let _ = isa;
    for (g, group) in groups.chunks_exact(group_len).enumerate() {
        for (c, chunk) in acts.chunks(4).enumerate() {
            emit(g, 4 * c, &dot_portable(group, chunk)[..chunk.len()]);
        }
    }
}

/// `out[t][r] = Σ_i w_r[i]·a_t[i]` for the four rows of one packed group and 1 to 4
/// activation rows: `dot_groups` on one group.
#[cfg(test)]
fn dot(isa: Isa, group: &[u8], acts: &[&[BlockQ8K]], out: &mut [[f32; ROWS]]) {
    assert!(acts.len() <= out.len(), "an output row per activation row");
    dot_groups(isa, group, acts, |_, t, rows| out[t..t + rows.len()].copy_from_slice(rows));
}

/// The row layout's portable code on each block of one group and 1 to 4 activation rows,
/// summed in block order: the same operations in the same order as on the whole row (the
/// same bits).
fn dot_portable(group: &[u8], acts: &[&[BlockQ8K]]) -> [[f32; ROWS]; 4] {
    let nt = acts.len();
    let mut sums = [[0f32; ROWS]; 4];
    let mut blk = [0u8; Q6K_BYTES];
    let mut block_sums = [0f32; 4];
    for (b, packed) in group.chunks_exact(BLOCK_BYTES).enumerate() {
        let block_acts: [&[BlockQ8K]; 4] = std::array::from_fn(|t| &acts[t.min(nt - 1)][b..b + 1]);
        for r in 0..ROWS {
            unpack_row(packed, r, &mut blk);
            kquants::dot_q6k(Isa::Portable, &blk, &block_acts[..nt], &mut block_sums);
            for (sum, part) in sums.iter_mut().zip(block_sums).take(nt) {
                sum[r] += part;
            }
        }
    }
    sums
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::kquants::x86::prefetch;
    use super::super::x4::x86::{bcast_bsums, fold, row_sums, v256, KBody, Lanes};
    use super::{BlockQ8K, BLOCK_BYTES, QH_AT, QL_AT, ROWS, SC_AT};
    use std::arch::x86_64::*;

    /// The packed format's SIMD body (run through `x4::x86::run_k`).
    pub(super) struct Body;

    /// Shuffle control putting byte `2k` (row 0 or 2) in the high half of i16 lanes 0..4
    /// and byte `2k + 1` (row 1 or 3) in lanes 4..8 of each 128-bit lane, low halves zero
    /// (an arithmetic shift right by 8 then sign-extends the scale).
    #[inline(always)]
    unsafe fn scale_control(k: usize) -> __m256i {
        let (a, b, z) = (2 * k as i8, 2 * k as i8 + 1, -128i8);
        // SAFETY: AVX is enabled in every caller.
        unsafe {
            _mm256_setr_epi8(
                z, a, z, a, z, a, z, a, z, b, z, b, z, b, z, b, //
                z, a, z, a, z, a, z, a, z, b, z, b, z, b, z, b,
            )
        }
    }

    /// Bits 4, 5 of the values of quarter `k` (values `32k..32k + 32` of a half-block) in
    /// bits 4, 5 of each byte of `qh` (the mask comes after).
    #[inline(always)]
    unsafe fn high_bits(qh: __m256i, k: usize) -> __m256i {
        // SAFETY: AVX2 is enabled in every caller.
        unsafe {
            match k {
                0 => _mm256_slli_epi16(qh, 4),
                1 => _mm256_slli_epi16(qh, 2),
                2 => qh,
                _ => _mm256_srli_epi16(qh, 2),
            }
        }
    }

    /// The 6-bit values of quarters `k..k + L::SPAN` of the vector pair whose low nibbles
    /// start at `ql` (quarters 0, 1 and 2, 3 share their bytes: `k % 2` picks the vector,
    /// `k ≥ 2` the high nibbles), with bits 4, 5 from `qh`. A function, not a closure, so
    /// that it is always inlined into the entry point (a closure called through
    /// `array::from_fn` was not, and handed its vectors back through memory).
    #[inline(always)]
    unsafe fn values<L: Lanes>(blk: &[u8; BLOCK_BYTES], ql: usize, qh: __m256i, k: usize) -> L::I {
        // SAFETY: the caller's features; bounds-checked loads.
        unsafe {
            let ql = L::load(blk, ql + 32 * (k % 2));
            let lo = if k < 2 { ql } else { L::srli16::<4>(ql) };
            let hi = L::per_half(|s| high_bits(qh, k + s));
            L::or(L::and(lo, L::splat8(0x0f)), L::and(hi, L::splat8(0x30)))
        }
    }

    /// The four rows' dot products with `NT` activation rows; lanes `2r, 2r+1` of the
    /// accumulators belong to row `r`. The quarters `k` go `L::SPAN` at a time (see
    /// `Lanes`): the low nibbles of quarters 0, 1 (and 2, 3) are consecutive vectors.
    impl KBody for Body {
        #[inline(always)]
        unsafe fn body<L: Lanes, const NT: usize>(
            group: &[u8],
            acts: [&[BlockQ8K]; NT],
        ) -> [[f32; ROWS]; NT] {
            // SAFETY: AVX2, FMA and F16C (and `L`'s features) are enabled by the entry point;
            // every load goes through a bounds-checked fixed-size array.
            unsafe {
                let controls: [__m256i; 8] = std::array::from_fn(|k| scale_control(k));
                let mut acc = [_mm256_setzero_ps(); NT];
                for (b, blk) in group.chunks_exact(BLOCK_BYTES).enumerate() {
                    prefetch(blk);
                    let blk: &[u8; BLOCK_BYTES] = blk.try_into().expect("whole block");
                    let a: [&BlockQ8K; NT] = std::array::from_fn(|t| &acts[t][b]);
                    let d4 = {
                        let bytes: [u8; 8] = blk[0..8].try_into().expect("8 bytes");
                        let x = _mm_cvtph_ps(_mm_set_epi64x(0, i64::from_le_bytes(bytes)));
                        _mm256_permutevar8x32_ps(
                            _mm256_castps128_ps256(x),
                            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
                        )
                    };
                    // Scales of sub-blocks 0..8 and 8..16 as byte pairs: rows (0, 1) in the low
                    // lane, (2, 3) in the high one.
                    let (rows_02, rows_13) = (v256(blk, SC_AT), v256(blk, SC_AT + 32));
                    let scales = [
                        _mm256_unpacklo_epi8(rows_02, rows_13),
                        _mm256_unpackhi_epi8(rows_02, rows_13),
                    ];
                    let mut sumi = [L::zero(); NT];
                    for n in 0..2 {
                        for h in 0..2 {
                            let g = [2 * h, 2 * h + 1];
                            let qh = [
                                v256(blk, QH_AT + 128 * n + 32 * g[0]),
                                v256(blk, QH_AT + 128 * n + 32 * g[1]),
                            ];
                            for k in (0..4).step_by(L::SPAN) {
                                let scale = L::per_half(|i| {
                                    let s = 8 * n + 2 * (k + i) + h;
                                    _mm256_srai_epi16(
                                        _mm256_shuffle_epi8(scales[s / 8], controls[s % 8]),
                                        8,
                                    )
                                });
                                let v = [
                                    values::<L>(blk, QL_AT + 256 * n + 64 * g[0], qh[0], k),
                                    values::<L>(blk, QL_AT + 256 * n + 64 * g[1], qh[1], k),
                                ];
                                for t in 0..NT {
                                    // Quarter `k` (and `k + 1`, 32 values on, in half 1
                                    // of `Z`), vectors `g`.
                                    let base = 128 * n + 32 * k;
                                    let (q0, q1) = (g[0], g[0] + 4);
                                    let part = L::add16(
                                        L::maddubs(v[0], L::spread(a[t], base, q0, q1)),
                                        L::maddubs(v[1], L::spread(a[t], base, q0 + 1, q1 + 1)),
                                    );
                                    sumi[t] = L::madd_acc(sumi[t], part, scale);
                                }
                            }
                        }
                    }
                    let sumi = fold::<L, NT>(sumi);
                    // The −32 offset, 32·Σ_s sc_s·bsum_s per row, four sub-blocks per
                    // `vpmaddwd` with no horizontal add: the scales of sub-blocks 4q..4q+4 as
                    // i16 times 32, [r0 ×4, r1 ×4 | r2 ×4, r3 ×4] (each byte doubled by the
                    // unpack, then an arithmetic shift sign-extends it), against those four
                    // `bsums` in every quarter. `|32·sc| ≤ 4096` fits i16.
                    let lo = _mm256_unpacklo_epi32(rows_02, rows_13);
                    let hi = _mm256_unpackhi_epi32(rows_02, rows_13);
                    let wide = |x: __m256i| _mm256_slli_epi16(_mm256_srai_epi16(x, 8), 5);
                    let offset_scales = [
                        wide(_mm256_unpacklo_epi8(lo, lo)),
                        wide(_mm256_unpackhi_epi8(lo, lo)),
                        wide(_mm256_unpacklo_epi8(hi, hi)),
                        wide(_mm256_unpackhi_epi8(hi, hi)),
                    ];
                    for t in 0..NT {
                        let part = |q: usize| {
                            _mm256_madd_epi16(offset_scales[q], bcast_bsums(a[t], 4 * q))
                        };
                        let offset = _mm256_add_epi32(
                            _mm256_add_epi32(part(0), part(1)),
                            _mm256_add_epi32(part(2), part(3)),
                        );
                        let isum = _mm256_sub_epi32(sumi[t], offset);
                        let scale = _mm256_mul_ps(d4, _mm256_set1_ps(a[t].d));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[t]);
                    }
                }
                row_sums(acc)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check_packed_dot, random_rows, Rng};
    use super::super::{Acts, QMatrix};
    use super::*;

    /// Packing then unpacking gives back every byte; rows dequantize to the same bits; the
    /// portable packed product gives the row layout's portable bits and every SIMD path that
    /// runs agrees with it to float summation order, for 1 to 4 tokens; a
    /// token's bits do not depend on the tokens beside it.
    #[test]
    fn packed_q6k_matches_the_row_kernels_on_every_isa() {
        let mut rng = Rng(0x6b6b_0123_4567_89ab);
        let nb = 3;
        let rows = random_rows(WeightType::Q6K, nb, &mut rng);
        let mut group = vec![0u8; nb * BLOCK_BYTES];
        pack([&rows[0], &rows[1], &rows[2], &rows[3]], &mut group);
        for (r, row) in rows.iter().enumerate() {
            let mut blk = [0u8; Q6K_BYTES];
            for b in 0..nb {
                unpack_row(&group[b * BLOCK_BYTES..], r, &mut blk);
                assert_eq!(&blk[..], &row[b * Q6K_BYTES..(b + 1) * Q6K_BYTES], "row {r} block {b}");
            }
            let (mut want, mut got) = (vec![0f32; nb * QK], vec![0f32; nb * QK]);
            kquants::dequantize_row(WeightType::Q6K, row, &mut want);
            dequantize_row(&group, r, &mut got);
            assert_eq!(want, got, "row {r} values");
        }
        let x = rng.vec(4 * nb * QK, 2.0);
        let w =
            QMatrix::from_bytes_as_stored(WeightType::Q6K, 1, nb * QK, rows[0].clone()).unwrap();
        let mut acts = Acts::new();
        acts.prepare(&x, 4, nb * QK, &[&w]);
        let act_rows: Vec<&[BlockQ8K]> = acts.q8k.chunks_exact(nb).collect();
        let ran = check_packed_dot(
            "Q6_K",
            |r, nt, out| kquants::dot_q6k(Isa::Portable, &rows[r], &act_rows[..nt], out),
            |isa, first, nt, out| dot(isa, &group, &act_rows[first..first + nt], out),
        );
        eprintln!("packed Q6_K ran on: {ran:?}");
    }
}
