//! Throughput of our quantized matrix products against candle's `QMatMul` on the same
//! weights, in one run: a decode-shaped product (one token; memory-bound, GB/s of weights
//! read), the shape of four parallel streams' decode step (4 tokens) and a prefill-shaped
//! one (64 tokens), both in G multiply-adds per second, for every format
//! with a kernel, on a Qwen3-4B FFN-sized matrix (9728 × 2560), on every instruction set the
//! CPU has (each line names it); the formats the engine repacks at load are marked `/x4`,
//! and the K-quants are also timed in the GGUF row layout. Threads: `KERNEL_THREADS` (default
//! 2); `KERNEL_FORMATS=Q4K,Q6K` times only those formats. Run with
//! `cargo bench --bench kernels`; prints medians and ratios.

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
    let (rows, cols) = (9728, 2560);
    let isas = Isa::available();
    let names: Vec<&str> = isas.iter().map(|i| i.name()).collect();
    println!("{rows}x{cols} weights, {threads} threads, our kernels on every ISA here: {names:?}");
    println!(
        "{:<9} {:<12} {:>10} {:>8} {:>7} {:>11} {:>8} {:>7} {:>12} {:>8} {:>7}",
        "format",
        "isa",
        "T=1 GB/s",
        "candle",
        "ratio",
        "T=4 GMAC/s",
        "candle",
        "ratio",
        "T=64 GMAC/s",
        "candle",
        "ratio"
    );
    let values: Vec<f32> = (0..rows * cols)
        .map(|i: usize| ((i.wrapping_mul(2_654_435_761) >> 7) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("weights");
    use WeightType::*;
    // The K-quants twice: as the engine holds them (repacked four rows at a time, `/x4`)
    // and in the GGUF row layout, to show what the repacking is worth.
    let cases = [
        (Q4_0, false),
        (Q4_1, false),
        (Q5_0, false),
        (Q5_1, false),
        (Q8_0, false),
        (Q4K, false),
        (Q4K, true),
        (Q5K, false),
        (Q5K, true),
        (Q6K, false),
        (Q6K, true),
    ];
    // `KERNEL_FORMATS=Q4K,Q6K` times only those formats.
    let only: Option<Vec<String>> = std::env::var("KERNEL_FORMATS")
        .ok()
        .map(|v| v.split(',').map(|f| f.trim().to_string()).collect());
    for (ty, as_stored) in cases {
        if only.as_ref().is_some_and(|only| !only.contains(&format!("{ty:?}"))) {
            continue;
        }
        let dtype = ty.ggml_dtype();
        // The same blocks for both: candle quantizes, we take its bytes.
        let qtensor = QTensor::quantize(&dense, dtype).expect("quantize");
        let bytes = qtensor.data().expect("bytes").into_owned();
        let ours = if as_stored {
            QMatrix::from_bytes_as_stored(ty, rows, cols, bytes)
        } else {
            QMatrix::from_bytes(ty, rows, cols, bytes)
        }
        .expect("matrix");
        let theirs = QMatMul::from_qtensor(qtensor).expect("QMatMul");
        let shapes = [(1usize, 31), (4, 15), (64, 5)];
        let rate = |n_tokens: usize, d: Duration| {
            if n_tokens == 1 {
                ours.size_bytes() as f64 / d.as_secs_f64() / 1e9
            } else {
                (rows * cols * n_tokens) as f64 / d.as_secs_f64() / 1e9
            }
        };
        let inputs: Vec<Vec<f32>> = shapes
            .iter()
            .map(|&(n, _)| {
                (0..n * cols).map(|i| ((i * 7919) % 1013) as f32 / 506.5 - 1.0).collect()
            })
            .collect();
        let candle: Vec<f64> = shapes
            .iter()
            .zip(&inputs)
            .map(|(&(n_tokens, runs), x)| {
                let input = Tensor::from_vec(x.clone(), (n_tokens, cols), &Device::Cpu).unwrap();
                let d = median_of(runs, || {
                    black_box(theirs.forward(black_box(&input)).expect("forward"));
                });
                rate(n_tokens, d)
            })
            .collect();
        let packed = ours.is_repacked();
        let name = if packed { format!("{ty:?}/x4") } else { format!("{ty:?}") };
        for &isa in &isas {
            let mine: Vec<f64> = shapes
                .iter()
                .zip(&inputs)
                .map(|(&(n_tokens, runs), x)| {
                    let mut acts = Acts::new();
                    let mut out = vec![0f32; n_tokens * rows];
                    let d = median_of(runs, || {
                        acts.prepare(black_box(x), n_tokens, cols, &[&ours]);
                        kernels::matmul(&pool, isa, &acts, &ours, &mut out);
                        black_box(&out);
                    });
                    rate(n_tokens, d)
                })
                .collect();
            let cells: Vec<String> = (0..shapes.len())
                .map(|i| {
                    let width = [10, 11, 12][i];
                    format!(
                        "{:>width$.2} {:>8.2} {:>6.2}x",
                        mine[i],
                        candle[i],
                        mine[i] / candle[i]
                    )
                })
                .collect();
            println!("{name:<9} {:<12} {}", isa.name(), cells.join(" "));
        }
    }
}
