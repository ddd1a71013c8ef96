//! Test helpers shared by the kernel tests: deterministic random data, and candle tensors
//! over our raw blocks (candle is the independent implementation the kernels are checked
//! against).

use candle_core::quantized::{QStorage, QTensor};
use candle_core::Device;

use super::{f32_to_f16, Isa, WeightType};

/// SplitMix64: deterministic test data without a dependency.
pub(super) struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-1, 1).
    pub fn signed(&mut self) -> f32 {
        2.0 * self.unit() - 1.0
    }

    pub fn bytes(&mut self, out: &mut [u8]) {
        out.iter_mut().for_each(|b| *b = self.next() as u8);
    }

    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.signed()).collect()
    }
}

/// candle's tensor over the raw blocks of a `rows × cols` matrix of `ty`.
pub(super) fn candle_qtensor(ty: WeightType, bytes: &[u8], rows: usize, cols: usize) -> QTensor {
    // candle views the bytes as its block structs (alignment up to 4): copy them into u32s.
    let words: Vec<u32> = bytes
        .chunks(4)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(b)
        })
        .collect();
    // SAFETY: `words` is a live allocation of at least `bytes.len()` initialised bytes; u8
    // needs no alignment; candle copies the view into its storage before `words` is dropped.
    let aligned = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), bytes.len()) };
    let storage =
        QStorage::from_data(std::borrow::Cow::Borrowed(aligned), &Device::Cpu, ty.ggml_dtype())
            .expect("candle storage");
    QTensor::new(storage, (rows, cols)).expect("candle tensor")
}

/// The 32-value block formats (`legacy`, `legacy_x4`).
pub(super) const LEGACY_TYPES: [WeightType; 5] =
    [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q5_0, WeightType::Q5_1, WeightType::Q8_0];

/// candle's dequantization of `rows × cols` raw blocks: an independent implementation.
pub(super) fn candle_dequantize(
    ty: WeightType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    let tensor = candle_qtensor(ty, bytes, rows, cols);
    tensor.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The GGUF bytes of a random `rows × cols` matrix of a block format: random quant bytes,
/// every f16 scale field set to a small finite value (random bytes there could be NaN or
/// huge).
pub(super) fn random_blocks(ty: WeightType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let mut bytes = vec![0u8; rows * ty.row_bytes(cols)];
    rng.bytes(&mut bytes);
    // Offsets of the f16 fields within a block.
    let scale_fields: &[usize] = match ty {
        WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => &[0],
        WeightType::Q4_1 | WeightType::Q5_1 | WeightType::Q4K | WeightType::Q5K => &[0, 2],
        WeightType::Q6K => &[208],
        WeightType::F32 => unreachable!(),
    };
    for block in bytes.chunks_exact_mut(ty.block_bytes()) {
        for &at in scale_fields {
            let value = (rng.unit() + 0.05) * 0.02 * rng.signed().signum();
            block[at..at + 2].copy_from_slice(&f32_to_f16(value).to_le_bytes());
        }
    }
    bytes
}

/// Four random rows of `nb` blocks of `ty`, GGUF layout (a packed group's input).
pub(super) fn random_rows(ty: WeightType, nb: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
    let bytes = random_blocks(ty, 4, nb * ty.block_len(), rng);
    bytes.chunks_exact(bytes.len() / 4).map(<[u8]>::to_vec).collect()
}

/// A packed four-row product against the row layout's portable one, for 1 to 4 tokens on
/// every instruction set here: the portable packed code must give the same bits, the SIMD
/// paths agree to float summation order, and on every path a token's results have the same
/// bits whether it is alone or shares the pass with others (what lets parallel streams
/// answer exactly as they would alone). `row_dot(r, nt, out)` is the row layout's portable
/// product of row `r` with the first `nt` activation rows, `packed_dot(isa, first, nt,
/// out)` the packed one with rows `first..first + nt`. The SIMD paths differ only in how
/// they add integers (exactly), so they must agree to the bit. Returns the instruction
/// sets that ran, and checks that AVX2, and the 512-bit path, did where the CPU has them.
pub(super) fn check_packed_dot(
    label: &str,
    row_dot: impl Fn(usize, usize, &mut [f32; 4]),
    packed_dot: impl Fn(Isa, usize, usize, &mut [[f32; 4]; 4]),
) -> Vec<&'static str> {
    let mut ran = Vec::new();
    for nt in 1..=4 {
        let mut want = [[0f32; 4]; 4];
        for r in 0..4 {
            let mut one = [0f32; 4];
            row_dot(r, nt, &mut one);
            for (w, value) in want.iter_mut().zip(one).take(nt) {
                w[r] = value;
            }
        }
        let mut simd_bits: Option<(Isa, [[f32; 4]; 4])> = None;
        for isa in Isa::available() {
            let mut got = [[f32::NAN; 4]; 4];
            packed_dot(isa, 0, nt, &mut got);
            if isa != Isa::Portable {
                match simd_bits {
                    None => simd_bits = Some((isa, got)),
                    Some((first, bits)) => {
                        for t in 0..nt {
                            for r in 0..4 {
                                assert_eq!(
                                    got[t][r].to_bits(),
                                    bits[t][r].to_bits(),
                                    "{label} T={nt} [{t}][{r}]: {isa:?} vs {first:?}"
                                );
                            }
                        }
                    }
                }
            }
            for t in 0..nt {
                let mut alone = [[f32::NAN; 4]; 4];
                packed_dot(isa, t, 1, &mut alone);
                for r in 0..4 {
                    let (g, w) = (got[t][r], want[t][r]);
                    let how = format!("{label} {isa:?} T={nt} [{t}][{r}]");
                    assert_eq!(g.to_bits(), alone[0][r].to_bits(), "{how}: with others vs alone");
                    if isa == Isa::Portable {
                        assert_eq!(g.to_bits(), w.to_bits(), "{how}");
                    } else {
                        assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{how}: {g} vs {w}");
                    }
                }
            }
            if !ran.contains(&isa.name()) {
                ran.push(isa.name());
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    assert!(
        !is_x86_feature_detected!("avx2") || ran.contains(&"avx2"),
        "{label}: AVX2 path not exercised"
    );
    #[cfg(target_arch = "x86_64")]
    assert!(
        !cpu_has_avx512_path() || ran.contains(&"avx512-vnni"),
        "{label}: 512-bit path not exercised"
    );
    ran
}

/// Whether the CPU has the four AVX-512 extensions the 512-bit path needs (F, BW, VL,
/// VNNI), read from the CPU itself rather than from `Isa::available`, which the tests
/// check against it.
#[cfg(target_arch = "x86_64")]
pub(super) fn cpu_has_avx512_path() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}
