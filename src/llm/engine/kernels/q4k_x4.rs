//! Q4_K weights repacked at load four rows at a time (`Q4Kx4`, the idea of llama.cpp's
//! `q4_K_8x8`), and their dot products against `BlockQ8K` activations.
//!
//! Why: in the GGUF row layout one 256-bit vector of nibbles is one sub-block (32 values) of
//! one row, so every `vpmaddubsw` (u8×i8 pairs into i16) must be followed by its own
//! `vpmaddwd` with that sub-block's scale before anything can be summed. With eight bytes of
//! each of four rows side by side in one vector, the four `vpmaddubsw` that cover a
//! sub-block for those rows sum in i16 lanes that belong to one row each (at most
//! `4·2·15·127 = 15240`, no overflow), and one `vpmaddwd` with the four rows' scales
//! finishes them: 5 multiplies per 128 multiply-adds instead of 8, on CPUs whose integer
//! multiplier is the limit (every AVX2 CPU without VNNI here). The same code serves decode
//! (one token) and prefill (up to four tokens per pass over a block).
//!
//! One packed block holds block `b` of rows `4g..4g+4`, 592 bytes (the four GGUF blocks are
//! 576: the scales are stored unpacked, 2.8 % more):
//! - `0..16`: f16 `d[0..4]`, then f16 `dmin[0..4]`;
//! - `16..48`: the 6-bit sub-block scales as bytes, `[s·4 + r]`;
//! - `48..80`: the 6-bit minimums as bytes, eight per row, rows in the order 0, 2, 1, 3 (what
//!   the minimum sums' horizontal add wants);
//! - `80..592`: the nibbles: for chunk `j` (values `64j..64j+64`), group `g` (0..4), row
//!   `r`: the eight bytes `qs[32j+8g..32j+8g+8]` of that row's block, so a vector at
//!   `80 + 128j + 32g` holds those eight bytes of rows 0, 1, 2, 3. Low nibbles are values
//!   `64j+8g..+8` (sub-block `2j`), high nibbles `64j+32+8g..+8` (sub-block `2j+1`).
//!
//! Owns only this layout: the row layout's kernels are `kquants`, threads are `pool`.

use super::kquants::{k4_sums, read_f16, scale_min_k4, Q4K_BYTES};
use super::{BlockQ8K, Isa};

pub(super) use super::x4::ROWS;
/// Bytes of one packed block (four rows' 256 values).
pub(super) const BLOCK_BYTES: usize = 592;
const QK: usize = 256;
const SC_AT: usize = 16;
const MIN_AT: usize = 48;
const QS_AT: usize = 80;
/// Where each row's minimums sit (in units of eight bytes from `MIN_AT`).
const MIN_SLOT: [usize; ROWS] = [0, 2, 1, 3];

/// Repack four rows of Q4_K blocks (GGUF layout, the same length) into `out`.
pub(super) fn pack(rows: [&[u8]; ROWS], out: &mut [u8]) {
    let nb = rows[0].len() / Q4K_BYTES;
    assert!(rows.iter().all(|r| r.len() == nb * Q4K_BYTES), "four whole rows of blocks");
    assert_eq!(out.len(), nb * BLOCK_BYTES, "packed size");
    for (b, dst) in out.chunks_exact_mut(BLOCK_BYTES).enumerate() {
        for (r, row) in rows.iter().enumerate() {
            let blk = &row[b * Q4K_BYTES..(b + 1) * Q4K_BYTES];
            dst[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            dst[8 + 2 * r..8 + 2 * r + 2].copy_from_slice(&blk[2..4]);
            let (sc, m) = scale_min_k4(&blk[4..16]);
            for (s, &scale) in sc.iter().enumerate() {
                dst[SC_AT + 4 * s + r] = scale;
            }
            let at = MIN_AT + 8 * MIN_SLOT[r];
            dst[at..at + 8].copy_from_slice(&m);
            for j in 0..4 {
                for g in 0..4 {
                    let at = QS_AT + 128 * j + 32 * g + 8 * r;
                    let from = 16 + 32 * j + 8 * g;
                    dst[at..at + 8].copy_from_slice(&blk[from..from + 8]);
                }
            }
        }
    }
}

/// Row `r` of one packed block: `(d, dmin, scales, minimums, the 256 nibbles in value order)`.
#[inline(always)]
fn row_of(blk: &[u8], r: usize) -> (f32, f32, [u8; 8], [u8; 8], [u8; QK]) {
    let (d, dmin) = (read_f16(blk, 2 * r), read_f16(blk, 8 + 2 * r));
    let sc: [u8; 8] = std::array::from_fn(|s| blk[SC_AT + 4 * s + r]);
    let at = MIN_AT + 8 * MIN_SLOT[r];
    let m: [u8; 8] = blk[at..at + 8].try_into().expect("eight minimums");
    let mut q = [0u8; QK];
    for j in 0..4 {
        for g in 0..4 {
            let at = QS_AT + 128 * j + 32 * g + 8 * r;
            for (i, &byte) in blk[at..at + 8].iter().enumerate() {
                q[64 * j + 8 * g + i] = byte & 0x0f;
                q[64 * j + 32 + 8 * g + i] = byte >> 4;
            }
        }
    }
    (d, dmin, sc, m, q)
}

/// Row `r` (0..4) of a packed group as f32, bit for bit what the GGUF row dequantizes to.
pub(super) fn dequantize_row(group: &[u8], r: usize, out: &mut [f32]) {
    assert_eq!(out.len(), group.len() / BLOCK_BYTES * QK, "dequantize_row width");
    for (blk, y) in group.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, dmin, sc, m, q) = row_of(blk, r);
        for s in 0..8 {
            let (ds, ms) = (d * sc[s] as f32, dmin * m[s] as f32);
            for i in 32 * s..32 * s + 32 {
                y[i] = ds * q[i] as f32 - ms;
            }
        }
    }
}

