//! The 32-value block formats (Q4_0, Q4_1, Q5_0, Q8_0) against `BlockQ8x32` activations,
//! and f32 weights against f32 activations. (Stub: being written.)

use super::{BlockQ8x32, Isa, WeightType};

/// Quantize `x` (a whole number of 32-value blocks, any number of rows) into `out`.
pub(super) fn quantize_q8x32(x: &[f32], out: &mut [BlockQ8x32]) {
    let _ = (x, out);
    unimplemented!("quantize_q8x32")
}

pub(super) fn dequantize_row(ty: WeightType, w: &[u8], out: &mut [f32]) {
    let _ = (ty, w, out);
    unimplemented!("legacy dequantize_row")
}

pub(super) fn dot_f32(isa: Isa, w: &[f32], acts: &[&[f32]], out: &mut [f32]) {
    let _ = (isa, w, acts, out);
    unimplemented!("dot_f32")
}

pub(super) fn dot_q4_0(isa: Isa, w: &[u8], acts: &[&[BlockQ8x32]], out: &mut [f32]) {
    let _ = (isa, w, acts, out);
    unimplemented!("dot_q4_0")
}

pub(super) fn dot_q4_1(isa: Isa, w: &[u8], acts: &[&[BlockQ8x32]], out: &mut [f32]) {
    let _ = (isa, w, acts, out);
    unimplemented!("dot_q4_1")
}

pub(super) fn dot_q5_0(isa: Isa, w: &[u8], acts: &[&[BlockQ8x32]], out: &mut [f32]) {
    let _ = (isa, w, acts, out);
    unimplemented!("dot_q5_0")
}

pub(super) fn dot_q8_0(isa: Isa, w: &[u8], acts: &[&[BlockQ8x32]], out: &mut [f32]) {
    let _ = (isa, w, acts, out);
    unimplemented!("dot_q8_0")
}
