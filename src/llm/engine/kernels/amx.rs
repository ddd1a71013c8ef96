//! Intel AMX tiles for prefill: the packed Q4_K product (`q4k_x4`'s layout) sixteen rows by
//! up to thirty-two tokens at a time on the tile unit (`tdpbsud`: a 16 × 16 block of i32
//! dot products of signed activation bytes with unsigned weight bytes, 64 values deep),
//! where the CPU has AMX-TILE and AMX-INT8 (with AVX-512 F, BW, VL, VNNI and VBMI) and
//! Linux grants the process the tile data (`arch_prctl`).
//!
//! The trick that keeps the vector units free: a Q4_K sub-block's 6-bit scale is split in
//! two, `sc = 16·hi + lo` (`hi` ≤ 3, `lo` ≤ 15), and each weight is stored twice, as
//! `q·hi` and `q·lo` (at most 225: still an unsigned byte). The tile unit then sums a whole
//! block's `Σ q·sc·a` over all eight sub-blocks in two products, `16·C_hi + C_lo`, and
//! the vector code only adds the minimums and does the float step, instead of scaling
//! eight sub-block sums one by one.
//!
//! The integers are `q4k_x4`'s (each row's `Σ sc·Σ q·a` and `Σ m·bsum` of a block) and the
//! float step is its, in the same order, so this path gives the same bits as the AVX2 and
//! AVX-512 ones: a token's result does not depend on whether its batch ran on tiles, which
//! the engine's batched decode and chunked prefill rely on.
//!
//! Per strip of four packed groups (sixteen rows) the weights are put in tile form once
//! (`StripBlock`, in a thread's scratch buffer), then every pass of up to 32 tokens runs
//! over them. Owns only that; the packed layout is `q4k_x4`'s, the choice of rows and
//! tokens `mod.rs`'s.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

use super::kquants::read_f16;
use super::q4k_x4::{min_at, BLOCK_BYTES as PACKED_BLOCK, QS_AT, SC_AT};
use super::BlockQ8K;

/// 64 bytes of plain data (`[i32; 16]`, `[u32; 16]`, `[f32; 16]` or `[u8; 64]`) as a
/// vector: a macro rather than a function, so that it is always inlined into the
/// target-feature code (a vector passed to a function without AVX-512 would go through
/// memory).
macro_rules! vector {
    ($from:ty => $to:ty, $x:expr) => {
        // SAFETY: 64 bytes of plain data to a 64-byte vector.
        unsafe { std::mem::transmute::<$from, $to>($x) }
    };
}

/// Rows per strip: one tile's sixteen i32 columns.
pub(super) const STRIP_ROWS: usize = 16;
/// Tokens per tile: a tile's sixteen rows.
const TILE_TOKENS: usize = 16;
/// Tokens per pass over a strip block: two tiles, sharing each weight tile load.
const PASS_TOKENS: usize = 2 * TILE_TOKENS;

/// How many strips the process ran on tiles: the tests check that products dispatched to
/// AMX really reach the tiles.
#[cfg(test)]
pub(super) static STRIPS_RUN: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Whether this CPU and kernel run AMX tiles: asked once, and the tile data requested for
/// the process on the way (Linux hands it out on request only, since 5.16).
pub(super) fn usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| cpu_has_amx() && request_tile_data())
}

