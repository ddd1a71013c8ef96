//! What the two four-row packed layouts (`q4k_x4`, `legacy_x4`) share: the group size, and
//! on x86-64 the run-time choice of code, the broadcast of eight activations and the final
//! sum of each row's two lanes.
//! Owns no layout of its own.

/// Rows per packed group.
pub(super) const ROWS: usize = 4;

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::super::Isa;
    use super::ROWS;
    use std::arch::x86_64::*;

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
