//! Our own quantized matrix kernels: the engine's matrix products, run on weights kept in
//! their GGUF block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; anything else is
//! widened to f32 at load) against activations quantized once per product (32-value Q8
//! blocks for the legacy formats, 256-value Q8_K blocks for the K-quants) and reused for
//! every output row. The K-quants and the 32-value formats are repacked at load four rows
//! at a time (`q4k_x4` for Q4_K and Q5_K, `q6k_x4`, `legacy_x4`), so the integer products
//! of four rows share their widening and float steps; f32 and a matrix's last `rows % 4`
//! rows keep the GGUF row layout (`kquants`, `legacy`). Integer dot products use AVX2, or
//! AVX-512 VNNI's `vpdpbusd`/`vpdpwssd` where the CPU has it, the packed products and
//! attention on 512-bit vectors where it also has AVX-512 F and BW, and prefill products of
//! packed Q4_K matrices on AMX tiles where it has those (`amx`), chosen at run time
//! (`ENGINE_ISA` may force a lower one); other CPUs get the portable code. Every SIMD path
//! of a packed product adds the same integers, so all give the same bits. Prefill is a
//! tiled GEMM (one unpacked weight block feeds up to four tokens); work is split over a
//! persistent thread pool (`pool`).
//!
//! On an NVIDIA GPU (the `cuda` feature), `cuda_decode` runs a whole decode step through
//! candle's `mmvq` products and our own fused CUDA kernels (`cuda_decode.cu`, compiled to
//! PTX by `build.rs`).
//!
//! This module is the only place in the crate allowed `unsafe`: SIMD intrinsics, the views of
//! weight bytes as block structs, the pool's hand-off of borrowed closures, and the GPU
//! kernel launches. Each unsafe block carries its safety argument. It knows nothing of GGUF
//! files or tokens; only `cuda_decode` knows the order of a transformer layer's operations.

#![allow(unsafe_code)]

pub mod activation;
#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda_decode;
mod kquants;
mod legacy;
mod legacy_x4;
mod pool;
mod q4k_x4;
mod q6k_x4;
#[cfg(test)]
mod testing;
mod x4;

pub use pool::ThreadPool;

/// Threads a model's kernels use when nothing else is said (0: one per available core).
static DEFAULT_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Set the process-wide thread count for models loaded from now on (`--threads`).
pub fn set_default_threads(threads: usize) {
    DEFAULT_THREADS.store(threads, std::sync::atomic::Ordering::Relaxed);
}

/// The thread count models are loaded with: the one set by `set_default_threads`, else
/// one per core the process may use.
pub fn default_threads() -> usize {
    match DEFAULT_THREADS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// The best instruction set models loaded from now on may use (`ENGINE_ISA`), as the
/// `Isa` discriminant (declared worst first); `usize::MAX`: no limit.
static ISA_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(usize::MAX);

/// Make `Isa::detect` answer at most `isa` (a lower path for comparisons, `ENGINE_ISA`).
/// The caller checked that the CPU has it (`Isa::from_setting`).
pub fn set_isa_limit(isa: Isa) {
    ISA_LIMIT.store(isa as usize, std::sync::atomic::Ordering::Relaxed);
}

/// The instruction set a product runs with. Detected once; tests run every one available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust: any CPU.
    Portable,
    /// AVX2 + FMA (x86-64 since Haswell / Zen).
    Avx2,
    /// AVX2 code with the u8×i8 dot products done by AVX-512 VNNI `vpdpbusd` on 256-bit
    /// vectors (needs AVX512_VNNI and AVX512VL: Ice Lake, Sapphire Rapids, Zen 4 and later).
    Avx2Vnni,
    /// That, and the packed products (`q4k_x4`, `q6k_x4`, `legacy_x4`) and attention on
    /// 512-bit vectors (also needs AVX512F and AVX512BW); the row-layout kernels run as
    /// `Avx2Vnni`.
    Avx512Vnni,
    /// That, and prefill products of packed Q4_K matrices (16 tokens or more) on AMX tiles
    /// (`amx`; needs AMX-TILE, AMX-INT8 and AVX-512 VBMI, and Linux's leave to use the
    /// tiles: Sapphire Rapids and later), with the same bits as `Avx512Vnni`.
    Amx,
}

impl Isa {
    /// The best instruction set this CPU has, or the `ENGINE_ISA` limit when it is lower.
    pub fn detect() -> Isa {
        let limit = ISA_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
        let mut usable = Isa::available().into_iter().filter(|&isa| (isa as usize) <= limit);
        usable.next_back().expect("portable is always available")
    }

    /// The `ENGINE_ISA` setting: `auto` is `None` (the best there is), a name is that
    /// instruction set if this CPU has it; anything else says what this CPU offers.
    pub fn from_setting(value: &str) -> Result<Option<Isa>, String> {
        let available = Isa::available();
        let names: Vec<&str> = available.iter().map(|isa| isa.name()).collect();
        if value == "auto" {
            return Ok(None);
        }
        match available.iter().find(|isa| isa.name() == value) {
            Some(&isa) => Ok(Some(isa)),
            None => Err(format!(
                "ENGINE_ISA={value}: must be auto or one this CPU has ({})",
                names.join(", ")
            )),
        }
    }

    /// Every instruction set this CPU can run, worst first.
    pub fn available() -> Vec<Isa> {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                    isas.push(Isa::Avx2Vnni);
                    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                        isas.push(Isa::Avx512Vnni);
                        if amx::usable() {
                            isas.push(Isa::Amx);
                        }
                    }
                }
            }
        }
        isas
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx2Vnni => "avx512-vnni-256",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Amx => "amx",
        }
    }
}