/// AMX-TILE and AMX-INT8 (CPUID leaf 7, EDX bits 24 and 25), and the AVX-512 the vector
/// steps use (`std` does not detect AMX on stable Rust).
fn cpu_has_amx() -> bool {
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vbmi")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    // SAFETY: CPUID exists on every x86-64 CPU (the function is safe on newer Rust).
    #[allow(unused_unsafe)]
    let leaf7 = unsafe { __cpuid_count(7, 0) };
    avx512 && leaf7.edx >> 24 & 1 == 1 && leaf7.edx >> 25 & 1 == 1
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: permission for every thread of
/// the process to use the tile registers. Refused by kernels without AMX support.
fn request_tile_data() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; it changes which registers
        // the process may use, nothing in its memory.
        let rc =
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        rc == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// 64 bytes on a cache line: a row of an activation tile.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(super) struct Line([i8; 64]);

/// The activations' bytes (`n_tokens` rows of `nb` natural-order blocks) as the tiles
/// load them: for each pass of up to 32 tokens (as `q4k_strips` takes them), for each
/// block `b` and quarter `k` (values `64k..64k + 64`), the pass's tokens one line each.
/// An activation tile is then 16 consecutive lines, which the tile unit loads far faster
/// than 16 lines a token's row apart.
pub(super) fn pack_acts(acts: &[BlockQ8K], n_tokens: usize, nb: usize, out: &mut Vec<Line>) {
    assert_eq!(acts.len(), n_tokens * nb, "{n_tokens} activation rows of {nb} blocks");
    out.clear();
    out.reserve(n_tokens * nb * 4);
    for t0 in (0..n_tokens).step_by(PASS_TOKENS) {
        let tokens = (n_tokens - t0).min(PASS_TOKENS);
        for b in 0..nb {
            for k in 0..4 {
                out.extend((t0..t0 + tokens).map(|t| {
                    Line(acts[t * nb + b].qs[64 * k..64 * k + 64].try_into().expect("64 bytes"))
                }));
            }
        }
    }
}

/// Block `b` of a strip in tile form.
#[repr(C, align(64))]
struct StripBlock {
    /// Pair `j`'s weights (sub-blocks `2j`, `2j + 1`) times the high part of their
    /// sub-block's scale, as a `tdpbsud` second operand: 16 rows of 64 bytes, row `kk`
    /// holding values `4kk..4kk + 4` of the pair for each of the sixteen rows in turn.
    hi: [[u8; 1024]; 4],
    /// The same times the low part.
    lo: [[u8; 1024]; 4],
    /// The rows' 6-bit minimums as i16 pairs in the order of the activations' `bsums32`
    /// (pairs of sub-blocks (0, 1), (4, 5), (2, 3), (6, 7)), one `vpdpwssd` a pair.
    mins: [[u32; 16]; 4],
    d: [f32; 16],
    dmin: [f32; 16],
}

impl StripBlock {
    const ZERO: StripBlock = StripBlock {
        hi: [[0; 1024]; 4],
        lo: [[0; 1024]; 4],
        mins: [[0; 16]; 4],
        d: [0.0; 16],
        dmin: [0.0; 16],
    };
}

/// A block's tile results for a pass: `C_hi` and `C_lo`, a token's sixteen rows a line.
#[derive(Clone, Copy)]
struct Results {
    hi: [[i32; 16]; PASS_TOKENS],
    lo: [[i32; 16]; PASS_TOKENS],
}

/// What a thread keeps between calls: the strip in tile form and two blocks' results.
struct Scratch {
    strip: Vec<StripBlock>,
    c: [Results; 2],
}

impl Results {
    const ZERO: Results = Results { hi: [[0; 16]; PASS_TOKENS], lo: [[0; 16]; PASS_TOKENS] };
}

thread_local! {
    static SCRATCH: RefCell<Scratch> =
        const { RefCell::new(Scratch { strip: Vec::new(), c: [Results::ZERO; 2] }) };
}

/// The tile configuration for a pass of `first` (1 to 16) and `second` (0 to 16) tokens:
/// tiles 0 and 1 the first tile's results (`C_hi`, `C_lo`: tokens × 16 i32), 2 and 3 the
/// second's, 4 and 5 the two tiles' activations (tokens × 64 bytes), 6 and 7 the weights
/// (`q·hi`, `q·lo`: 16 × 64 bytes). A second tile of no tokens is left unconfigured.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    const NONE: TileConfig =
        TileConfig { palette: 0, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };

    fn for_pass(first: usize, second: usize) -> TileConfig {
        assert!((1..=TILE_TOKENS).contains(&first) && second <= TILE_TOKENS, "a pass's tokens");
        let mut config = TileConfig { palette: 1, ..TileConfig::NONE };
        for (tile, rows) in [(0, first), (1, first), (4, first), (6, 16), (7, 16)]
            .into_iter()
            .chain([(2, second), (3, second), (5, second)].into_iter().filter(|&(_, r)| r > 0))
        {
            config.colsb[tile] = 64;
            config.rows[tile] = rows as u8;
        }
        config
    }
}

