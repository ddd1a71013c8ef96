//! Throughput of our quantized matrix products against candle's `QMatMul` on the same
//! weights, in one run: a decode-shaped product (one token; memory-bound, GB/s of weights
//! read) and a prefill-shaped one (64 tokens; G multiply-adds per second), for every format
//! with a kernel, on a Qwen3-4B FFN-sized matrix (9728 × 2560). Threads: `KERNEL_THREADS`
//! (default 2). Run with `cargo bench --bench kernels`; prints medians and ratios.

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::median_of;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use my_claw::llm::engine::kernels::{self, Acts, Isa, QMatrix, ThreadPool, WeightType};

fn main() {
    let threads: usize =
        std::env::var("KERNEL_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    // candle sizes its pool from this on first use, which is below.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let pool = ThreadPool::new(threads);
    let isa = Isa::detect();
    let (rows, cols) = (9728, 2560);
    println!("{rows}x{cols} weights, {threads} threads, our kernels: {}", isa.name());
    println!(
        "{:<6} {:>12} {:>12} {:>7} {:>14} {:>14} {:>7}",
        "format", "T=1 GB/s", "candle", "ratio", "T=64 GMAC/s", "candle", "ratio"
    );
    let values: Vec<f32> = (0..rows * cols)
        .map(|i: usize| ((i.wrapping_mul(2_654_435_761) >> 7) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("weights");
    use WeightType::*;
    for ty in [Q4_0, Q4_1, Q5_0, Q8_0, Q4K, Q5K, Q6K] {
        let dtype = ty.ggml_dtype();
        // The same blocks for both: candle quantizes, we take its bytes.
        let qtensor = QTensor::quantize(&dense, dtype).expect("quantize");
        let bytes = qtensor.data().expect("bytes").into_owned();
        let ours = QMatrix::from_bytes(ty, rows, cols, bytes).expect("matrix");
        let theirs = QMatMul::from_qtensor(qtensor).expect("QMatMul");
        let mut cells = Vec::new();
        for (n_tokens, runs) in [(1usize, 31), (64, 5)] {
            let x: Vec<f32> =
                (0..n_tokens * cols).map(|i| ((i * 7919) % 1013) as f32 / 506.5 - 1.0).collect();
            let input = Tensor::from_vec(x.clone(), (n_tokens, cols), &Device::Cpu).unwrap();
            let mut acts = Acts::new();
            let mut out = vec![0f32; n_tokens * rows];
            let mine = median_of(runs, || {
                acts.prepare(black_box(&x), n_tokens, cols, &[&ours]);
                kernels::matmul(&pool, isa, &acts, &ours, &mut out);
                black_box(&out);
            });
            let candle = median_of(runs, || {
                black_box(theirs.forward(black_box(&input)).expect("forward"));
            });
            let rate = |d: Duration| {
                if n_tokens == 1 {
                    ours.size_bytes() as f64 / d.as_secs_f64() / 1e9
                } else {
                    (rows * cols * n_tokens) as f64 / d.as_secs_f64() / 1e9
                }
            };
            cells.push((rate(mine), rate(candle)));
        }
        let name = format!("{ty:?}");
        let [(d_ours, d_candle), (p_ours, p_candle)] = [cells[0], cells[1]];
        println!(
            "{name:<6} {d_ours:>12.2} {d_candle:>12.2} {:>6.2}x {p_ours:>14.2} {p_candle:>14.2} {:>6.2}x",
            d_ours / d_candle,
            p_ours / p_candle
        );
    }
}