/// Storage formats of weight matrices that have kernels. Byte layouts are ggml's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightType {
    F32,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl WeightType {
    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            WeightType::F32 => 1,
            WeightType::Q4_0
            | WeightType::Q4_1
            | WeightType::Q5_0
            | WeightType::Q5_1
            | WeightType::Q8_0 => 32,
            WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightType::F32 => 4,
            WeightType::Q4_0 => 18,
            WeightType::Q4_1 => 20,
            WeightType::Q5_0 => 22,
            WeightType::Q5_1 => 24,
            WeightType::Q8_0 => 34,
            WeightType::Q4K => 144,
            WeightType::Q5K => 176,
            WeightType::Q6K => 210,
        }
    }

    /// The activation form its dot products read.
    pub fn act_kind(self) -> ActKind {
        match self {
            WeightType::F32 => ActKind::F32,
            WeightType::Q4_0
            | WeightType::Q4_1
            | WeightType::Q5_0
            | WeightType::Q5_1
            | WeightType::Q8_0 => ActKind::Q8x32,
            WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => ActKind::Q8K,
        }
    }

    /// The kernel type for a GGUF storage type, or `None` (the caller widens it to f32).
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<WeightType> {
        use candle_core::quantized::GgmlDType as G;
        Some(match dtype {
            G::F32 => WeightType::F32,
            G::Q4_0 => WeightType::Q4_0,
            G::Q4_1 => WeightType::Q4_1,
            G::Q5_0 => WeightType::Q5_0,
            G::Q5_1 => WeightType::Q5_1,
            G::Q8_0 => WeightType::Q8_0,
            G::Q4K => WeightType::Q4K,
            G::Q5K => WeightType::Q5K,
            G::Q6K => WeightType::Q6K,
            _ => return None,
        })
    }

    /// The GGUF storage type of this format.
    pub fn ggml_dtype(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match self {
            WeightType::F32 => G::F32,
            WeightType::Q4_0 => G::Q4_0,
            WeightType::Q4_1 => G::Q4_1,
            WeightType::Q5_0 => G::Q5_0,
            WeightType::Q5_1 => G::Q5_1,
            WeightType::Q8_0 => G::Q8_0,
            WeightType::Q4K => G::Q4K,
            WeightType::Q5K => G::Q5K,
            WeightType::Q6K => G::Q6K,
        }
    }

    /// Bytes of one row of `cols` values (`cols` a multiple of `block_len`).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_len() * self.block_bytes()
    }
}

/// The forms activations take for the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActKind {
    F32,
    /// `BlockQ8x32`: for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 weights.
    Q8x32,
    /// `BlockQ8K`: for the K-quants.
    Q8K,
}

/// 32 activations quantized to 8 bits: `x[i] ≈ d * qs[i]`, with `s = d * Σ qs` kept for the
/// formats whose weights carry an offset (Q4_1, Q5_1, at f16 precision as ggml's `block_q8_1`),
/// and `sum = Σ qs` exactly (the repacked Q4_0/Q5_0 subtract their offset in integers).
/// Our own layout: it never leaves memory.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8x32 {
    pub d: f32,
    pub s: f32,
    pub sum: i32,
    pub qs: [i8; 32],
}

/// 256 activations quantized to 8 bits (ggml's `block_q8_K`): `x[i] ≈ d * qs[i]`,
/// `bsums[j]` the sum of `qs[16j..16j+16]` (the K-quants' minimums and Q6_K's offset need
/// it), and `bsums32` the sums of the 32-value sub-blocks `B_s = bsums[2s] + bsums[2s+1]`
/// in the order `B0 B1 B4 B5 B2 B3 B6 B7` (what the packed Q4_K/Q5_K minimums take, four
/// at a time, without a horizontal add).
///
/// 8-byte aligned with `qs` first, so that every eight activations the packed kernels
/// broadcast, and every four sums, are one aligned 64-bit load (`x4::x86::bcast_qs`): at
/// offset 4 (ggml's order, `d` first) one such load in sixteen crossed a cache line.
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8K {
    pub qs: [i8; 256],
    pub bsums: [i16; 16],
    pub bsums32: [i16; 8],
    pub d: f32,
}

/// The sub-blocks whose sums `BlockQ8K::bsums32` holds, in its order (the packed Q4_K/Q5_K
/// minimums are stored in the same order).
pub(super) const BSUMS32_ORDER: [usize; 8] = [0, 1, 4, 5, 2, 3, 6, 7];

impl BlockQ8K {
    /// An all-zero block.
    pub const ZERO: Self = Self { qs: [0; 256], bsums: [0; 16], bsums32: [0; 8], d: 0.0 };

    /// `bsums` and `bsums32` from `qs`.
    pub fn fill_sums(&mut self) {
        for (sum, qs) in self.bsums.iter_mut().zip(self.qs.chunks_exact(16)) {
            // At most 16·128 in magnitude.
            *sum = qs.iter().map(|&q| q as i16).sum();
        }
        for (i, s) in BSUMS32_ORDER.into_iter().enumerate() {
            // At most 32·128.
            self.bsums32[i] = self.bsums[2 * s] + self.bsums[2 * s + 1];
        }
    }
}

/// A weight matrix of `rows` outputs by `cols` inputs, each row stored contiguously in its
/// block format (the GGUF layout, `ne0 = cols`), except that Q4_K, Q5_K, Q6_K, Q4_0, Q4_1,
/// Q5_0, Q5_1 and Q8_0 rows are repacked at load four at a time (`q4k_x4`, `q6k_x4`, `legacy_x4`): the first
/// `packed_rows` rows are interleaved groups, the rest (fewer than four) stay in the GGUF
/// layout after them.
pub struct QMatrix {
    ty: WeightType,
    rows: usize,
    cols: usize,
    /// Rows held in packed groups (a multiple of 4; 0 when not repacked).
    packed_rows: usize,
    /// Raw blocks, or for F32 unused (empty).
    bytes: Vec<u8>,
    /// F32 weights.
    floats: Vec<f32>,
}

/// Why a matrix could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error("a {ty:?} row must have a multiple of {block} values, not {cols}")]
    RaggedRow { ty: WeightType, block: usize, cols: usize },
    #[error("{ty:?} matrix of {rows}x{cols} needs {expected} bytes, got {got}")]
    WrongSize { ty: WeightType, rows: usize, cols: usize, expected: usize, got: usize },
}

