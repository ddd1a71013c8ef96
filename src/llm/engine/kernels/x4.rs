//! What the four-row packed layouts (`q4k_x4`, `q6k_x4`, `legacy_x4`) share: the group size,
//! the shape checks, and on x86-64 the run-time choice of code, the vector widths the
//! K-quant bodies are written over (`Lanes`: 256 or 512 bits), the K-quant formats' entry
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

    /// The vector width a packed K-quant body runs at. The packed layouts are made of
    /// 256-bit vectors (eight bytes of each of four rows); `Y` works on one of them at a
    /// time, `Z` on two consecutive ones in a 512-bit vector, each half of which is then
    /// what `Y` would have (the same rows in the same lanes), so the bodies are written once
    /// over `SPAN` consecutive vectors: what differs per half (the activations, a scale)
    /// is built by `per_half`, and the integer sums are folded to 256 bits (`fold`) before
    /// each block's float step.
    ///
    /// # Safety (every method)
    /// The CPU has the features of the entry point that chose this width.
    pub(in crate::llm::engine::kernels) trait Lanes {
        /// Integer vector.
        type I: Copy;
        /// Consecutive 256-bit vectors of a packed block one `I` covers (1 or 2).
        const SPAN: usize;

        unsafe fn zero() -> Self::I;
        unsafe fn splat8(x: i8) -> Self::I;
        /// `SPAN · 32` bytes of `b` from `at`.
        unsafe fn load<const N: usize>(b: &[u8; N], at: usize) -> Self::I;
        unsafe fn and(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn or(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn add16(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn srli16<const S: i32>(x: Self::I) -> Self::I;
        unsafe fn slli16<const S: i32>(x: Self::I) -> Self::I;
        /// Each i16 lane shifted right by `count`'s low 64 bits.
        unsafe fn srl16(x: Self::I, count: __m128i) -> Self::I;
        /// u8 × i8 pairs summed into i16 (`vpmaddubsw`).
        unsafe fn maddubs(w: Self::I, a: Self::I) -> Self::I;
        /// `acc + Σ_pairs s·x` per i32 lane (`x`, `s` i16).
        unsafe fn madd_acc(acc: Self::I, x: Self::I, s: Self::I) -> Self::I;
        /// `f(s)` in half `s` (`s < SPAN`).
        unsafe fn per_half(f: impl Fn(usize) -> __m256i) -> Self::I;
        /// The i32 lanes of the halves added.
        unsafe fn fold(x: Self::I) -> __m256i;
        /// Activations for the packed vectors: `Y` broadcasts the eight at
        /// `a.qs[base + 8·q0..]` to each 64-bit quarter (as `bcast_qs`); `Z` fills its low
        /// half so and its high half with the eight at `base + 8·q1`, one load of the window
        /// and one `vpermq` (two broadcasts and an insert became five instructions).
        unsafe fn spread(a: &BlockQ8K, base: usize, q0: usize, q1: usize) -> Self::I;
    }

    /// One 256-bit vector at a time; `M` does the scaled multiply-adds (AVX2, or VNNI's
    /// `vpdpwssd` on 256-bit vectors).
    pub(in crate::llm::engine::kernels) struct Y<M>(std::marker::PhantomData<M>);

    /// Two 256-bit vectors in one 512-bit vector (AVX-512 F, BW, VL and VNNI).
    pub(in crate::llm::engine::kernels) struct Z;

    // SAFETY (both impls): each method is one intrinsic of the features its entry point
    // enables (AVX2 for `Y`, AVX-512 F/BW/VNNI for `Z`), and the loads go through
    // bounds-checked arrays.
    impl<M: Mac> Lanes for Y<M> {
        type I = __m256i;
        const SPAN: usize = 1;
        #[inline(always)]
        unsafe fn zero() -> __m256i {
            unsafe { _mm256_setzero_si256() }
        }
        #[inline(always)]
        unsafe fn splat8(x: i8) -> __m256i {
            unsafe { _mm256_set1_epi8(x) }
        }
        #[inline(always)]
        unsafe fn load<const N: usize>(b: &[u8; N], at: usize) -> __m256i {
            v256(b, at)
        }
        #[inline(always)]
        unsafe fn and(a: __m256i, b: __m256i) -> __m256i {
            unsafe { _mm256_and_si256(a, b) }
        }
        #[inline(always)]
        unsafe fn or(a: __m256i, b: __m256i) -> __m256i {
            unsafe { _mm256_or_si256(a, b) }
        }
        #[inline(always)]
        unsafe fn add16(a: __m256i, b: __m256i) -> __m256i {
            unsafe { _mm256_add_epi16(a, b) }
        }
        #[inline(always)]
        unsafe fn srli16<const S: i32>(x: __m256i) -> __m256i {
            unsafe { _mm256_srli_epi16::<S>(x) }
        }
        #[inline(always)]
        unsafe fn slli16<const S: i32>(x: __m256i) -> __m256i {
            unsafe { _mm256_slli_epi16::<S>(x) }
        }
        #[inline(always)]
        unsafe fn srl16(x: __m256i, count: __m128i) -> __m256i {
            unsafe { _mm256_srl_epi16(x, count) }
        }
        #[inline(always)]
        unsafe fn maddubs(w: __m256i, a: __m256i) -> __m256i {
            unsafe { _mm256_maddubs_epi16(w, a) }
        }
        #[inline(always)]
        unsafe fn madd_acc(acc: __m256i, x: __m256i, s: __m256i) -> __m256i {
            unsafe { M::madd_acc(acc, x, s) }
        }
        #[inline(always)]
        unsafe fn per_half(f: impl Fn(usize) -> __m256i) -> __m256i {
            f(0)
        }
        #[inline(always)]
        unsafe fn fold(x: __m256i) -> __m256i {
            x
        }
        #[inline(always)]
        unsafe fn spread(a: &BlockQ8K, base: usize, q0: usize, _: usize) -> __m256i {
            unsafe { bcast_qs(a, base + 8 * q0) }
        }
    }

    impl Lanes for Z {
        type I = __m512i;
        const SPAN: usize = 2;
        #[inline(always)]
        unsafe fn zero() -> __m512i {
            unsafe { _mm512_setzero_si512() }
        }
        #[inline(always)]
        unsafe fn splat8(x: i8) -> __m512i {
            unsafe { _mm512_set1_epi8(x) }
        }
        #[inline(always)]
        unsafe fn load<const N: usize>(b: &[u8; N], at: usize) -> __m512i {
            let bytes: [u8; 64] = b[at..at + 64].try_into().expect("64 bytes");
            // SAFETY: 64 bytes of plain data to a 64-byte integer vector.
            unsafe { std::mem::transmute::<[u8; 64], __m512i>(bytes) }
        }
        #[inline(always)]
        unsafe fn and(a: __m512i, b: __m512i) -> __m512i {
            unsafe { _mm512_and_si512(a, b) }
        }
        #[inline(always)]
        unsafe fn or(a: __m512i, b: __m512i) -> __m512i {
            unsafe { _mm512_or_si512(a, b) }
        }
        #[inline(always)]
        unsafe fn add16(a: __m512i, b: __m512i) -> __m512i {
            unsafe { _mm512_add_epi16(a, b) }
        }
        #[inline(always)]
        unsafe fn srli16<const S: i32>(x: __m512i) -> __m512i {
            // A constant count (the immediate form takes a `u32`, `Y`'s an `i32`).
            unsafe { _mm512_srl_epi16(x, _mm_cvtsi32_si128(S)) }
        }
        #[inline(always)]
        unsafe fn slli16<const S: i32>(x: __m512i) -> __m512i {
            unsafe { _mm512_sll_epi16(x, _mm_cvtsi32_si128(S)) }
        }
        #[inline(always)]
        unsafe fn srl16(x: __m512i, count: __m128i) -> __m512i {
            unsafe { _mm512_srl_epi16(x, count) }
        }
        #[inline(always)]
        unsafe fn maddubs(w: __m512i, a: __m512i) -> __m512i {
            unsafe { _mm512_maddubs_epi16(w, a) }
        }
        #[inline(always)]
        unsafe fn madd_acc(acc: __m512i, x: __m512i, s: __m512i) -> __m512i {
            unsafe { _mm512_dpwssd_epi32(acc, x, s) }
        }
        #[inline(always)]
        unsafe fn per_half(f: impl Fn(usize) -> __m256i) -> __m512i {
            unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(f(0)), f(1)) }
        }
        #[inline(always)]
        unsafe fn fold(x: __m512i) -> __m256i {
            unsafe {
                _mm256_add_epi32(_mm512_castsi512_si256(x), _mm512_extracti64x4_epi64::<1>(x))
            }
        }
        #[inline(always)]
        unsafe fn spread(a: &BlockQ8K, base: usize, q0: usize, q1: usize) -> __m512i {
            let (i0, i1) = (q0 as i64, q1 as i64);
            unsafe {
                let idx = _mm512_set_epi64(i1, i1, i1, i1, i0, i0, i0, i0);
                // The smallest window that holds both: 32 bytes when it can (a window of 64
                // would run past `qs` at the block's end).
                let window = if q0 < 4 && q1 < 4 {
                    let bytes: [i8; 32] = a.qs[base..base + 32].try_into().expect("32 bytes");
                    // SAFETY: 32 bytes of plain data; the high half is never selected.
                    _mm512_castsi256_si512(std::mem::transmute::<[i8; 32], __m256i>(bytes))
                } else {
                    let bytes: [i8; 64] = a.qs[base..base + 64].try_into().expect("64 bytes");
                    // SAFETY: 64 bytes of plain data to a 64-byte integer vector.
                    std::mem::transmute::<[i8; 64], __m512i>(bytes)
                };
                _mm512_permutexvar_epi64(idx, window)
            }
        }
    }

    /// Each token's integer sums folded to 256 bits (`Lanes::fold`). A loop, not
    /// `array::map`, whose closure was left out of line with its vectors in memory.
    ///
    /// # Safety
    /// The CPU has `L`'s features.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) unsafe fn fold<L: Lanes, const NT: usize>(
        sums: [L::I; NT],
    ) -> [__m256i; NT] {
        let mut out = [unsafe { _mm256_setzero_si256() }; NT];
        for (o, x) in out.iter_mut().zip(sums) {
            // SAFETY: the caller's contract.
            *o = unsafe { L::fold(x) };
        }
        out
    }

    /// A packed K-quant format's SIMD body (`q4k_x4`, `q6k_x4`): the four rows' dot products
    /// with `NT` activation rows.
    pub(in crate::llm::engine::kernels) trait KBody {
        /// # Safety
        /// The CPU has AVX2, FMA, F16C and what `L` needs; the caller checked the shapes.
        unsafe fn body<L: Lanes, const NT: usize>(
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
        // SAFETY (all arms): the CPU has every feature the entry point enables (`simd`
        // checked); the shapes are the caller's.
        match simd(isa) {
            None => return false,
            Some(Simd::Avx2) => unsafe { entry_avx2::<B>(groups, group_len, acts, emit) },
            Some(Simd::Vnni256) => unsafe { entry_vnni::<B>(groups, group_len, acts, emit) },
            Some(Simd::Vnni512) => unsafe { entry_avx512::<B>(groups, group_len, acts, emit) },
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
        unsafe { each_group::<B, Y<Avx2>>(groups, group_len, acts, emit) }
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
        unsafe { each_group::<B, Y<Vnni>>(groups, group_len, acts, emit) }
    }

    /// # Safety
    /// As `entry_vnni`, and the CPU has AVX512F and AVX512BW.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn entry_avx512<B: KBody>(
        groups: &[u8],
        group_len: usize,
        acts: &[&[BlockQ8K]],
        emit: &mut impl FnMut(usize, usize, &[[f32; ROWS]]),
    ) {
        // SAFETY: the caller's guarantees are `each_group`'s.
        unsafe { each_group::<B, Z>(groups, group_len, acts, emit) }
    }

    /// Groups outside, tokens inside: a group's weights are read from memory once and stay
    /// in L1 for every four tokens of a prefill tile.
    #[inline(always)]
    unsafe fn each_group<B: KBody, L: Lanes>(
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
                        [a] => emit(g, 4 * c, &B::body::<L, 1>(group, [a])),
                        [a, b] => emit(g, 4 * c, &B::body::<L, 2>(group, [a, b])),
                        [a, b, d] => emit(g, 4 * c, &B::body::<L, 3>(group, [a, b, d])),
                        [a, b, d, e] => emit(g, 4 * c, &B::body::<L, 4>(group, [a, b, d, e])),
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

    /// The SIMD code a packed product runs with.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub(in crate::llm::engine::kernels) enum Simd {
        /// AVX2 + FMA + F16C.
        Avx2,
        /// That plus AVX512-VNNI and AVX512VL: `vpdpwssd` on 256-bit vectors.
        Vnni256,
        /// That plus AVX512F and AVX512BW: 512-bit vectors.
        Vnni512,
    }

    /// The code `isa` may really run here, re-checked against the CPU (`Isa` is public, so a
    /// caller could name one the CPU lacks): `None` for the portable code, else the best
    /// of `Simd` that both `isa` allows and the CPU has.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) fn simd(isa: Isa) -> Option<Simd> {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if isa == Isa::Portable || !avx2 {
            return None;
        }
        let vnni = is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
        let wide = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
        Some(match isa {
            Isa::Amx | Isa::Avx512Vnni if vnni && wide => Simd::Vnni512,
            Isa::Amx | Isa::Avx512Vnni | Isa::Avx2Vnni if vnni => Simd::Vnni256,
            _ => Simd::Avx2,
        })
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

    /// Each token's four row sums from accumulators that hold two tokens each (`t0 = 2p`,
    /// `t1 = 2p + 1`), lanes `[t0 r0, t0 r1, t1 r0, t1 r1 | t0 r2, t0 r3, t1 r2, t1 r3]`
    /// (`q4k_x4`'s float step); accumulator `p` is read for tokens `2p` and `2p + 1`.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[inline(always)]
    pub(in crate::llm::engine::kernels) unsafe fn token_pair_sums<const NT: usize>(
        acc: [__m256; NT],
    ) -> [[f32; ROWS]; NT] {
        let mut out = [[0f32; ROWS]; NT];
        for (t, row) in out.iter_mut().enumerate() {
            // SAFETY: a vector of 8 f32 is 32 bytes of plain floats.
            let lanes = unsafe { std::mem::transmute::<__m256, [f32; 8]>(acc[t / 2]) };
            let h = 2 * (t % 2);
            *row = [lanes[h], lanes[h + 1], lanes[h + 4], lanes[h + 5]];
        }
        out
    }
}
