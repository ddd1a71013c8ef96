//! Test helpers shared by the kernel tests: deterministic random data, and candle tensors
//! over our raw blocks (candle is the independent implementation the kernels are checked
//! against).

use candle_core::quantized::{QStorage, QTensor};
use candle_core::Device;

use super::WeightType;

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