impl QMatrix {
    /// Take the raw blocks of a `rows × cols` matrix (as stored in GGUF), repacked where the
    /// kernels have a faster layout (four rows interleaved; the GGUF bytes are dropped, so
    /// the weights are held once).
    pub fn from_bytes(
        ty: WeightType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<QMatrix, KernelError> {
        let stored = QMatrix::from_bytes_as_stored(ty, rows, cols, bytes)?;
        Ok(if packed_block_bytes(ty).is_some() { stored.repacked() } else { stored })
    }

    /// The packed form: groups of four rows, the last `rows % 4` kept as they are.
    fn repacked(self) -> QMatrix {
        let row_len = self.ty.row_bytes(self.cols);
        let packed_rows = self.rows / 4 * 4;
        let group_len = self.group_len();
        let mut bytes =
            weight_buffer(packed_rows / 4 * group_len + (self.rows - packed_rows) * row_len);
        let (groups, tail) = bytes.split_at_mut(packed_rows / 4 * group_len);
        for (g, out) in groups.chunks_exact_mut(group_len).enumerate() {
            let row = |i: usize| &self.bytes[(4 * g + i) * row_len..(4 * g + i + 1) * row_len];
            let rows = [row(0), row(1), row(2), row(3)];
            match self.ty {
                WeightType::Q4K | WeightType::Q5K => q4k_x4::pack(self.ty, rows, out),
                WeightType::Q6K => q6k_x4::pack(rows, out),
                ty => legacy_x4::pack(ty, rows, out),
            }
        }
        tail.copy_from_slice(&self.bytes[packed_rows * row_len..]);
        QMatrix { packed_rows, bytes, ..self }
    }

    /// As `from_bytes`, but kept in the GGUF layout (the comparisons of the two layouts).
    pub fn from_bytes_as_stored(
        ty: WeightType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<QMatrix, KernelError> {
        if ty == WeightType::F32 {
            let expected = rows * cols * 4;
            if bytes.len() != expected {
                return Err(KernelError::WrongSize { ty, rows, cols, expected, got: bytes.len() });
            }
            let floats =
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            return Ok(QMatrix::from_f32(rows, cols, floats.collect()));
        }
        if !cols.is_multiple_of(ty.block_len()) {
            return Err(KernelError::RaggedRow { ty, block: ty.block_len(), cols });
        }
        let expected = rows * ty.row_bytes(cols);
        if bytes.len() != expected {
            return Err(KernelError::WrongSize { ty, rows, cols, expected, got: bytes.len() });
        }
        Ok(QMatrix { ty, rows, cols, packed_rows: 0, bytes, floats: Vec::new() })
    }

    /// An f32 matrix (`floats.len() == rows * cols`).
    pub fn from_f32(rows: usize, cols: usize, floats: Vec<f32>) -> QMatrix {
        assert_eq!(floats.len(), rows * cols, "f32 matrix size");
        QMatrix { ty: WeightType::F32, rows, cols, packed_rows: 0, bytes: Vec::new(), floats }
    }

    pub fn ty(&self) -> WeightType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes the weights occupy.
    pub fn size_bytes(&self) -> usize {
        self.bytes.len() + self.floats.len() * 4
    }

    /// Whether rows are held in packed groups (see `packed_rows`).
    pub fn is_repacked(&self) -> bool {
        self.packed_rows > 0
    }

    /// Whether the packed groups read activations in `q4k_x4`'s paired order.
    fn reads_paired(&self) -> bool {
        self.is_repacked() && matches!(self.ty, WeightType::Q4K | WeightType::Q5K)
    }

    /// The bytes of a row kept in the GGUF layout (`row ≥ packed_rows`).
    fn row_bytes(&self, row: usize) -> &[u8] {
        assert!(row >= self.packed_rows, "row {row} is in a packed group");
        let len = self.ty.row_bytes(self.cols);
        let groups =
            if self.packed_rows == 0 { 0 } else { self.packed_rows / 4 * self.group_len() };
        let at = groups + (row - self.packed_rows) * len;
        &self.bytes[at..at + len]
    }

    /// Bytes of one packed group of four rows.
    fn group_len(&self) -> usize {
        let block = packed_block_bytes(self.ty).expect("a format with a packed layout");
        self.cols / self.ty.block_len() * block
    }

    /// The packed group holding rows `4g..4g + 4`.
    fn group_bytes(&self, g: usize) -> &[u8] {
        self.groups_bytes(g, g + 1)
    }

    /// Packed groups `g0..g1`, one after the other.
    fn groups_bytes(&self, g0: usize, g1: usize) -> &[u8] {
        let len = self.group_len();
        &self.bytes[g0 * len..g1 * len]
    }

    fn row_floats(&self, row: usize) -> &[f32] {
        &self.floats[row * self.cols..(row + 1) * self.cols]
    }

    /// Write row `row` as f32 into `out` (`cols` values): the embedding lookup, and the
    /// tests' reference.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "dequantize_row width");
        if row < self.packed_rows {
            let group = self.group_bytes(row / 4);
            return match self.ty {
                WeightType::Q4K | WeightType::Q5K => {
                    q4k_x4::dequantize_row(self.ty, group, row % 4, out)
                }
                WeightType::Q6K => q6k_x4::dequantize_row(group, row % 4, out),
                ty => legacy_x4::dequantize_row(ty, group, row % 4, out),
            };
        }
        match self.ty {
            WeightType::F32 => out.copy_from_slice(self.row_floats(row)),
            WeightType::Q4_0
            | WeightType::Q4_1
            | WeightType::Q5_0
            | WeightType::Q5_1
            | WeightType::Q8_0 => legacy::dequantize_row(self.ty, self.row_bytes(row), out),
            WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => {
                kquants::dequantize_row(self.ty, self.row_bytes(row), out)
            }
        }
    }

    /// Dot products of row `row` with each activation row in `acts` (1 to `MAX_TOKENS_PER_DOT`
    /// of them, all of this matrix's `act_kind`), into `out[j]`.
    fn dot_row(&self, isa: Isa, row: usize, acts: ActRows<'_>, out: &mut [f32]) {
        match acts {
            ActRows::F32(a) => legacy::dot_f32(isa, self.row_floats(row), a, out),
            ActRows::Q8x32(a) => {
                let w = self.row_bytes(row);
                match self.ty {
                    WeightType::Q4_0 => legacy::dot_q4_0(isa, w, a, out),
                    WeightType::Q4_1 => legacy::dot_q4_1(isa, w, a, out),
                    WeightType::Q5_0 => legacy::dot_q5_0(isa, w, a, out),
                    WeightType::Q5_1 => legacy::dot_q5_1(isa, w, a, out),
                    WeightType::Q8_0 => legacy::dot_q8_0(isa, w, a, out),
                    other => unreachable!("{other:?} does not read Q8x32 activations"),
                }
            }
            ActRows::Q8K(a) => {
                let w = self.row_bytes(row);
                match self.ty {
                    WeightType::Q4K => kquants::dot_q4k(isa, w, a, out),
                    WeightType::Q5K => kquants::dot_q5k(isa, w, a, out),
                    WeightType::Q6K => kquants::dot_q6k(isa, w, a, out),
                    other => unreachable!("{other:?} does not read Q8K activations"),
                }
            }
        }
    }
}

/// Bytes of one packed block (four rows' blocks) of the formats the kernels repack at load.
fn packed_block_bytes(ty: WeightType) -> Option<usize> {
    match ty {
        WeightType::Q4K => Some(q4k_x4::BLOCK_BYTES),
        WeightType::Q5K => Some(q4k_x4::Q5K_BLOCK_BYTES),
        WeightType::Q6K => Some(q6k_x4::BLOCK_BYTES),
        WeightType::Q4_0
        | WeightType::Q4_1
        | WeightType::Q5_0
        | WeightType::Q5_1
        | WeightType::Q8_0 => Some(legacy_x4::block_bytes(ty)),
        WeightType::F32 => None,
    }
}

/// At most this many tokens share one pass over a weight row (the GEMM micro-kernel's width).
pub const MAX_TOKENS_PER_DOT: usize = 4;

/// Up to `MAX_TOKENS_PER_DOT` activation rows in one form.
#[derive(Clone, Copy)]
enum ActRows<'a> {
    F32(&'a [&'a [f32]]),
    Q8x32(&'a [&'a [BlockQ8x32]]),
    Q8K(&'a [&'a [BlockQ8K]]),
}