/// Every strip of sixteen rows in `groups` (packed Q4_K groups of `group_len` bytes, a
/// multiple of four of them) against every token of `acts` (`n_tokens` rows of `nb`
/// natural-order `BlockQ8K`, one after the other): `emit(strip, token, rows)` with
/// `rows[n]` the dot product of row `16·strip + n` with the token. `false` (nothing done)
/// where the tiles cannot run here.
pub(super) fn q4k_strips(
    groups: &[u8],
    group_len: usize,
    acts: &[BlockQ8K],
    tiles: &[Line],
    n_tokens: usize,
    mut emit: impl FnMut(usize, usize, &[f32; STRIP_ROWS]),
) -> bool {
    if !usable() {
        return false;
    }
    let nb = group_len / PACKED_BLOCK;
    assert!(nb > 0 && group_len == nb * PACKED_BLOCK, "packed Q4_K groups");
    let strip_len = 4 * group_len;
    assert!(groups.len().is_multiple_of(strip_len), "whole strips of four groups");
    assert_eq!(acts.len(), n_tokens * nb, "{n_tokens} activation rows of {nb} blocks");
    assert_eq!(tiles.len(), n_tokens * nb * 4, "activations packed for the tiles");
    // The thread's tile configuration as we found it (all zeros: none), put back at the
    // end: other code on this thread (candle's AMX kernels, in the tests and benches)
    // may keep one configured between its calls.
    let mut found = TileConfig::NONE;
    // SAFETY: AMX-TILE is present (`usable`); stores 64 bytes into `found`.
    unsafe { asm!("sttilecfg [{}]", in(reg) &mut found, options(nostack)) };
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.strip.resize_with(nb, || StripBlock::ZERO);
        for (strip, bytes) in groups.chunks_exact(strip_len).enumerate() {
            for (b, block) in scratch.strip.iter_mut().enumerate() {
                let blocks: [&[u8]; 4] = std::array::from_fn(|g| {
                    let at = g * group_len + b * PACKED_BLOCK;
                    &bytes[at..at + PACKED_BLOCK]
                });
                // SAFETY: `usable` checked AVX-512 F/BW/VBMI and F16C on this CPU.
                unsafe { fill(blocks, block) };
            }
            let mut t0 = 0;
            while t0 < n_tokens {
                let tokens = (n_tokens - t0).min(PASS_TOKENS);
                let first = tokens.min(TILE_TOKENS);
                let config = TileConfig::for_pass(first, tokens - first);
                let mut out = [[0f32; STRIP_ROWS]; PASS_TOKENS];
                // SAFETY: `usable` checked AMX-TILE, AMX-INT8, AVX-512 F/BW/VL/VNNI and FMA
                // and got the tile data; the activations hold `tokens` rows of `nb` blocks
                // from `t0` (asserted above), the strip `nb` blocks.
                unsafe {
                    let acts = &acts[t0 * nb..(t0 + tokens) * nb];
                    let tiles = &tiles[t0 * nb * 4..(t0 + tokens) * nb * 4];
                    let out = &mut out[..tokens];
                    pass(&config, &scratch.strip, acts, tiles, nb, &mut scratch.c, out);
                }
                for (t, rows) in out[..tokens].iter().enumerate() {
                    emit(strip, t0 + t, rows);
                }
                t0 += tokens;
            }
            #[cfg(test)]
            STRIPS_RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    if found.palette == 0 {
        // SAFETY: AMX-TILE is present; the thread had no tiles, and has none again (the
        // kernel then need not save their data on a switch).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    } else {
        // SAFETY: the configuration the CPU itself stored, so a valid one.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &found, options(nostack, readonly)) };
    }
    true
}

/// Byte `o` of a 64-byte nibble plane (vectors `v`, `v + 1` of a pair: four rows of eight
/// bytes each) that output byte `o` of `fill`'s permutation takes: output lane `2·vl + sb`
/// holds, for rows 0..4, the four values `4x..4x + 4` of sub-block `sb` of the pair that
/// the plane holds for vector `v + vl` (`x = 2(v + vl) + h`, the plane's nibble `h`). In
/// `q4k_x4`'s layout byte `k` of a row holds sub-block `(k/2) % 2`'s value
/// `8v + 4h + 2(k/4) + k%2`, so value `4x + i` is at `k = i%2 + 2sb + 4(i/2)`.
const PLANE_ORDER: [u8; 64] = {
    let mut order = [0u8; 64];
    let mut o = 0;
    while o < 64 {
        let (lane, r, i) = (o / 16, o % 16 / 4, o % 4);
        let (vl, sb) = (lane / 2, lane % 2);
        order[o] = (32 * vl + 8 * r + i % 2 + 2 * sb + 4 * (i / 2)) as u8;
        o += 1;
    }
    order
};

/// For pair `j`, the byte of a group's 32 scale bytes (row `r`'s sub-block `s` at
/// `8r + s`) that scales output byte `o` of `fill`'s permutation: row `(o % 16) / 4`'s
/// scale of sub-block `2j + sb`, lane `o / 16 = 2·vl + sb`.
const SCALE_ORDER: [[u8; 64]; 4] = {
    let mut order = [[0u8; 64]; 4];
    let mut j = 0;
    while j < 4 {
        let mut o = 0;
        while o < 64 {
            let (sb, r) = (o / 16 % 2, o % 16 / 4);
            order[j][o] = (8 * r + 2 * j + sb) as u8;
            o += 1;
        }
        j += 1;
    }
    order
};

/// Bytes `q·s` of two vectors of bytes at most 15 (so each product fits a byte): the even
/// bytes' products from one 16-bit multiply, the odd bytes' from another.
///
/// # Safety
/// The CPU has AVX-512 BW.
#[inline(always)]
unsafe fn mul_bytes(q: __m512i, s: __m512i) -> __m512i {
    // SAFETY: the caller's contract.
    unsafe {
        let even = _mm512_and_si512(_mm512_mullo_epi16(q, s), _mm512_set1_epi16(0x00ff));
        let odd = _mm512_mullo_epi16(_mm512_srli_epi16::<8>(q), _mm512_srli_epi16::<8>(s));
        _mm512_or_si512(even, _mm512_slli_epi16::<8>(odd))
    }
}

/// Put block `b` of four packed groups (`blocks[g]`, rows `4g..4g + 4`) in tile form.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VBMI.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn fill(blocks: [&[u8]; 4], out: &mut StripBlock) {
    let order = vector!([u8; 64] => __m512i, PLANE_ORDER);
    let low = _mm512_set1_epi8(0x0f);
    for (g, blk) in blocks.iter().enumerate() {
        let blk: &[u8; PACKED_BLOCK] = (*blk).try_into().expect("a packed Q4_K block");
        let mut scale_bytes = [0u8; 64];
        scale_bytes[..32].copy_from_slice(&blk[SC_AT..SC_AT + 32]);
        let scales = vector!([u8; 64] => __m512i, scale_bytes);
        for (j, scale_order) in SCALE_ORDER.iter().enumerate() {
            let sc = _mm512_permutexvar_epi8(vector!([u8; 64] => __m512i, *scale_order), scales);
            let (sc_lo, sc_hi) = (_mm512_and_si512(sc, low), _mm512_srli_epi16::<4>(sc));
            // The 6-bit scales' top two bits, with no bits of the next byte (which the
            // 16-bit shift brings into the high byte's top four).
            let sc_hi = _mm512_and_si512(sc_hi, low);
            for half in 0..2 {
                let at = QS_AT + 128 * j + 64 * half;
                let raw: [u8; 64] = blk[at..at + 64].try_into().expect("64 bytes");
                let raw = vector!([u8; 64] => __m512i, raw);
                for h in 0..2 {
                    let plane = if h == 0 {
                        _mm512_and_si512(raw, low)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low)
                    };
                    let q = _mm512_permutexvar_epi8(order, plane);
                    // SAFETY: AVX-512 BW is enabled here.
                    let (hi, lo) = unsafe { (mul_bytes(q, sc_hi), mul_bytes(q, sc_lo)) };
                    // SAFETY: 64-byte vectors are 64 bytes of plain data.
                    let hi = unsafe { std::mem::transmute::<__m512i, [u8; 64]>(hi) };
                    let lo = unsafe { std::mem::transmute::<__m512i, [u8; 64]>(lo) };
                    for lane in 0..4 {
                        let (vl, sb) = (lane / 2, lane % 2);
                        let kk = 8 * sb + 2 * (2 * half + vl) + h;
                        let at = 64 * kk + 16 * g;
                        out.hi[j][at..at + 16].copy_from_slice(&hi[16 * lane..16 * lane + 16]);
                        out.lo[j][at..at + 16].copy_from_slice(&lo[16 * lane..16 * lane + 16]);
                    }
                }
            }
        }
        for r in 0..4 {
            let n = 4 * g + r;
            // The minimum of the `q`-th sub-block in `bsums32` order.
            let min = |q: usize| u32::from(blk[min_at(r, q)]);
            for (p, pair) in out.mins.iter_mut().enumerate() {
                pair[n] = min(2 * p) | min(2 * p + 1) << 16;
            }
            out.d[n] = read_f16(blk, 2 * r);
            out.dmin[n] = read_f16(blk, 8 + 2 * r);
        }
    }
}

