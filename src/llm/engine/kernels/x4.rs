//! What the four-row packed layouts (`q4k_x4`, `q6k_x4`, `legacy_x4`) share: the group size,
//! and on x86-64 the run-time choice of code, the K-quant formats' entry points, the broadcast of eight activations and the final
//! sum of each row's two lanes.
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

    /// Run `B` on `isa` if the CPU has it, returning `false` to take the portable path. The
    /// caller checked 1 to 4 activation rows, each as long as the group, and `out`.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) fn run_k<B: KBody>(
        isa: Isa,
        group: &[u8],
        acts: &[&[BlockQ8K]],
        out: &mut [[f32; ROWS]],
    ) -> bool {
        let Some(vnni) = simd(isa) else { return false };
        if vnni {
            // SAFETY: the CPU has every feature `entry_vnni` enables (`simd` checked); the
            // shapes are the caller's.
            unsafe { entry_vnni::<B>(group, acts, out) };
        } else {
            // SAFETY: the CPU has AVX2, FMA and F16C (`simd` checked); shapes as above.
            unsafe { entry_avx2::<B>(group, acts, out) };
        }
        true
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; 1 to 4 activation rows; `out` has a slot for each.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn entry_avx2<B: KBody>(group: &[u8], acts: &[&[BlockQ8K]], out: &mut [[f32; ROWS]]) {
        // SAFETY: the caller's guarantees are `by_tokens`'s.
        unsafe { by_tokens::<B, Avx2>(group, acts, out) }
    }

    /// # Safety
    /// As `entry_avx2`, and the CPU has AVX512-VNNI and AVX512VL.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn entry_vnni<B: KBody>(group: &[u8], acts: &[&[BlockQ8K]], out: &mut [[f32; ROWS]]) {
        // SAFETY: the caller's guarantees are `by_tokens`'s.
        unsafe { by_tokens::<B, Vnni>(group, acts, out) }
    }

    #[inline(always)]
    unsafe fn by_tokens<B: KBody, M: Mac>(
        group: &[u8],
        acts: &[&[BlockQ8K]],
        out: &mut [[f32; ROWS]],
    ) {
        // SAFETY (all arms): the features are enabled by the calling entry point.
        unsafe {
            match acts.len() {
                1 => out[..1].copy_from_slice(&B::body::<M, 1>(group, [acts[0]])),
                2 => out[..2].copy_from_slice(&B::body::<M, 2>(group, [acts[0], acts[1]])),
                3 => out[..3].copy_from_slice(&B::body::<M, 3>(group, [acts[0], acts[1], acts[2]])),
                _ => out[..4]
                    .copy_from_slice(&B::body::<M, 4>(group, [acts[0], acts[1], acts[2], acts[3]])),
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