/// A zeroed buffer for weights that every decode step streams through once, its 2 MiB-aligned
/// interior asked (on Linux) to be backed by huge pages before anything is written to it:
/// transparent huge pages in `madvise` mode, the usual default, come only on request. Why:
/// with 4 KiB pages a step over a 2.5 GB model crosses some 600,000 pages, each a TLB miss,
/// and the hardware prefetchers stop at every page boundary. Measured on the 2-core AMD EPYC
/// (AVX2), the same packed Q4_K product over the same 58 MB of weights, 4 KiB against huge
/// pages in one process: 1.075–1.095× at one token (memory-bound decode), 1.0–1.02× at four.
fn weight_buffer(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    // Advice only: where it is refused (a kernel without transparent huge pages) the
    // buffer works the same on small pages.
    let _ = advise_huge_pages(&mut bytes);
    bytes
}

/// The 2 MiB-aligned part of `len` bytes at `addr`, as (start, length), if there is one.
fn huge_page_range(addr: usize, len: usize) -> Option<(usize, usize)> {
    const HUGE: usize = 2 << 20;
    let start = addr.checked_next_multiple_of(HUGE)?;
    let end = (addr + len) / HUGE * HUGE;
    (end > start).then(|| (start, end - start))
}

/// `madvise(MADV_HUGEPAGE)` over `bytes`' 2 MiB-aligned interior (nothing to do when it has
/// none, or off Linux).
fn advise_huge_pages(bytes: &mut [u8]) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if let Some((start, len)) = huge_page_range(bytes.as_mut_ptr() as usize, bytes.len()) {
        // SAFETY: the range lies inside `bytes`, which the caller holds mutably; the advice
        // changes how the pages are backed, never their contents.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let _ = bytes;
    Ok(())
}

/// The activations of one matrix product, in every form its weights need. Buffers keep
/// their capacity, so decode reuses them without allocating.
#[derive(Default)]
pub struct Acts {
    n_tokens: usize,
    cols: usize,
    f32s: Vec<f32>,
    q8x32: Vec<BlockQ8x32>,
    q8k: Vec<BlockQ8K>,
    /// `q8k` in the order the packed Q4_K/Q5_K kernels read (`q4k_x4::pair_acts`).
    q8k_paired: Vec<BlockQ8K>,
    /// `q8k` in the AMX tiles' order (`amx::pack_acts`), where the tiles run here and a
    /// packed Q4_K product has enough tokens for them.
    #[cfg(target_arch = "x86_64")]
    q8k_tiles: Vec<amx::Line>,
    /// Which of `f32s`, `q8x32`, `q8k`, `q8k_paired`, `q8k_tiles` hold this product's
    /// activations.
    has: [bool; 5],
}

impl Acts {
    pub fn new() -> Acts {
        Acts::default()
    }