/// One pass (`acts`: 1 to 32 tokens of `nb` blocks; the first sixteen in one tile, the
/// rest in a second) against a strip in tile form, into `out[t][n]`: for each block, the
/// two products `C_hi`, `C_lo` of each tile on the tile unit (each weight tile loaded
/// once for both token tiles), then per token `q4k_x4`'s float step for sixteen rows at
/// once. The tile products of block `b` are issued before the vector step of block
/// `b - 1` (two result buffers), so the tile unit and the vector units work together.
///
/// # Safety
/// The CPU has AMX-TILE, AMX-INT8, AVX-512 F/BW/VL/VNNI and FMA, and the process has the
/// tile data; `config` is `for_pass` of `out.len()` tokens; `acts` holds `out.len()` rows
/// of `nb` blocks, `tiles` the same packed by `pack_acts`, `strip` `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
unsafe fn pass(
    config: &TileConfig,
    strip: &[StripBlock],
    acts: &[BlockQ8K],
    tiles: &[Line],
    nb: usize,
    c: &mut [Results; 2],
    out: &mut [[f32; STRIP_ROWS]],
) {
    let tokens = out.len();
    let (first, second) = (config.rows[0] as usize, config.rows[2] as usize);
    assert!(strip.len() == nb && acts.len() == tokens * nb && first + second == tokens);
    assert_eq!(tiles.len(), tokens * nb * 4, "a pass's packed activations");
    let mut acc = [_mm512_setzero_ps(); PASS_TOKENS];
    // SAFETY: a 64-byte configuration that `TileConfig::for_pass` made valid.
    unsafe { asm!("ldtilecfg [{}]", in(reg) config, options(nostack, readonly)) };
    for b in 0..=nb {
        if b < nb {
            let w = &strip[b];
            let c = &mut c[b % 2];
            // SAFETY (every block below): an activation tile reads its tokens' lines of
            // `tiles` (block `b`, quarter `k`: `tokens` consecutive lines from
            // `(4b + k)·tokens`, the second tile from line 16 of them); a weight tile 16
            // rows of 64 bytes of `w.hi[k]` or `w.lo[k]`; the results go to the tiles'
            // token lines of `c.hi` and `c.lo`, 64 bytes each.
            unsafe {
                asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
                if second > 0 {
                    asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                }
                for k in 0..4 {
                    let a = tiles[(4 * b + k) * tokens..].as_ptr();
                    let (hi, lo) = (w.hi[k].as_ptr(), w.lo[k].as_ptr());
                    if second > 0 {
                        asm!(
                            "tileloadd tmm4, [{a} + {stride}*1]",
                            "tileloadd tmm5, [{a1} + {stride}*1]",
                            "tileloadd tmm6, [{hi} + {row}*1]",
                            "tileloadd tmm7, [{lo} + {row}*1]",
                            "tdpbsud tmm0, tmm4, tmm6",
                            "tdpbsud tmm1, tmm4, tmm7",
                            "tdpbsud tmm2, tmm5, tmm6",
                            "tdpbsud tmm3, tmm5, tmm7",
                            a = in(reg) a, a1 = in(reg) a.add(TILE_TOKENS),
                            stride = in(reg) 64usize, hi = in(reg) hi, lo = in(reg) lo,
                            row = in(reg) 64usize,
                            options(nostack, readonly)
                        );
                    } else {
                        asm!(
                            "tileloadd tmm4, [{a} + {stride}*1]",
                            "tileloadd tmm6, [{hi} + {row}*1]",
                            "tileloadd tmm7, [{lo} + {row}*1]",
                            "tdpbsud tmm0, tmm4, tmm6",
                            "tdpbsud tmm1, tmm4, tmm7",
                            a = in(reg) a, stride = in(reg) 64usize, hi = in(reg) hi,
                            lo = in(reg) lo, row = in(reg) 64usize,
                            options(nostack, readonly)
                        );
                    }
                }
                asm!(
                    "tilestored [{hi} + {row}*1], tmm0",
                    "tilestored [{lo} + {row}*1], tmm1",
                    hi = in(reg) c.hi.as_mut_ptr(), lo = in(reg) c.lo.as_mut_ptr(),
                    row = in(reg) 64usize,
                    options(nostack)
                );
                if second > 0 {
                    asm!(
                        "tilestored [{hi} + {row}*1], tmm2",
                        "tilestored [{lo} + {row}*1], tmm3",
                        hi = in(reg) c.hi[TILE_TOKENS..].as_mut_ptr(),
                        lo = in(reg) c.lo[TILE_TOKENS..].as_mut_ptr(),
                        row = in(reg) 64usize,
                        options(nostack)
                    );
                }
            }
        }
        if b == 0 {
            continue;
        }
        let b = b - 1;
        let (w, c) = (&strip[b], &c[b % 2]);
        let mut mins = [_mm512_setzero_si512(); 4];
        for (v, x) in mins.iter_mut().zip(w.mins) {
            *v = vector!([u32; 16] => __m512i, x);
        }
        let (d, dmin) = (vector!([f32; 16] => __m512, w.d), vector!([f32; 16] => __m512, w.dmin));
        for (t, acc) in acc[..tokens].iter_mut().enumerate() {
            let a = &acts[t * nb + b];
            let sumi = _mm512_add_epi32(
                _mm512_slli_epi32::<4>(vector!([i32; 16] => __m512i, c.hi[t])),
                vector!([i32; 16] => __m512i, c.lo[t]),
            );
            // The activations' `bsums32` as four i16 pairs, one per `mins` vector.
            // SAFETY: 16 bytes of plain integers.
            let pairs = unsafe { std::mem::transmute::<[i16; 8], [i32; 4]>(a.bsums32) };
            let mut msum = _mm512_setzero_si512();
            for (m, pair) in mins.iter().zip(pairs) {
                msum = _mm512_dpwssd_epi32(msum, *m, _mm512_set1_epi32(pair));
            }
            // `q4k_x4`'s float step, operation for operation.
            let ad = _mm512_set1_ps(a.d);
            *acc = _mm512_fmadd_ps(_mm512_mul_ps(d, ad), _mm512_cvtepi32_ps(sumi), *acc);
            *acc = _mm512_fnmadd_ps(_mm512_mul_ps(dmin, ad), _mm512_cvtepi32_ps(msum), *acc);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: a vector of 16 f32 is 64 bytes of plain floats.
        *o = unsafe { std::mem::transmute::<__m512, [f32; 16]>(a) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{random_blocks, Rng};
    use super::super::{matmul, Acts, Isa, QMatrix, ThreadPool, WeightType};
    use super::*;
    use std::sync::atomic::Ordering;

    /// Whether Linux says this CPU has AMX-INT8 (`/proc/cpuinfo` lists it only where the
    /// kernel supports the tiles): read apart from `usable`, which the test checks.
    fn kernel_lists_amx() -> bool {
        std::fs::read_to_string("/proc/cpuinfo")
            .is_ok_and(|info| info.split_whitespace().any(|flag| flag == "amx_int8"))
    }

    /// The tile form puts each value where `tdpbsud` pairs it with its activation: the
    /// permutation takes every byte of the plane once.
    #[test]
    fn the_plane_order_takes_every_byte_once() {
        let mut seen = [false; 64];
        for &at in &PLANE_ORDER {
            assert!(!std::mem::replace(&mut seen[at as usize], true), "byte {at} twice");
        }
    }

    /// Packed Q4_K products of 16 tokens or more on AMX tiles give the bits of the AVX-512
    /// path (and of each token multiplied alone, which never runs on tiles), on row counts
    /// with strips, ragged groups and a ragged tail, token counts with a ragged tile, random
    /// and extreme values (every nibble 15, activations at full scale: the i32 sums' worst
    /// case). Where Linux lists AMX-INT8, fails unless the tiles really ran.
    #[test]
    fn amx_tiles_give_the_avx512_bits() {
        if !usable() {
            assert!(
                !kernel_lists_amx(),
                "the CPU and kernel have AMX-INT8 but the tiles do not run"
            );
            eprintln!("no AMX here: the tile path did not run (available: {:?})", Isa::available());
            return;
        }
        assert!(Isa::available().contains(&Isa::Amx), "AMX usable but not offered");
        let mut rng = Rng(0x7a3c_55e1_90d2_4b68);
        let pool = ThreadPool::new(2);
        let before = STRIPS_RUN.load(Ordering::Relaxed);
        for (rows, cols, n_tokens, extreme) in [
            (16, 256, 16, None),
            (55, 768, 17, None),
            (132, 512, 33, None),
            (64, 1024, 67, None),
            (48, 512, 20, Some(3.0f32)),
            (48, 512, 20, Some(-3.0)),
        ] {
            let mut bytes = random_blocks(WeightType::Q4K, rows, cols, &mut rng);
            let x = match extreme {
                None => rng.vec(n_tokens * cols, 2.0),
                Some(v) => {
                    for blk in bytes.chunks_exact_mut(WeightType::Q4K.block_bytes()) {
                        blk[4..].fill(0xff);
                    }
                    vec![v; n_tokens * cols]
                }
            };
            let w = QMatrix::from_bytes(WeightType::Q4K, rows, cols, bytes).expect("matrix");
            let mut acts = Acts::new();
            acts.prepare(&x, n_tokens, cols, &[&w]);
            let mut tiles = vec![f32::NAN; n_tokens * rows];
            let mut vectors = vec![f32::NAN; n_tokens * rows];
            matmul(&pool, Isa::Amx, &acts, &w, &mut tiles);
            matmul(&pool, Isa::Avx512Vnni, &acts, &w, &mut vectors);
            let what = format!("{rows}x{cols}, {n_tokens} tokens, {extreme:?}");
            for (i, (a, b)) in tiles.iter().zip(&vectors).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{what} [{i}]: amx {a} vs avx512 {b}");
            }
            // The strips straight from the packed groups, on this thread.
            let strips = rows / STRIP_ROWS;
            let mut direct = vec![f32::NAN; n_tokens * STRIP_ROWS * strips];
            let ran = q4k_strips(
                w.groups_bytes(0, 4 * strips),
                w.group_len(),
                &acts.q8k,
                &acts.q8k_tiles,
                n_tokens,
                |strip, t, values| {
                    let at = t * STRIP_ROWS * strips + STRIP_ROWS * strip;
                    direct[at..at + STRIP_ROWS].copy_from_slice(values);
                },
            );
            assert!(ran, "{what}: the tiles did not run");
            for t in 0..n_tokens {
                let got = &direct[t * STRIP_ROWS * strips..(t + 1) * STRIP_ROWS * strips];
                let want = &vectors[t * rows..t * rows + STRIP_ROWS * strips];
                assert_eq!(got, want, "{what}: token {t} straight from the strips");
            }
            for t in [0, n_tokens / 2, n_tokens - 1] {
                let mut one = Acts::new();
                one.prepare(&x[t * cols..(t + 1) * cols], 1, cols, &[&w]);
                let mut alone = vec![f32::NAN; rows];
                matmul(&pool, Isa::Amx, &one, &w, &mut alone);
                assert_eq!(&tiles[t * rows..(t + 1) * rows], &alone[..], "{what}: token {t} alone");
            }
        }
        let strips = STRIPS_RUN.load(Ordering::Relaxed) - before;
        assert!(strips > 0, "the AMX tiles never ran");
        eprintln!("AMX tiles ran {strips} strips");
    }
}
