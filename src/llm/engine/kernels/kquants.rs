//! The 256-value K-quant formats (Q4_K, Q5_K, Q6_K) against `BlockQ8K` activations.
//! (Stub: being written.)

use super::{BlockQ8K, Isa, WeightType};

/// Quantize `x` (a whole number of 256-value blocks, any number of rows) into `out`.
pub(super) fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    let _ = (x, out);
    unimplemented!("quantize_q8k")
}

pub(super) fn dequantize_row(ty: WeightType, w: &[u8], out: &mut [f32]) {
    let _ = (ty, w, out);
    unimplemented!("kquants dequantize_row")
}

pub(super) fn dot_q4k(isa: Isa, w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
    let _ = (isa, w, acts, out);
    unimplemented!("dot_q4k")
}

pub(super) fn dot_q5k(isa: Isa, w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
    let _ = (isa, w, acts, out);
    unimplemented!("dot_q5k")
}

pub(super) fn dot_q6k(isa: Isa, w: &[u8], acts: &[&[BlockQ8K]], out: &mut [f32]) {
    let _ = (isa, w, acts, out);
    unimplemented!("dot_q6k")
}