    /// Take `x` (`n_tokens` rows of `cols`) in the forms the `weights` read.
    pub fn prepare(&mut self, x: &[f32], n_tokens: usize, cols: usize, weights: &[&QMatrix]) {
        assert_eq!(x.len(), n_tokens * cols, "activation size");
        self.n_tokens = n_tokens;
        self.cols = cols;
        self.has = [false; 5];
        for w in weights {
            assert_eq!(w.cols, cols, "matrix width vs activations");
            match w.ty.act_kind() {
                ActKind::F32 if !self.has[0] => {
                    self.f32s.clear();
                    self.f32s.extend_from_slice(x);
                    self.has[0] = true;
                }
                ActKind::Q8x32 if !self.has[1] => {
                    let blocks = n_tokens * cols / 32;
                    self.q8x32.resize(blocks, BlockQ8x32 { d: 0.0, s: 0.0, sum: 0, qs: [0; 32] });
                    legacy::quantize_q8x32(x, &mut self.q8x32);
                    self.has[1] = true;
                }
                ActKind::Q8K if !self.has[2] => {
                    let blocks = n_tokens * cols / 256;
                    self.q8k.resize(blocks, BlockQ8K::ZERO);
                    kquants::quantize_q8k(x, &mut self.q8k);
                    self.has[2] = true;
                }
                _ => {}
            }
            // After the arm above, so `q8k` is ready.
            if w.reads_paired() && !self.has[3] {
                q4k_x4::pair_acts(&self.q8k, &mut self.q8k_paired);
                self.has[3] = true;
            }
            // Where the tiles may run: this CPU has them and `ENGINE_ISA` does not rule them
            // out (`Isa::detect` answers the limit).
            #[cfg(target_arch = "x86_64")]
            if w.ty == WeightType::Q4K
                && w.is_repacked()
                && n_tokens >= AMX_MIN_TOKENS
                && !self.has[4]
                && Isa::detect() == Isa::Amx
            {
                amx::pack_acts(&self.q8k, n_tokens, cols / 256, &mut self.q8k_tiles);
                self.has[4] = true;
            }
        }
    }
}

/// One output of `matmul_many`: `out` holds `n_tokens` rows of `w.rows()` values.
pub struct Product<'a> {
    pub w: &'a QMatrix,
    pub out: &'a mut [f32],
}

/// Most products one `matmul_many` call takes (q/k/v is three).
pub const MAX_PRODUCTS: usize = 4;

