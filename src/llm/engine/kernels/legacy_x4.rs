//! The 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) repacked at load four rows at a
//! time, and their dot products against `BlockQ8x32` activations.
//!
//! Why: in the GGUF row layout every 32-value block of every row ends in its own float
//! step (convert the block's integer sum, multiply by the two scales, add), and the signed
//! formats pay a `vpsignb` per block per token. With eight values of each of four rows side
//! by side in a vector, one float step serves four rows, and the 4- and 5-bit formats keep
//! their values unsigned (`q`, not `q − 8` / `q − 16`; the offset is taken out in integers
//! through the activations' exact `Σa`), so their four u8×i8 products of a block sum in i16 (at most
//! `4·2·31·127 = 31496`) before one widening `vpmaddwd`. Q8_0 keeps the sign trick.
//!
//! A packed block holds block `b` of rows `4g..4g+4`, exactly the bytes of the four GGUF
//! blocks, rearranged:
//! - `0..8`: f16 `d[0..4]`; Q4_1 and Q5_1 then have f16 `m[0..4]` at `8..16`; Q5_0 has
//!   the fifth bits at `8..24` (Q5_1 at `16..32`), byte `4k + r` being byte `k` of row
//!   `r`'s `qh` (the bits of values `8k..8k+8`);
//! - then the values, in 32-byte vectors of eight bytes per row (row 0 first): Q8_0 four
//!   vectors (values `8k..8k+8`, k = 0..4); the 4-bit formats two vectors of nibbles
//!   (vector `g` holds `qs[8g..8g+8]`: low nibbles are values `8g..8g+8`, high nibbles
//!   `16+8g..+8`).
//!
//! Owns only this layout; the row layout's kernels are `legacy`, threads are `pool`.