/// `out[t][r] = Σ_i w_r[i]·a_t[i]` for the four rows of a packed group and 1 to 4 activation
/// rows (`out.len() ≥ acts.len()`).
pub(super) fn dot(isa: Isa, group: &[u8], acts: &[&[BlockQ8K]], out: &mut [[f32; ROWS]]) {
    super::x4::check_shapes(group, BLOCK_BYTES, acts, out.len());
    let nt = acts.len();
    #[cfg(target_arch = "x86_64")]
    if super::x4::x86::run_k::<x86::Body>(isa, group, acts, out) {
        return;
    }
    let _ = isa;
    match nt {
        1 => out[..1].copy_from_slice(&dot_portable(group, [acts[0]])),
        2 => out[..2].copy_from_slice(&dot_portable(group, [acts[0], acts[1]])),
        3 => out[..3].copy_from_slice(&dot_portable(group, [acts[0], acts[1], acts[2]])),
        _ => out[..4].copy_from_slice(&dot_portable(group, [acts[0], acts[1], acts[2], acts[3]])),
    }
}

/// The portable dot product: the row layout's arithmetic, in the same order, so it gives
/// the same bits as `kquants`' portable code on the unpacked rows.
fn dot_portable<const NT: usize>(group: &[u8], acts: [&[BlockQ8K]; NT]) -> [[f32; ROWS]; NT] {
    let mut sums = [[0f32; ROWS]; NT];
    for (b, blk) in group.chunks_exact(BLOCK_BYTES).enumerate() {
        for r in 0..ROWS {
            let (d, dmin, sc, m, q) = row_of(blk, r);
            for (sum, a) in sums.iter_mut().zip(acts) {
                let a = &a[b];
                let (sumi, summ) = k4_sums(&q, &sc, &m, a);
                sum[r] += a.d * (d * sumi as f32 - dmin * summ as f32);
            }
        }
    }
    sums
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::kquants::x86::{prefetch, Mac};
    use super::super::x4::x86::{bcast8, row_sums, v128, v256, KBody};
    use super::{BlockQ8K, BLOCK_BYTES, MIN_AT, QS_AT, ROWS, SC_AT};
    use std::arch::x86_64::*;

    /// The packed format's SIMD body (run through `x4::x86::run_k`).
    pub(super) struct Body;

    /// Shuffle control that spreads the four scales of sub-block `s % 4` (bytes
    /// `4(s%4)..+4` of a 128-bit lane) over i16 lanes: rows 0, 1 in the low 128-bit lane,
    /// rows 2, 3 in the high one, each over the four i16 lanes of its eight bytes.
    #[inline(always)]
    unsafe fn scale_control(s: usize) -> __m256i {
        let k = 4 * (s % 4) as i8;
        // 0x80: a zero byte.
        let z = -128i8;
        // SAFETY: AVX is enabled in every caller.
        unsafe {
            _mm256_setr_epi8(
                k,
                z,
                k,
                z,
                k,
                z,
                k,
                z, //
                k + 1,
                z,
                k + 1,
                z,
                k + 1,
                z,
                k + 1,
                z, //
                k + 2,
                z,
                k + 2,
                z,
                k + 2,
                z,
                k + 2,
                z, //
                k + 3,
                z,
                k + 3,
                z,
                k + 3,
                z,
                k + 3,
                z,
            )
        }
    }

    /// The four rows' dot products with `NT` activation rows. i32 lanes `2r, 2r+1` of the
    /// integer and float accumulators belong to row `r`.
    impl KBody for Body {
        #[inline(always)]
        unsafe fn body<M: Mac, const NT: usize>(
            group: &[u8],
            acts: [&[BlockQ8K]; NT],
        ) -> [[f32; ROWS]; NT] {
            // SAFETY: AVX2, FMA and F16C (and `M`'s features) are enabled by the entry point;
            // every load goes through a bounds-checked fixed-size array.
            unsafe {
                let m4 = _mm256_set1_epi8(0x0f);
                let dup_d = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
                let dup_dmin = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
                let controls =
                    [scale_control(0), scale_control(1), scale_control(2), scale_control(3)];
                let mut acc = [_mm256_setzero_ps(); NT];
                for (b, blk) in group.chunks_exact(BLOCK_BYTES).enumerate() {
                    prefetch(blk);
                    let blk: &[u8; BLOCK_BYTES] = blk.try_into().expect("whole block");
                    let a: [&BlockQ8K; NT] = std::array::from_fn(|t| &acts[t][b]);
                    let dm = _mm256_cvtph_ps(v128(blk, 0));
                    let d = _mm256_permutevar8x32_ps(dm, dup_d);
                    let dmin = _mm256_permutevar8x32_ps(dm, dup_dmin);
                    let scales = v256(blk, SC_AT);
                    let scales_lo = _mm256_permute2x128_si256(scales, scales, 0x00);
                    let scales_hi = _mm256_permute2x128_si256(scales, scales, 0x11);
                    let mut sumi = [_mm256_setzero_si256(); NT];
                    for j in 0..4 {
                        for h in 0..2 {
                            let s = 2 * j + h;
                            let source = if s < 4 { scales_lo } else { scales_hi };
                            let scale = _mm256_shuffle_epi8(source, controls[s % 4]);
                            let mut part = [_mm256_setzero_si256(); NT];
                            for g in 0..4 {
                                let raw = v256(blk, QS_AT + 128 * j + 32 * g);
                                let q = if h == 0 { raw } else { _mm256_srli_epi16(raw, 4) };
                                let q = _mm256_and_si256(q, m4);
                                for t in 0..NT {
                                    let x = bcast8(&a[t].qs, 64 * j + 32 * h + 8 * g);
                                    part[t] = _mm256_add_epi16(part[t], _mm256_maddubs_epi16(q, x));
                                }
                            }
                            for t in 0..NT {
                                sumi[t] = M::madd_acc(sumi[t], part[t], scale);
                            }
                        }
                    }
                    let mins_02 = _mm256_cvtepu8_epi16(v128(blk, MIN_AT));
                    let mins_13 = _mm256_cvtepu8_epi16(v128(blk, MIN_AT + 16));
                    for t in 0..NT {
                        // The sums of the activations per 32-value sub-block, in both lanes.
                        let bs = std::mem::transmute::<[i16; 16], __m256i>(a[t].bsums);
                        let bs = _mm_hadd_epi16(
                            _mm256_castsi256_si128(bs),
                            _mm256_extracti128_si256(bs, 1),
                        );
                        let bs = _mm256_broadcastsi128_si256(bs);
                        let msum = _mm256_hadd_epi32(
                            _mm256_madd_epi16(mins_02, bs),
                            _mm256_madd_epi16(mins_13, bs),
                        );
                        let ad = _mm256_set1_ps(a[t].d);
                        acc[t] = _mm256_fmadd_ps(
                            _mm256_mul_ps(d, ad),
                            _mm256_cvtepi32_ps(sumi[t]),
                            acc[t],
                        );
                        acc[t] = _mm256_fnmadd_ps(
                            _mm256_mul_ps(dmin, ad),
                            _mm256_cvtepi32_ps(msum),
                            acc[t],
                        );
                    }
                }
                row_sums(acc)
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

    fn packed(rows: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![0u8; rows[0].len() / Q4K_BYTES * BLOCK_BYTES];
        pack([&rows[0], &rows[1], &rows[2], &rows[3]], &mut out);
        out
    }

    /// Repacking loses nothing: each row dequantizes to the same bits as its GGUF blocks.
    #[test]
    fn packed_rows_dequantize_as_the_stored_rows() {
        let mut rng = Rng(0x1234_5678_9abc_def0);
        let rows = random_rows(WeightType::Q4K, 3, &mut rng);
        let group = packed(&rows);
        for (r, row) in rows.iter().enumerate() {
            let (mut want, mut got) = (vec![0f32; 768], vec![0f32; 768]);
            kquants::dequantize_row(WeightType::Q4K, row, &mut want);
            dequantize_row(&group, r, &mut got);
            assert_eq!(want, got, "row {r}");
        }
    }

    /// The portable packed product gives the row layout's portable bits; every SIMD path
    /// that runs here agrees with it to float summation order, for 1 to 4 tokens; a
    /// token's bits do not depend on the tokens beside it.
    #[test]
    fn packed_dot_matches_the_row_kernels_on_every_isa() {
        let mut rng = Rng(0x0f0f_1e1e_2d2d_3c3c);
        let nb = 5;
        let rows = random_rows(WeightType::Q4K, nb, &mut rng);
        let group = packed(&rows);
        let x = rng.vec(4 * nb * QK, 2.0);
        let w = QMatrix::from_bytes_as_stored(WeightType::Q4K, 1, nb * QK, rows[0].clone());
        let mut acts = Acts::new();
        acts.prepare(&x, 4, nb * QK, &[&w.expect("matrix")]);
        let act_rows: Vec<&[BlockQ8K]> = acts.q8k.chunks_exact(nb).collect();
        let ran = check_packed_dot(
            "Q4_K",
            |r, nt, out| kquants::dot_q4k(Isa::Portable, &rows[r], &act_rows[..nt], out),
            |isa, first, nt, out| dot(isa, &group, &act_rows[first..first + nt], out),
        );
        eprintln!("packed Q4_K dot ran on: {ran:?}");
    }
}