/// `out[t][r] = Σ_c w[r][c] · x[t][c]` for every product, sharing one preparation of the
/// activations and one dispatch to the pool (q/k/v, gate/up run as one job). Allocates
/// nothing: tasks are numbered, and a task's matrix and rows are computed from its number.
pub fn matmul_many(pool: &ThreadPool, isa: Isa, acts: &Acts, products: &mut [Product<'_>]) {
    assert!(products.len() <= MAX_PRODUCTS, "at most {MAX_PRODUCTS} products per call");
    let n_tokens = acts.n_tokens;
    let n_products = products.len();
    let mut weights: [Option<&QMatrix>; MAX_PRODUCTS] = [None; MAX_PRODUCTS];
    let mut outs: [pool::SharedOut; MAX_PRODUCTS] = Default::default();
    for (m, p) in products.iter_mut().enumerate() {
        let idx = match p.w.ty.act_kind() {
            ActKind::F32 => 0,
            ActKind::Q8x32 => 1,
            ActKind::Q8K => 2,
        };
        assert!(acts.has[idx], "activations not prepared for {:?}", p.w.ty);
        assert!(!p.w.reads_paired() || acts.has[3], "paired activations not prepared");
        assert_eq!(p.w.cols, acts.cols, "matrix width vs activations");
        assert_eq!(p.out.len(), n_tokens * p.w.rows, "output size");
        weights[m] = Some(p.w);
        outs[m] = pool::SharedOut::new(p.out);
    }
    // Row chunks small enough to balance the threads, large enough that one task's
    // weights stream from memory without stalls between tasks.
    let rows = |m: usize| weights[m].map_or(0, |w| w.rows);
    let total_rows: usize = (0..n_products).map(rows).sum();
    // A multiple of 4, so that no task splits a packed group; of 16 for AMX, so that no
    // task splits a strip of tiles.
    let align = if isa == Isa::Amx { 16 } else { 4 };
    let chunk = total_rows.div_ceil(pool.threads() * 8).clamp(16, 512).next_multiple_of(align);
    let mut first_task = [0usize; MAX_PRODUCTS + 1];
    for m in 0..MAX_PRODUCTS {
        first_task[m + 1] = first_task[m] + rows(m).div_ceil(chunk);
    }
    let n_tasks = first_task[n_products];
    let run = |task: usize| {
        let m = (0..MAX_PRODUCTS).find(|&m| task < first_task[m + 1]).expect("task in range");
        let w = weights[m].expect("product present");
        let r0 = (task - first_task[m]) * chunk;
        let r1 = (r0 + chunk).min(w.rows);
        // Tasks cover disjoint row ranges of each output, so no two threads write the
        // same element (what `SharedOut::write` relies on).
        run_rows(isa, w, acts, r0, r1, &outs[m]);
    };
    pool.run(n_tasks, &run);
}

/// Single product: `matmul_many` with one matrix.
pub fn matmul(pool: &ThreadPool, isa: Isa, acts: &Acts, w: &QMatrix, out: &mut [f32]) {
    matmul_many(pool, isa, acts, &mut [Product { w, out }]);
}

/// Fewest tokens a product runs on AMX tiles with (below it the AVX-512 code is faster).
#[cfg(target_arch = "x86_64")]
const AMX_MIN_TOKENS: usize = 16;

/// Tokens per tile: the activations of one tile stay in L2 while a task's weight rows
/// stream past them.
const TOKEN_TILE: usize = 64;

fn run_rows(isa: Isa, w: &QMatrix, acts: &Acts, r0: usize, r1: usize, out: &pool::SharedOut) {
    let n_out = w.rows;
    let mut dots = [0f32; MAX_TOKENS_PER_DOT];
    let mut group_dots = [[0f32; q4k_x4::ROWS]; MAX_TOKENS_PER_DOT];
    // `r0` is a multiple of 4 (the row chunk is), so packed groups start at `r0`.
    let packed_end = w.packed_rows.clamp(r0, r1);
    // The first packed group the vector code below takes: strips of four groups go to AMX
    // tiles first where they run (same bits; see `amx`).
    let (mut g0, g1) = (r0 / 4, packed_end / 4);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Amx && w.ty == WeightType::Q4K && acts.has[4] && g1 - g0 >= amx::STRIP_ROWS / 4 {
        let strip_groups = amx::STRIP_ROWS / 4;
        let strips = (g1 - g0) / strip_groups;
        let first_row = 4 * g0;
        let groups = w.groups_bytes(g0, g0 + strips * strip_groups);
        let emit = |strip: usize, t: usize, rows: &[f32; amx::STRIP_ROWS]| {
            out.write_run(t * n_out + first_row + amx::STRIP_ROWS * strip, rows);
        };
        let tiles = &acts.q8k_tiles;
        if amx::q4k_strips(groups, w.group_len(), &acts.q8k, tiles, acts.n_tokens, emit) {
            g0 += strips * strip_groups;
        }
    }
    let mut tile_start = 0;
    while tile_start < acts.n_tokens {
        let tile_end = (tile_start + TOKEN_TILE).min(acts.n_tokens);
        let tile = tile_end - tile_start;
        // Group `g` of the range is rows `4(g0 + g)..`; token `t` of the tile is
        // `tile_start + t`.
        let emit = |g: usize, t: usize, rows: &[[f32; q4k_x4::ROWS]]| {
            for (j, values) in rows.iter().enumerate() {
                for (i, value) in values.iter().enumerate() {
                    out.write((tile_start + t + j) * n_out + 4 * (g0 + g) + i, *value);
                }
            }
        };
        match w.ty {
            _ if g0 == g1 => {}
            WeightType::Q6K => {
                let rows: [_; TOKEN_TILE] = token_rows(&acts.q8k, acts.cols / 256, tile_start);
                q6k_x4::dot_groups(isa, w.groups_bytes(g0, g1), &rows[..tile], emit);
            }
            WeightType::Q4K | WeightType::Q5K => {
                let rows: [_; TOKEN_TILE] =
                    token_rows(&acts.q8k_paired, acts.cols / 256, tile_start);
                q4k_x4::dot_groups(w.ty, isa, w.groups_bytes(g0, g1), &rows[..tile], emit);
            }
            ty => {
                for g in g0..g1 {
                    let mut t = tile_start;
                    while t < tile_end {
                        let group = (tile_end - t).min(MAX_TOKENS_PER_DOT);
                        let rows: [_; MAX_TOKENS_PER_DOT] =
                            token_rows(&acts.q8x32, acts.cols / 32, t);
                        legacy_x4::dot(ty, isa, w.group_bytes(g), &rows[..group], &mut group_dots);
                        emit(g - g0, t - tile_start, &group_dots[..group]);
                        t += group;
                    }
                }
            }
        }
        for r in packed_end..r1 {
            let mut t = tile_start;
            while t < tile_end {
                let group = (tile_end - t).min(MAX_TOKENS_PER_DOT);
                with_act_rows(w.ty.act_kind(), acts, t, group, |rows| {
                    w.dot_row(isa, r, rows, &mut dots[..group]);
                });
                for (j, value) in dots[..group].iter().enumerate() {
                    out.write((t + j) * n_out + r, *value);
                }
                t += group;
            }
        }
        tile_start = tile_end;
    }
}

/// Borrow `count` consecutive token rows of the activations in `kind`'s form.
fn with_act_rows(
    kind: ActKind,
    acts: &Acts,
    first: usize,
    count: usize,
    f: impl FnOnce(ActRows<'_>),
) {
    match kind {
        ActKind::F32 => f(ActRows::F32(
            &token_rows::<_, MAX_TOKENS_PER_DOT>(&acts.f32s, acts.cols, first)[..count],
        )),
        ActKind::Q8x32 => f(ActRows::Q8x32(
            &token_rows::<_, MAX_TOKENS_PER_DOT>(&acts.q8x32, acts.cols / 32, first)[..count],
        )),
        ActKind::Q8K => f(ActRows::Q8K(
            &token_rows::<_, MAX_TOKENS_PER_DOT>(&acts.q8k, acts.cols / 256, first)[..count],
        )),
    }
}

/// `N` rows of `per_token` items from token `first` on; slots past the last token repeat it
/// (the caller uses only the rows that exist).
fn token_rows<T, const N: usize>(data: &[T], per_token: usize, first: usize) -> [&[T]; N] {
    let last = data.len() / per_token - 1;
    std::array::from_fn(|j| {
        let t = (first + j).min(last);
        &data[t * per_token..(t + 1) * per_token]
    })
}

/// Decode an IEEE half (GGUF block scales) to f32.
#[inline(always)]
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Encode an f32 as an IEEE half (round to nearest even).
#[inline(always)]
pub(crate) fn f32_to_f16(value: f32) -> u16 {
    half::f16::from_f32(value).to_bits()
}

#[cfg(test)]
mod tests {
    use super::testing::{random_blocks, Rng};
    use super::*;

    /// Random bytes that form valid blocks: every f16 scale field set to a small finite
    /// value (random bytes there could be NaN or huge), everything else random.
    fn random_matrix(ty: WeightType, rows: usize, cols: usize, rng: &mut Rng) -> QMatrix {
        if ty == WeightType::F32 {
            return QMatrix::from_f32(rows, cols, rng.vec(rows * cols, 1.0));
        }
        let bytes = random_blocks(ty, rows, cols, rng);
        QMatrix::from_bytes(ty, rows, cols, bytes).expect("valid random matrix")
    }

    /// The huge-page advice covers exactly the 2 MiB-aligned interior of a buffer, and the
    /// kernel takes it for a weight buffer wherever transparent huge pages exist.
    #[test]
    fn weight_buffers_ask_for_huge_pages_over_their_aligned_interior() {
        const M: usize = 2 << 20;
        assert_eq!(huge_page_range(M, 3 * M), Some((M, 3 * M)));
        assert_eq!(huge_page_range(M + 1, 3 * M), Some((2 * M, 2 * M)));
        assert_eq!(huge_page_range(M - 1, 2 * M), Some((M, M)));
        assert_eq!(huge_page_range(M + 1, 2 * M - 2), None, "no whole huge page inside");
        assert_eq!(huge_page_range(7, 100), None);
        let mut bytes = vec![0u8; 5 * M];
        let advised = advise_huge_pages(&mut bytes);
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled");
        if cfg!(target_os = "linux") && thp.exists() {
            advised.expect("madvise(MADV_HUGEPAGE) on a kernel with transparent huge pages");
            eprintln!("huge-page advice taken ({})", std::fs::read_to_string(thp).unwrap().trim());
        } else {
            eprintln!("no transparent huge pages here: the advice is {advised:?}");
        }
    }

    /// A Q4_K matrix repacked at load computes what the GGUF layout computes: the same bits
    /// on the portable path (same arithmetic order), float summation order on the SIMD
    /// paths; groups of four rows plus a ragged tail, 1 to 9 tokens, 1 and 3 threads.
    #[test]
    fn repacked_q4k_matches_the_stored_layout() {
        let mut rng = Rng(0x3c6e_f372_fe94_f82b);
        let cols = 512;
        for rows in [4, 23, 132] {
            let bytes = random_blocks(WeightType::Q4K, rows, cols, &mut rng);
            let packed = QMatrix::from_bytes(WeightType::Q4K, rows, cols, bytes.clone()).unwrap();
            let stored = QMatrix::from_bytes_as_stored(WeightType::Q4K, rows, cols, bytes).unwrap();
            assert!(packed.is_repacked() && !stored.is_repacked());
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            for r in 0..rows {
                packed.dequantize_row(r, &mut a);
                stored.dequantize_row(r, &mut b);
                assert_eq!(a, b, "{rows} rows: row {r} dequantized");
            }
            for n_tokens in [1, 4, 9] {
                let x = rng.vec(n_tokens * cols, 3.0);
                let mut acts = Acts::new();
                acts.prepare(&x, n_tokens, cols, &[&packed]);
                for threads in [1, 3] {
                    let pool = ThreadPool::new(threads);
                    for isa in Isa::available() {
                        let mut got = vec![f32::NAN; n_tokens * rows];
                        let mut want = vec![f32::NAN; n_tokens * rows];
                        matmul(&pool, isa, &acts, &packed, &mut got);
                        matmul(&pool, isa, &acts, &stored, &mut want);
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            if isa == Isa::Portable {
                                assert_eq!(g.to_bits(), w.to_bits(), "{rows}x{n_tokens} [{i}]");
                            } else {
                                assert!(
                                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                                    "{isa:?} {rows} rows T={n_tokens} x{threads} [{i}]: {g} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
        eprintln!("repacked Q4_K checked on: {:?}", Isa::available());
    }

    const TYPES: [WeightType; 9] = [
        WeightType::F32,
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q5_0,
        WeightType::Q5_1,
        WeightType::Q8_0,
        WeightType::Q4K,
        WeightType::Q5K,
        WeightType::Q6K,
    ];

    /// The whole product path (activation quantization, tiles, thread split, each ISA)
    /// against dequantize-then-f32-matmul, on shapes that do not divide the tiles: row
    /// counts that are not multiples of the row chunk, 1 to 67 tokens, odd thread counts.
    #[test]
    fn matmul_matches_dequantized_f32_matmul_for_every_format() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for ty in TYPES {
            let cols = if ty.block_len() == 256 { 512 } else { 96 };
            for (rows, n_tokens) in [(1, 1), (37, 1), (19, 5), (130, 67)] {
                let w = random_matrix(ty, rows, cols, &mut rng);
                let mut dense = vec![0f32; rows * cols];
                for (r, row) in dense.chunks_exact_mut(cols).enumerate() {
                    w.dequantize_row(r, row);
                }
                let x: Vec<f32> = (0..n_tokens * cols)
                    .map(|i| ((i * 7919 % 1009) as f32 / 504.5 - 1.0) * (1.0 + (i % 5) as f32))
                    .collect();
                let mut expected = vec![0f64; n_tokens * rows];
                let mut magnitude = vec![0f64; n_tokens * rows];
                for t in 0..n_tokens {
                    for r in 0..rows {
                        for c in 0..cols {
                            let p = dense[r * cols + c] as f64 * x[t * cols + c] as f64;
                            expected[t * rows + r] += p;
                            magnitude[t * rows + r] += p.abs();
                        }
                    }
                }
                let mut acts = Acts::new();
                acts.prepare(&x, n_tokens, cols, &[&w]);
                for threads in [1, 3] {
                    let pool = ThreadPool::new(threads);
                    for isa in Isa::available() {
                        let mut out = vec![f32::NAN; n_tokens * rows];
                        matmul(&pool, isa, &acts, &w, &mut out);
                        for (i, got) in out.iter().enumerate() {
                            // 8-bit activations: ≤ 1% of Σ|w·x| (typically far less); f32
                            // weights see the activations as they are.
                            let tol = if ty == WeightType::F32 { 1e-5 } else { 1e-2 };
                            let err = (*got as f64 - expected[i]).abs();
                            assert!(
                                err <= tol * magnitude[i] + 1e-6,
                                "{ty:?} {rows}x{cols} T={n_tokens} {isa:?} x{threads}: \
                                 [{i}] {got} vs {}",
                                expected[i]
                            );
                        }
                    }
                }
            }
        }
    }

    /// A token's row is the same bits whether it is multiplied alone or with up to
    /// `MAX_TOKENS_PER_DOT - 1` others (the engine's batched decode and chunked prefill
    /// rely on it), on every ISA and weight type.
    #[test]
    fn a_row_does_not_depend_on_the_tokens_beside_it() {
        let mut rng = Rng(0x6a09_e667_f3bc_c908);
        let pool = ThreadPool::new(2);
        for ty in TYPES {
            // An odd number of blocks per row, and a full group of tokens plus a ragged one.
            let cols = if ty.block_len() == 256 { 256 * 3 } else { 32 * 25 };
            let (rows, n_tokens) = (19, 7);
            let w = random_matrix(ty, rows, cols, &mut rng);
            let x = rng.vec(n_tokens * cols, 1.0);
            let mut acts = Acts::new();
            acts.prepare(&x, n_tokens, cols, &[&w]);
            for isa in Isa::available() {
                let mut together = vec![f32::NAN; n_tokens * rows];
                matmul(&pool, isa, &acts, &w, &mut together);
                for t in 0..n_tokens {
                    let mut one = Acts::new();
                    one.prepare(&x[t * cols..(t + 1) * cols], 1, cols, &[&w]);
                    let mut alone = vec![f32::NAN; rows];
                    matmul(&pool, isa, &one, &w, &mut alone);
                    assert_eq!(
                        &together[t * rows..(t + 1) * rows],
                        &alone[..],
                        "{ty:?} {isa:?} {t}"
                    );
                }
            }
        }
    }

    /// Every ISA computes the same thing: the SIMD paths agree with the portable one to
    /// float summation order.
    #[test]
    fn isas_agree_with_the_portable_kernels() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let pool = ThreadPool::new(2);
        for ty in TYPES {
            let cols = 1024;
            let (rows, n_tokens) = (33, 6);
            let w = random_matrix(ty, rows, cols, &mut rng);
            let x: Vec<f32> =
                (0..n_tokens * cols).map(|i| ((i * 31 % 97) as f32 - 48.0) / 17.0).collect();
            let mut acts = Acts::new();
            acts.prepare(&x, n_tokens, cols, &[&w]);
            let mut reference = vec![0f32; n_tokens * rows];
            matmul(&pool, Isa::Portable, &acts, &w, &mut reference);
            for isa in Isa::available() {
                let mut out = vec![0f32; n_tokens * rows];
                matmul(&pool, isa, &acts, &w, &mut out);
                for (a, b) in out.iter().zip(&reference) {
                    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{ty:?} {isa:?}: {a} vs {b}");
                }
            }
        }
    }

    /// candle's `QMatMul` (the same ggml block formats and activation quantization, an
    /// independent implementation) gives the same products up to float summation order.
    #[test]
    fn matmul_agrees_with_candle_qmatmul() {
        use candle_core::quantized::QMatMul;
        use candle_core::{Device, Module, Tensor};
        let mut rng = Rng(0x51_7cc1_b727_220a);
        let pool = ThreadPool::new(2);
        for ty in TYPES.into_iter().filter(|&t| t != WeightType::F32) {
            let (rows, cols) = (45, 768);
            let bytes = random_blocks(ty, rows, cols, &mut rng);
            let qtensor = testing::candle_qtensor(ty, &bytes, rows, cols);
            let w = QMatrix::from_bytes(ty, rows, cols, bytes).expect("matrix");
            let qmm = QMatMul::from_qtensor(qtensor).expect("QMatMul");
            for n_tokens in [1, 2, 3, 4, 5, 9] {
                let x: Vec<f32> =
                    (0..n_tokens * cols).map(|i| (i * 7919 % 1013) as f32 / 506.5 - 1.0).collect();
                let input = Tensor::from_vec(x.clone(), (n_tokens, cols), &Device::Cpu).unwrap();
                let expected: Vec<f32> =
                    qmm.forward(&input).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let mut acts = Acts::new();
                acts.prepare(&x, n_tokens, cols, &[&w]);
                let mut out = vec![0f32; n_tokens * rows];
                matmul(&pool, Isa::detect(), &acts, &w, &mut out);
                let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * scale,
                        "{ty:?} T={n_tokens} [{i}]: ours {a}, candle {b}"
                    );
                }
            }
        }
    }

    /// A token's row of a batched product equals the product of that token alone (to float
    /// summation order): what makes a prefill and decode steps agree.
    #[test]
    fn batched_rows_equal_single_token_products() {
        let mut rng = Rng(0x0dd_ba11_cafe_f00d);
        for ty in TYPES {
            let cols = if ty.block_len() == 256 { 256 } else { 128 };
            let rows = 70;
            let w = random_matrix(ty, rows, cols, &mut rng);
            for threads in [1, 2] {
                let pool = ThreadPool::new(threads);
                for n_tokens in [2, 3, 4, 5, 7, 9, 67] {
                    let x: Vec<f32> = (0..n_tokens * cols)
                        .map(|i| ((i * 7919 % 1013) as f32 / 506.5 - 1.0) * 3.0)
                        .collect();
                    let mut acts = Acts::new();
                    acts.prepare(&x, n_tokens, cols, &[&w]);
                    let mut batched = vec![0f32; n_tokens * rows];
                    matmul(&pool, Isa::detect(), &acts, &w, &mut batched);
                    for t in 0..n_tokens {
                        let mut one = Acts::new();
                        one.prepare(&x[t * cols..(t + 1) * cols], 1, cols, &[&w]);
                        let mut single = vec![0f32; rows];
                        matmul(&pool, Isa::detect(), &one, &w, &mut single);
                        let scale = single.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                        for r in 0..rows {
                            let (a, b) = (batched[t * rows + r], single[r]);
                            assert!(
                                (a - b).abs() <= 1e-5 * scale,
                                "{ty:?} T={n_tokens} x{threads} token {t} row {r}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matrices_of_the_wrong_size_are_refused() {
        assert_eq!(
            QMatrix::from_bytes(WeightType::Q4K, 2, 100, vec![0; 288]).err(),
            Some(KernelError::RaggedRow { ty: WeightType::Q4K, block: 256, cols: 100 })
        );
        assert!(matches!(
            QMatrix::from_bytes(WeightType::Q8_0, 2, 64, vec![0; 135]),
            Err(KernelError::WrongSize { expected: 136, got: 135, .. })
        ));
    }
}