use super::legacy::{self, Format, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::{BlockQ8x32, Isa, WeightType};

pub(super) use super::x4::ROWS;
const QK: usize = 32;

/// Bytes of one packed block of `ty` (four rows' 32 values).
pub(super) fn block_bytes(ty: WeightType) -> usize {
    ROWS * ty.block_bytes()
}

/// Where a format's fields sit: in its GGUF block and in a packed block.
struct Fields {
    /// Q4_1's and Q5_1's minimum: at 2 in the block, at 8 packed.
    min: bool,
    /// The fifth bits (Q5_0, Q5_1): where they start in the block and packed.
    high_bits: Option<(usize, usize)>,
    /// Bytes of values per row (32 for Q8_0, 16 nibble bytes otherwise), at the block's end.
    qs_len: usize,
    /// Where the values start in a packed block.
    qs_at: usize,
}

fn fields(ty: WeightType) -> Fields {
    match ty {
        WeightType::Q4_0 => Fields { min: false, high_bits: None, qs_len: 16, qs_at: 8 },
        WeightType::Q4_1 => Fields { min: true, high_bits: None, qs_len: 16, qs_at: 16 },
        WeightType::Q5_0 => Fields { min: false, high_bits: Some((2, 8)), qs_len: 16, qs_at: 24 },
        WeightType::Q5_1 => Fields { min: true, high_bits: Some((4, 16)), qs_len: 16, qs_at: 32 },
        WeightType::Q8_0 => Fields { min: false, high_bits: None, qs_len: 32, qs_at: 8 },
        other => unreachable!("{other:?} is not a 32-value block format"),
    }
}

/// Repack four rows of `ty` blocks (GGUF layout, the same length) into `out`.
pub(super) fn pack(ty: WeightType, rows: [&[u8]; ROWS], out: &mut [u8]) {
    let bytes = ty.block_bytes();
    let nb = rows[0].len() / bytes;
    assert!(rows.iter().all(|r| r.len() == nb * bytes), "four whole rows of blocks");
    assert_eq!(out.len(), nb * block_bytes(ty), "packed size");
    for (b, packed) in out.chunks_exact_mut(block_bytes(ty)).enumerate() {
        for (r, row) in rows.iter().enumerate() {
            pack_row(ty, &row[b * bytes..(b + 1) * bytes], packed, r);
        }
    }
}

/// Row `r`'s GGUF block `blk` into a packed block (`unpack_row` is its inverse; a test
/// checks the round trip).
fn pack_row(ty: WeightType, blk: &[u8], packed: &mut [u8], r: usize) {
    let f = fields(ty);
    packed[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
    if f.min {
        packed[8 + 2 * r..8 + 2 * r + 2].copy_from_slice(&blk[2..4]);
    }
    if let Some((from, to)) = f.high_bits {
        for k in 0..4 {
            packed[to + 4 * k + r] = blk[from + k];
        }
    }
    let qs = blk.len() - f.qs_len;
    for g in 0..f.qs_len / 8 {
        let at = f.qs_at + 32 * g + 8 * r;
        packed[at..at + 8].copy_from_slice(&blk[qs + 8 * g..qs + 8 * g + 8]);
    }
}

/// Row `r`'s GGUF block out of a packed block (`blk` is `ty.block_bytes()` long).
#[inline(always)]
fn unpack_row(ty: WeightType, packed: &[u8], r: usize, blk: &mut [u8]) {
    let f = fields(ty);
    blk[0..2].copy_from_slice(&packed[2 * r..2 * r + 2]);
    if f.min {
        blk[2..4].copy_from_slice(&packed[8 + 2 * r..8 + 2 * r + 2]);
    }
    if let Some((to, from)) = f.high_bits {
        for k in 0..4 {
            blk[to + k] = packed[from + 4 * k + r];
        }
    }
    let qs = blk.len() - f.qs_len;
    for g in 0..f.qs_len / 8 {
        let at = f.qs_at + 32 * g + 8 * r;
        blk[qs + 8 * g..qs + 8 * g + 8].copy_from_slice(&packed[at..at + 8]);
    }
}

/// Row `r` (0..4) of a packed group as f32, bit for bit what the GGUF row dequantizes to.
pub(super) fn dequantize_row(ty: WeightType, group: &[u8], r: usize, out: &mut [f32]) {
    let mut blk = [0u8; 34];
    let blk = &mut blk[..ty.block_bytes()];
    for (packed, y) in group.chunks_exact(block_bytes(ty)).zip(out.chunks_exact_mut(QK)) {
        unpack_row(ty, packed, r, blk);
        legacy::dequantize_row(ty, blk, y);
    }
}

/// `out[t][r] = Σ_i w_r[i]·a_t[i]` for the four rows of a packed group and 1 to 4 activation
/// rows (`out.len() ≥ acts.len()`).
pub(super) fn dot(
    ty: WeightType,
    isa: Isa,
    group: &[u8],
    acts: &[&[BlockQ8x32]],
    out: &mut [[f32; ROWS]],
) {
    super::x4::check_shapes(group, block_bytes(ty), acts, out.len());
    #[cfg(target_arch = "x86_64")]
    if x86::run(ty, isa, group, acts, out) {
        return;
    }
    let _ = isa;
    match ty {
        WeightType::Q4_0 => portable::<Q4_0>(ty, group, acts, out),
        WeightType::Q4_1 => portable::<Q4_1>(ty, group, acts, out),
        WeightType::Q5_0 => portable::<Q5_0>(ty, group, acts, out),
        WeightType::Q5_1 => portable::<Q5_1>(ty, group, acts, out),
        WeightType::Q8_0 => portable::<Q8_0>(ty, group, acts, out),
        other => unreachable!("{other:?} is not a 32-value block format"),
    }
}

/// The portable dot product: the row layout's arithmetic (`legacy`'s portable code) in the
/// same order, so it gives the same bits as the unpacked rows.
fn portable<F: Format>(
    ty: WeightType,
    group: &[u8],
    acts: &[&[BlockQ8x32]],
    out: &mut [[f32; ROWS]],
) {
    let nt = acts.len();
    let mut sum = [[0f32; ROWS]; 4];
    let mut offset = [[0f32; ROWS]; 4];
    let mut blk = [0u8; 34];
    let blk = &mut blk[..F::BYTES];
    for (b, packed) in group.chunks_exact(block_bytes(ty)).enumerate() {
        for r in 0..ROWS {
            unpack_row(ty, packed, r, blk);
            let (d, m, q) = F::unpack(blk);
            for j in 0..nt {
                let a = &acts[j][b];
                let isum: i32 =
                    q.iter().zip(&a.qs).map(|(&x, &y)| i32::from(x) * i32::from(y)).sum();
                sum[j][r] += d * a.d * isum as f32;
                if F::OFFSET {
                    offset[j][r] += m * a.s;
                }
            }
        }
    }
    for j in 0..nt {
        out[j] = std::array::from_fn(|r| sum[j][r] + offset[j][r]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::kquants::x86::prefetch;
    use super::super::x4::x86::{bcast8, row_sums, simd, Simd};
    use super::{block_bytes, fields, BlockQ8x32, Isa, WeightType, ROWS};
    use std::arch::x86_64::*;

    /// Run on `isa` if the CPU has it (re-checked: `Isa` is public), returning `false` to
    /// take the portable path. Shapes are checked by the caller.
    #[inline(always)]
    pub(super) fn run(
        ty: WeightType,
        isa: Isa,
        group: &[u8],
        acts: &[&[BlockQ8x32]],
        out: &mut [[f32; ROWS]],
    ) -> bool {
        let Some(simd) = simd(isa) else { return false };
        macro_rules! go {
            ($kind:ty) => {
                // SAFETY (all arms): the CPU has every feature the entry point enables
                // (`simd` checked); the caller checked 1 to 4 activation rows, each as long
                // as the group, and a slot in `out` for each.
                match simd {
                    Simd::Avx2 => unsafe { entry_avx2::<$kind>(group, acts, out) },
                    Simd::Vnni256 => unsafe { entry_vnni::<$kind>(group, acts, out) },
                    Simd::Vnni512 => unsafe { entry_avx512::<$kind>(group, acts, out) },
                }
            };
        }
        match ty {
            WeightType::Q4_0 => go!(Q4_0x4),
            WeightType::Q4_1 => go!(Q4_1x4),
            WeightType::Q5_0 => go!(Q5_0x4),
            WeightType::Q5_1 => go!(Q5_1x4),
            WeightType::Q8_0 => go!(Q8_0x4),
            _ => return false,
        }
        true
    }

    /// The integer multiply-accumulates, the one thing AVX2 and VNNI do differently.
    trait Mac {
        /// `Σ_k` (u8 `w[k]` × i8 `x[k]`, four products per i32 lane), each pair sum and the
        /// four vectors' sum of a lane's i16 pairs below 32768 in magnitude.
        unsafe fn unsigned4(w: [__m256i; 4], x: [__m256i; 4]) -> __m256i;
        /// The same for signed weights `w` (`|w| ≤ 128`, `|x| ≤ 127`), each vector's pair
        /// sums fitting i16 but not their sum.
        unsafe fn signed4(w: [__m256i; 4], x: [__m256i; 4]) -> __m256i;
    }

    struct Avx2;
    struct Vnni;

    impl Mac for Avx2 {
        #[inline(always)]
        unsafe fn unsigned4(w: [__m256i; 4], x: [__m256i; 4]) -> __m256i {
            // SAFETY: AVX2 is enabled by the entry points.
            unsafe {
                let p01 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(w[0], x[0]),
                    _mm256_maddubs_epi16(w[1], x[1]),
                );
                let p23 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(w[2], x[2]),
                    _mm256_maddubs_epi16(w[3], x[3]),
                );
                _mm256_madd_epi16(_mm256_add_epi16(p01, p23), _mm256_set1_epi16(1))
            }
        }

        #[inline(always)]
        unsafe fn signed4(w: [__m256i; 4], x: [__m256i; 4]) -> __m256i {
            // SAFETY: AVX2 is enabled by the entry points.
            unsafe {
                let one = _mm256_set1_epi16(1);
                let mut acc = _mm256_setzero_si256();
                for k in 0..4 {
                    // |x| ≤ 127, so giving it w's sign cannot overflow.
                    let s = _mm256_sign_epi8(x[k], w[k]);
                    let p = _mm256_maddubs_epi16(_mm256_abs_epi8(w[k]), s);
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, one));
                }
                acc
            }
        }
    }

    impl Mac for Vnni {
        #[inline(always)]
        unsafe fn unsigned4(w: [__m256i; 4], x: [__m256i; 4]) -> __m256i {
            // SAFETY: AVX512-VNNI and AVX512VL are enabled by `entry_vnni`.
            unsafe {
                let mut acc = _mm256_setzero_si256();
                for k in 0..4 {
                    acc = _mm256_dpbusd_epi32(acc, w[k], x[k]);
                }
                acc
            }
        }

        #[inline(always)]
        unsafe fn signed4(w: [__m256i; 4], x: [__m256i; 4]) -> __m256i {
            // SAFETY: AVX2, AVX512-VNNI and AVX512VL are enabled by `entry_vnni`.
            unsafe {
                let mut acc = _mm256_setzero_si256();
                for k in 0..4 {
                    let s = _mm256_sign_epi8(x[k], w[k]);
                    acc = _mm256_dpbusd_epi32(acc, _mm256_abs_epi8(w[k]), s);
                }
                acc
            }
        }
    }

    /// A block's integer sums for one token, per row in i32 lanes `2r, 2r+1`: the
    /// weights prepared once per block (`weights`, shared by the tokens), then each
    /// token's sums (`isum`).
    trait Dot {
        type W: Copy;
        /// # Safety
        /// The CPU has the entry point's features.
        unsafe fn weights(q: [__m256i; 4], signed: bool) -> Self::W;
        /// # Safety
        /// As `weights`.
        unsafe fn isum(w: Self::W, a: &BlockQ8x32, signed: bool) -> __m256i;
    }

    /// 256-bit vectors, the multiply-adds done by `M`.
    struct Y<M>(std::marker::PhantomData<M>);

    impl<M: Mac> Dot for Y<M> {
        type W = [__m256i; 4];
        #[inline(always)]
        unsafe fn weights(q: [__m256i; 4], _: bool) -> [__m256i; 4] {
            q
        }
        #[inline(always)]
        unsafe fn isum(w: [__m256i; 4], a: &BlockQ8x32, signed: bool) -> __m256i {
            // SAFETY: the caller's features.
            unsafe {
                let x = [bcast8(&a.qs, 0), bcast8(&a.qs, 8), bcast8(&a.qs, 16), bcast8(&a.qs, 24)];
                if signed {
                    M::signed4(w, x)
                } else {
                    M::unsigned4(w, x)
                }
            }
        }
    }

    /// 512-bit vectors (AVX-512 F, BW, VNNI): vectors 0, 1 and 2, 3 of a block side by
    /// side, so two `vpdpbusd` do a token's block. Signed weights (Q8_0) swap the operands'
    /// roles: the activations are made unsigned (`a + 128`, a flip of the top bit, once per
    /// token) and multiplied into the signed weights, and `128·Σw`, counted once per block
    /// for each i32 lane, is taken back out. Each lane then holds exactly the integer the
    /// 256-bit code's does, so the results have the same bits, in fewer instructions than
    /// the sign trick (`vpsignb` + `vpabsb` a vector).
    struct Z;

    impl Dot for Z {
        /// The weights, and for signed weights each lane's `128·Σw`.
        type W = ([__m512i; 2], __m512i);
        #[inline(always)]
        unsafe fn weights(q: [__m256i; 4], signed: bool) -> Self::W {
            // SAFETY: AVX512F, BW and VNNI are enabled by `entry_avx512`.
            unsafe {
                let join = |lo: __m256i, hi: __m256i| {
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
                };
                let w = [join(q[0], q[1]), join(q[2], q[3])];
                let mut offset = _mm512_setzero_si512();
                if signed {
                    let top = _mm512_set1_epi8(-128);
                    offset = _mm512_dpbusd_epi32(offset, top, w[0]);
                    offset = _mm512_dpbusd_epi32(offset, top, w[1]);
                }
                (w, offset)
            }
        }
        #[inline(always)]
        unsafe fn isum((w, offset): Self::W, a: &BlockQ8x32, signed: bool) -> __m256i {
            // SAFETY: AVX512F, BW and VNNI are enabled by `entry_avx512`; the
            // activations are one 32-byte load.
            unsafe {
                let mut qs = std::mem::transmute::<[i8; 32], __m256i>(a.qs);
                if signed {
                    qs = _mm256_xor_si256(qs, _mm256_set1_epi8(-128));
                }
                let qs = _mm512_castsi256_si512(qs);
                // Values 0..8 to each quarter of the low half, 8..16 to the high half;
                // then 16..24 and 24..32.
                let x01 = _mm512_permutexvar_epi64(_mm512_set_epi64(1, 1, 1, 1, 0, 0, 0, 0), qs);
                let x23 = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 3, 3, 3, 2, 2, 2, 2), qs);
                let zero = _mm512_setzero_si512();
                let sum = if signed {
                    let sum = _mm512_dpbusd_epi32(zero, x01, w[0]);
                    _mm512_sub_epi32(_mm512_dpbusd_epi32(sum, x23, w[1]), offset)
                } else {
                    _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, w[0], x01), w[1], x23)
                };
                _mm256_add_epi32(_mm512_castsi512_si256(sum), _mm512_extracti64x4_epi64::<1>(sum))
            }
        }
    }

    /// What one packed block gives the dot product.
    struct Block {
        /// `[d0 d0 d1 d1 d2 d2 d3 d3]`.
        d: __m256,
        /// Q4_1, Q5_1: `[m0 m0 .. m3 m3]`; otherwise unused.
        m: __m256,
        /// Four vectors of eight values per row: values `8k..8k+8` in vector `k`.
        q: [__m256i; 4],
    }

    /// One format's packed block.
    trait Kind {
        const TY: WeightType;
        /// Signed values (Q8_0); the others are unsigned with an offset.
        const SIGNED: bool = false;
        /// The offset per value, in units of `d` (`q − OFFSET`); Q4_1's and Q5_1's is
        /// their `m` (`MIN`).
        const OFFSET: i32 = 0;
        /// Values `d·q + m` (Q4_1, Q5_1).
        const MIN: bool = false;
        /// # Safety
        /// The CPU has AVX2 and F16C (inlined into the entry points).
        unsafe fn load(p: &[u8]) -> Block;
    }

    struct Q4_0x4;
    struct Q4_1x4;
    struct Q5_0x4;
    struct Q5_1x4;
    struct Q8_0x4;

    /// `b[at..at + 32]` as a vector.
    #[inline(always)]
    fn v256(b: &[u8], at: usize) -> __m256i {
        let bytes: [u8; 32] = b[at..at + 32].try_into().expect("32 bytes");
        // SAFETY: 32 bytes of plain data to a 32-byte integer vector.
        unsafe { std::mem::transmute::<[u8; 32], __m256i>(bytes) }
    }

    /// Four f16 at `b[at..at + 8]` as `[x0 x0 x1 x1 x2 x2 x3 x3]`.
    #[inline(always)]
    unsafe fn halves_dup(b: &[u8], at: usize) -> __m256 {
        let bytes: [u8; 8] = b[at..at + 8].try_into().expect("8 bytes");
        // SAFETY: F16C and AVX2 are enabled by the entry points.
        unsafe {
            let x = _mm_cvtph_ps(_mm_set_epi64x(0, i64::from_le_bytes(bytes)));
            _mm256_permutevar8x32_ps(
                _mm256_castps128_ps256(x),
                _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
            )
        }
    }

    /// The two nibble vectors at `at` as four value vectors (low nibbles of vectors 0 and
    /// 1 are values 0..16, high nibbles 16..32).
    #[inline(always)]
    unsafe fn nibbles(p: &[u8], at: usize) -> [__m256i; 4] {
        // SAFETY: AVX2 is enabled by the entry points.
        unsafe {
            let m4 = _mm256_set1_epi8(0x0f);
            let (v0, v1) = (v256(p, at), v256(p, at + 32));
            [
                _mm256_and_si256(v0, m4),
                _mm256_and_si256(v1, m4),
                _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4),
                _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4),
            ]
        }
    }

    impl Kind for Q4_0x4 {
        const TY: WeightType = WeightType::Q4_0;
        const OFFSET: i32 = 8;
        #[inline(always)]
        unsafe fn load(p: &[u8]) -> Block {
            // SAFETY: as the trait says.
            unsafe {
                let at = fields(Self::TY).qs_at;
                Block { d: halves_dup(p, 0), m: _mm256_setzero_ps(), q: nibbles(p, at) }
            }
        }
    }

    impl Kind for Q4_1x4 {
        const TY: WeightType = WeightType::Q4_1;
        const MIN: bool = true;
        #[inline(always)]
        unsafe fn load(p: &[u8]) -> Block {
            // SAFETY: as the trait says.
            unsafe {
                let at = fields(Self::TY).qs_at;
                Block { d: halves_dup(p, 0), m: halves_dup(p, 8), q: nibbles(p, at) }
            }
        }
    }

    impl Kind for Q5_0x4 {
        const TY: WeightType = WeightType::Q5_0;
        const OFFSET: i32 = 16;
        #[inline(always)]
        unsafe fn load(p: &[u8]) -> Block {
            // SAFETY: as the trait says.
            unsafe {
                Block { d: halves_dup(p, 0), m: _mm256_setzero_ps(), q: five_bits::<Self>(p) }
            }
        }
    }

    impl Kind for Q5_1x4 {
        const TY: WeightType = WeightType::Q5_1;
        const MIN: bool = true;
        #[inline(always)]
        unsafe fn load(p: &[u8]) -> Block {
            // SAFETY: as the trait says.
            unsafe { Block { d: halves_dup(p, 0), m: halves_dup(p, 8), q: five_bits::<Self>(p) } }
        }
    }

    /// A five-bit format's four value vectors: the nibbles with their fifth bits.
    ///
    /// # Safety
    /// AVX2 is enabled by the entry points.
    #[inline(always)]
    unsafe fn five_bits<K: Kind>(p: &[u8]) -> [__m256i; 4] {
        let f = fields(K::TY);
        let (_, qh_at) = f.high_bits.expect("a five-bit format");
        // SAFETY: the caller's features.
        unsafe {
            let mut q = nibbles(p, f.qs_at);
            // Byte i of row r in vector k gets bit i of byte k of row r's qh: spread the
            // four rows' bytes over their eight lanes, test one bit per lane.
            let spread = _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
                2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
            );
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let fifth = _mm256_set1_epi8(0x10);
            for (k, q) in q.iter_mut().enumerate() {
                let at = qh_at + 4 * k;
                let bytes: [u8; 4] = p[at..at + 4].try_into().expect("4 bytes");
                let h = _mm256_shuffle_epi8(_mm256_set1_epi32(i32::from_le_bytes(bytes)), spread);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);
                *q = _mm256_or_si256(*q, _mm256_and_si256(set, fifth));
            }
            q
        }
    }

    impl Kind for Q8_0x4 {
        const TY: WeightType = WeightType::Q8_0;
        const SIGNED: bool = true;
        #[inline(always)]
        unsafe fn load(p: &[u8]) -> Block {
            // SAFETY: as the trait says.
            unsafe {
                let at = fields(Self::TY).qs_at;
                let q = std::array::from_fn(|k| v256(p, at + 32 * k));
                Block { d: halves_dup(p, 0), m: _mm256_setzero_ps(), q }
            }
        }
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; 1 to 4 activation rows; `out` has a slot for each.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn entry_avx2<K: Kind>(group: &[u8], acts: &[&[BlockQ8x32]], out: &mut [[f32; ROWS]]) {
        // SAFETY: the caller's guarantees are `by_tokens`'s.
        unsafe { by_tokens::<K, Y<Avx2>>(group, acts, out) }
    }

    /// # Safety
    /// As `entry_avx2`, and the CPU has AVX512-VNNI and AVX512VL.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn entry_vnni<K: Kind>(group: &[u8], acts: &[&[BlockQ8x32]], out: &mut [[f32; ROWS]]) {
        // SAFETY: the caller's guarantees are `by_tokens`'s.
        unsafe { by_tokens::<K, Y<Vnni>>(group, acts, out) }
    }

    /// # Safety
    /// As `entry_vnni`, and the CPU has AVX512F and AVX512BW.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    unsafe fn entry_avx512<K: Kind>(group: &[u8], acts: &[&[BlockQ8x32]], out: &mut [[f32; ROWS]]) {
        // SAFETY: the caller's guarantees are `by_tokens`'s.
        unsafe { by_tokens::<K, Z>(group, acts, out) }
    }

    #[inline(always)]
    unsafe fn by_tokens<K: Kind, M: Dot>(
        group: &[u8],
        acts: &[&[BlockQ8x32]],
        out: &mut [[f32; ROWS]],
    ) {
        // SAFETY (all arms): the features are enabled by the calling entry point.
        unsafe {
            match acts.len() {
                1 => out[..1].copy_from_slice(&body::<K, M, 1>(group, [acts[0]])),
                2 => out[..2].copy_from_slice(&body::<K, M, 2>(group, [acts[0], acts[1]])),
                3 => out[..3].copy_from_slice(&body::<K, M, 3>(group, [acts[0], acts[1], acts[2]])),
                _ => out[..4]
                    .copy_from_slice(&body::<K, M, 4>(group, [acts[0], acts[1], acts[2], acts[3]])),
            }
        }
    }

    /// The four rows' dot products with `NT` activation rows; lanes `2r, 2r+1` of the
    /// accumulators belong to row `r`.
    #[inline(always)]
    unsafe fn body<K: Kind, M: Dot, const NT: usize>(
        group: &[u8],
        acts: [&[BlockQ8x32]; NT],
    ) -> [[f32; ROWS]; NT] {
        // SAFETY: AVX2, FMA and F16C (and `M`'s features) are enabled by the entry point;
        // every load goes through a bounds-checked slice.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); NT];
            for (b, p) in group.chunks_exact(block_bytes(K::TY)).enumerate() {
                prefetch(p);
                let blk = K::load(p);
                let w = M::weights(blk.q, K::SIGNED);
                for t in 0..NT {
                    let a = &acts[t][b];
                    let mut isum = M::isum(w, a, K::SIGNED);
                    // Q4_0's and Q5_0's offset, `Σ(q − OFFSET)·a = Σq·a − OFFSET·Σa`, exactly
                    // in integers, half in each of a row's two lanes (at most 16·32·127).
                    if K::OFFSET != 0 {
                        isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(K::OFFSET / 2 * a.sum));
                    }
                    let scale = _mm256_mul_ps(blk.d, _mm256_set1_ps(a.d));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[t]);
                    // Q4_1's and Q5_1's minimum times `s = d_a·Σa`, as the row kernels take
                    // it, half in each lane.
                    if K::MIN {
                        acc[t] = _mm256_fmadd_ps(blk.m, _mm256_set1_ps(0.5 * a.s), acc[t]);
                    }
                }
            }
            row_sums(acc)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check_packed_dot, random_rows, Rng};
    use super::super::{Acts, QMatrix};
    use super::*;

    use super::super::testing::LEGACY_TYPES as TYPES;

    /// Packing then unpacking gives back every byte, and rows dequantize to the same bits.
    #[test]
    fn packing_is_lossless_and_dequantizes_as_the_rows() {
        let mut rng = Rng(0x7777_1234_abcd_0001);
        for ty in TYPES {
            let nb = 3;
            let rows = random_rows(ty, nb, &mut rng);
            let mut group = vec![0u8; nb * block_bytes(ty)];
            pack(ty, [&rows[0], &rows[1], &rows[2], &rows[3]], &mut group);
            for (r, row) in rows.iter().enumerate() {
                let mut back = vec![0u8; row.len()];
                for (b, blk) in back.chunks_exact_mut(ty.block_bytes()).enumerate() {
                    unpack_row(ty, &group[b * block_bytes(ty)..], r, blk);
                }
                assert_eq!(&back, row, "{ty:?} row {r} bytes");
                let (mut want, mut got) = (vec![0f32; nb * QK], vec![0f32; nb * QK]);
                legacy::dequantize_row(ty, row, &mut want);
                dequantize_row(ty, &group, r, &mut got);
                assert_eq!(want, got, "{ty:?} row {r} values");
            }
        }
    }

    /// The portable packed product gives the row layout's portable bits; every SIMD path
    /// that runs here agrees with it to float summation order, for 1 to 4 tokens, including
    /// weights at the formats' extremes (Q8_0's −128); a token's bits do not depend on the
    /// tokens beside it.
    #[test]
    fn packed_dot_matches_the_row_kernels_on_every_isa() {
        let mut rng = Rng(0x5151_aaaa_0f0f_3c3c);
        let mut ran = Vec::new();
        for ty in TYPES {
            for extreme in [false, true] {
                let nb = 7;
                let mut rows = random_rows(ty, nb, &mut rng);
                if extreme {
                    // Every value byte 0x80 (Q8_0: −128; nibbles: 0 and 8) or 0xff.
                    let qs = ty.block_bytes() - if ty == WeightType::Q8_0 { 32 } else { 16 };
                    for (i, row) in rows.iter_mut().enumerate() {
                        for blk in row.chunks_exact_mut(ty.block_bytes()) {
                            blk[qs..].fill(if i % 2 == 0 { 0x80 } else { 0xff });
                        }
                    }
                }
                let mut group = vec![0u8; nb * block_bytes(ty)];
                pack(ty, [&rows[0], &rows[1], &rows[2], &rows[3]], &mut group);
                let x = rng.vec(4 * nb * QK, 2.0);
                let w = QMatrix::from_bytes_as_stored(ty, 1, nb * QK, rows[0].clone()).unwrap();
                let mut acts = Acts::new();
                acts.prepare(&x, 4, nb * QK, &[&w]);
                let act_rows: Vec<&[BlockQ8x32]> = acts.q8x32.chunks_exact(nb).collect();
                let dot_row = match ty {
                    WeightType::Q4_0 => legacy::dot_q4_0,
                    WeightType::Q4_1 => legacy::dot_q4_1,
                    WeightType::Q5_0 => legacy::dot_q5_0,
                    WeightType::Q5_1 => legacy::dot_q5_1,
                    _ => legacy::dot_q8_0,
                };
                let label = format!("{ty:?}");
                let isas = check_packed_dot(
                    &label,
                    |r, nt, out| dot_row(Isa::Portable, &rows[r], &act_rows[..nt], out),
                    |isa, first, nt, out| dot(ty, isa, &group, &act_rows[first..first + nt], out),
                );
                for isa in isas {
                    if !ran.contains(&isa) {
                        ran.push(isa);
                    }
                }
            }
        }
        eprintln!("packed 32-value formats ran on: {ran:?}");
    }
}
