//! What the four-row packed layouts (`q4k_x4`, `q6k_x4`, `legacy_x4`) share: the group size,
//! the shape checks, and on x86-64 the run-time choice of code, the K-quant formats' entry
//! points (one call runs a whole range of groups against a tile of tokens), the broadcasts
//! of eight activations or four sums and the final sum of each row's two lanes.
//! Owns no layout of its own.

/// Rows per packed group.
pub(super) const ROWS: usize = 4;

/// The checks every packed dot product starts with: 1 to 4 activation rows, a slot in
/// `out` for each, a whole number of `block_bytes` blocks in the group, and as many blocks
/// in each activation row.
pub(super) fn check_shapes<A>(group: &[u8], block_bytes: usize, acts: &[&[A]], out_len: usize) {
    let nt = acts.len();
    assert!((1..=4).contains(&nt), "1 to 4 activation rows, not {nt}");
    assert!(out_len >= nt, "output of {out_len} for {nt} rows");
    assert_eq!(group.len() % block_bytes, 0, "packed group of {} bytes", group.len());
    let nb = group.len() / block_bytes;
    for a in acts {
        assert_eq!(a.len(), nb, "activation row of {} blocks for {nb} weight blocks", a.len());
    }
}

/// The checks every packed K-quant product over several groups starts with: at least one
/// activation row, all as long (`nb` blocks), and a whole number of groups of `nb` blocks of
/// `block_bytes` in `groups`. Returns the group length in bytes.
pub(super) fn check_groups<A>(groups: &[u8], block_bytes: usize, acts: &[&[A]]) -> usize {
    assert!(!acts.is_empty(), "no activation rows");
    let nb = acts[0].len();
    assert!(acts.iter().all(|a| a.len() == nb), "activation rows of different lengths");
    let group_len = nb * block_bytes;
    assert!(
        group_len > 0 && groups.len().is_multiple_of(group_len),
        "{} bytes of groups",
        groups.len()
    );
    group_len
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::super::kquants::x86::{Avx2, Mac, Vnni};
    use super::super::{BlockQ8K, Isa};
    use super::ROWS;
    use std::arch::x86_64::*;

    /// A packed K-quant format's SIMD body (`q4k_x4`, `q6k_x4`): the four rows' dot products
    /// with `NT` activation rows.
    pub(in crate::llm::engine::kernels) trait KBody {
        /// # Safety
        /// The CPU has AVX2, FMA, F16C and what `M` needs; the caller checked the shapes.
        unsafe fn body<M: Mac, const NT: usize>(
            group: &[u8],
            acts: [&[BlockQ8K]; NT],
        ) -> [[f32; ROWS]; NT];
    }

    /// Run `B` on `isa` if the CPU has it, returning `false` to take the portable path:
    /// every packed group of `group_len` bytes in `groups` against every activation row in
    /// `acts`, four at a time, handing each result to `emit(group, first_token, rows)`. One
    /// call covers a task's whole row range, so the checks and the dispatch are paid once
    /// per task and not once per group (some 4 % of a four-stream decode step on the
    /// Qwen3-4B shape went to them). The caller checked the shapes (`check_groups`).
    #[inline(always)]
    pub(in crate::llm::engine::kernels) fn run_k<B: KBody>(
        isa: Isa,
        groups: &[u8],
        group_len: usize,
        acts: &[&[BlockQ8K]],
        emit: &mut impl FnMut(usize, usize, &[[f32; ROWS]]),
    ) -> bool {
        let Some(vnni) = simd(isa) else { return false };
        if vnni {
            // SAFETY: the CPU has every feature `entry_vnni` enables (`simd` checked); the
            // shapes are the caller's.
            unsafe { entry_vnni::<B>(groups, group_len, acts, emit) };
        } else {
            // SAFETY: the CPU has AVX2, FMA and F16C (`simd` checked); shapes as above.
            unsafe { entry_avx2::<B>(groups, group_len, acts, emit) };
        }
        true
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; the shapes are `check_groups`'.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn entry_avx2<B: KBody>(
        groups: &[u8],
        group_len: usize,
        acts: &[&[BlockQ8K]],
        emit: &mut impl FnMut(usize, usize, &[[f32; ROWS]]),
    ) {
        // SAFETY: the caller's guarantees are `each_group`'s.
        unsafe { each_group::<B, Avx2>(groups, group_len, acts, emit) }
    }

    /// # Safety
    /// As `entry_avx2`, and the CPU has AVX512-VNNI and AVX512VL.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn entry_vnni<B: KBody>(
        groups: &[u8],
        group_len: usize,
        acts: &[&[BlockQ8K]],
        emit: &mut impl FnMut(usize, usize, &[[f32; ROWS]]),
    ) {
        // SAFETY: the caller's guarantees are `each_group`'s.
        unsafe { each_group::<B, Vnni>(groups, group_len, acts, emit) }
    }

    /// Groups outside, tokens inside: a group's weights are read from memory once and stay
    /// in L1 for every four tokens of a prefill tile.
    #[inline(always)]
    unsafe fn each_group<B: KBody, M: Mac>(
        groups: &[u8],
        group_len: usize,
        acts: &[&[BlockQ8K]],
        emit: &mut impl FnMut(usize, usize, &[[f32; ROWS]]),
    ) {
        for (g, group) in groups.chunks_exact(group_len).enumerate() {
            for (c, chunk) in acts.chunks(4).enumerate() {
                // SAFETY (all arms): the features are enabled by the calling entry point.
                unsafe {
                    match *chunk {
                        [a] => emit(g, 4 * c, &B::body::<M, 1>(group, [a])),
                        [a, b] => emit(g, 4 * c, &B::body::<M, 2>(group, [a, b])),
                        [a, b, d] => emit(g, 4 * c, &B::body::<M, 3>(group, [a, b, d])),
                        [a, b, d, e] => emit(g, 4 * c, &B::body::<M, 4>(group, [a, b, d, e])),
                        _ => unreachable!("chunks of 1 to 4"),
                    }
                }
            }
        }
    }

    /// `b[at..at + 32]` as a vector (a plain unaligned load; see `kquants::x86::v256`).
    #[inline(always)]
    pub(in crate::llm::engine::kernels) fn v256<const N: usize>(b: &[u8; N], at: usize) -> __m256i {
        let bytes: [u8; 32] = b[at..at + 32].try_into().expect("32 bytes");
        // SAFETY: 32 bytes of plain data to a 32-byte integer vector.
        unsafe { std::mem::transmute::<[u8; 32], __m256i>(bytes) }
    }

    /// `b[at..at + 16]` as a vector.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) fn v128<const N: usize>(b: &[u8; N], at: usize) -> __m128i {
        let bytes: [u8; 16] = b[at..at + 16].try_into().expect("16 bytes");
        // SAFETY: 16 bytes of plain data to a 16-byte integer vector.
        unsafe { std::mem::transmute::<[u8; 16], __m128i>(bytes) }
    }

    /// The code `isa` may really run here, re-checked against the CPU (`Isa` is public, so a
    /// caller could name one the CPU lacks): `None` for the portable code, `Some(false)` for
    /// AVX2 + FMA + F16C, `Some(true)` for that plus AVX512-VNNI and AVX512VL.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) fn simd(isa: Isa) -> Option<bool> {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if isa == Isa::Portable || !avx2 {
            return None;
        }
        Some(
            isa == Isa::Avx2Vnni
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl"),
        )
    }

    /// Eight activations `q[at..at + 8]` repeated in each 64-bit quarter of a vector (the
    /// same eight values for each of the four rows).
    ///
    /// # Safety
    /// The CPU has AVX (the callers are inlined into AVX2 entry points).
    #[inline(always)]
    pub(in crate::llm::engine::kernels) unsafe fn bcast8(q: &[i8], at: usize) -> __m256i {
        let bytes: [i8; 8] = q[at..at + 8].try_into().expect("8 bytes");
        // SAFETY: the caller's contract.
        unsafe { _mm256_set1_epi64x(i64::from_le_bytes(bytes.map(|b| b as u8))) }
    }

    /// Eight activations `a.qs[at..at + 8]` (`at` a multiple of 8) in each 64-bit quarter
    /// of a vector, as `bcast8` but through one aligned `vbroadcastsd`. With this form (and
    /// its four-sums offset) the packed Q6_K product with four tokens ran about 15 % faster
    /// than with `bcast8`'s integer load, in a standalone copy of the kernel timed in
    /// alternation on a 2-core AMD EPYC with AVX2: the compiler kept fewer values on the
    /// stack.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) unsafe fn bcast_qs(a: &BlockQ8K, at: usize) -> __m256i {
        // SAFETY: the caller's contract; `q8` checks the bounds and alignment.
        unsafe { q8(&a.qs[at..at + 8]) }
    }

    /// Four i16 `a.bsums[at..at + 4]` (`at` a multiple of 4) in each 64-bit quarter.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) unsafe fn bcast_bsums(a: &BlockQ8K, at: usize) -> __m256i {
        // SAFETY: as `bcast_qs`.
        unsafe { q8(&a.bsums[at..at + 4]) }
    }

    /// Four i16 `a.bsums32[at..at + 4]` (`at` 0 or 4) in each 64-bit quarter.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) unsafe fn bcast_bsums32(
        a: &BlockQ8K,
        at: usize,
    ) -> __m256i {
        // SAFETY: as `bcast_qs`.
        unsafe { q8(&a.bsums32[at..at + 4]) }
    }

    /// The eight bytes of `x` (eight bytes at an 8-byte aligned address: every field of
    /// `BlockQ8K` starts at a multiple of 8, checked below, and the callers' offsets are
    /// multiples of eight bytes) in each 64-bit quarter of a vector.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[inline(always)]
    unsafe fn q8<T>(x: &[T]) -> __m256i {
        assert_eq!(std::mem::size_of_val(x), 8, "eight bytes");
        let p = x.as_ptr().cast::<f64>();
        assert!(p.is_aligned(), "an 8-byte aligned address");
        // SAFETY: eight readable bytes at an aligned address (asserted; both checks fold
        // away where the offsets are constants); every bit pattern is an f64; AVX is the
        // caller's.
        unsafe { _mm256_castpd_si256(_mm256_broadcast_sd(&*p)) }
    }

    const _: () = {
        use std::mem::{align_of, offset_of};
        assert!(align_of::<BlockQ8K>() == 8);
        assert!(offset_of!(BlockQ8K, qs) % 8 == 0);
        assert!(offset_of!(BlockQ8K, bsums) % 8 == 0);
        assert!(offset_of!(BlockQ8K, bsums32) % 8 == 0);
    };

    /// Each token's four row sums from accumulators whose lanes `2r, 2r+1` belong to row
    /// `r`.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) unsafe fn row_sums<const NT: usize>(
        acc: [__m256; NT],
    ) -> [[f32; ROWS]; NT] {
        let mut out = [[0f32; ROWS]; NT];
        for t in 0..NT {
            // SAFETY: the caller's contract; a vector of 8 f32 is 32 bytes of plain floats.
            let lanes = unsafe {
                // Lanes [r0 r0 r1 r1 | r2 r2 r3 r3] → [r0 r1 r0 r1 | r2 r3 r2 r3].
                let h = _mm256_hadd_ps(acc[t], acc[t]);
                std::mem::transmute::<__m256, [f32; 8]>(h)
            };
            out[t] = [lanes[0], lanes[1], lanes[4], lanes[5]];
        }
        out
    }
}
