//! Throughput of our quantized matrix products against candle's `QMatMul` on the same
//! weights, in one run: a decode-shaped product (one token; memory-bound, GB/s of weights
//! read) twice, with the matrix warm in the last-level cache (one matrix timed again and
//! again) and cold (copies of it, more than twice the L3, taken in turn: what a decode step
//! over a whole model sees), the shape of four parallel streams' decode step (4 tokens) and
//! a prefill-shaped one (64 tokens), both in G multiply-adds per second, for every format
//! with a kernel, on a Qwen3-4B FFN-sized matrix (9728 × 2560), on every instruction set the
//! CPU has (each line names it); the formats the engine repacks at load are marked `/x4`,
//! and the K-quants are also timed in the GGUF row layout. Threads: `KERNEL_THREADS` (default
//! 2); `KERNEL_FORMATS=Q4K,Q6K` times only those formats. Run with
//! `cargo bench --bench kernels`; prints medians and ratios.

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::median_of;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
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
    let l3 = last_level_cache_bytes();
    let isas = Isa::available();
    let names: Vec<&str> = isas.iter().map(|i| i.name()).collect();
    println!(
        "{rows}x{cols} weights, {threads} threads, our kernels on every ISA here: {names:?}; \
         cold: copies of the matrix over twice the {} MB L3",
        l3 >> 20
    );
    println!(
        "{:<9} {:<12} {:>10} {:>8} {:>7} {:>10} {:>8} {:>7} {:>11} {:>8} {:>7} {:>12} {:>8} {:>7}",
        "format",
        "isa",
        "T=1 GB/s",
        "candle",
        "ratio",
        "cold GB/s",
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
        // Enough copies for the cold column that the ones read since a copy's last turn
        // fill the L3 twice over.
        let copies = (2 * l3 / bytes.len() + 2).max(2);
        let matrix = |bytes: Vec<u8>| {
            if as_stored {
                QMatrix::from_bytes_as_stored(ty, rows, cols, bytes)
            } else {
                QMatrix::from_bytes(ty, rows, cols, bytes)
            }
            .expect("matrix")
        };
        let cold: Vec<QMatrix> = (0..copies).map(|_| matrix(bytes.clone())).collect();
        let cold_theirs: Vec<QMatMul> = (0..copies)
            .map(|_| {
                let t = qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &Device::Cpu);
                QMatMul::from_qtensor(t.expect("QTensor")).expect("QMatMul")
            })
            .collect();
        let ours = matrix(bytes);
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
        // Each call takes the next copy; runs of several turns through all of them.
        let cold_runs = 3 * copies + 1;
        let one = Tensor::from_vec(inputs[0].clone(), (1, cols), &Device::Cpu).unwrap();
        // One call on every copy first: candle may prepare a matrix on its first product.
        for t in &cold_theirs {
            black_box(t.forward(&one).expect("forward"));
        }
        let mut turn = 0;
        let candle_cold = rate(
            1,
            median_of(cold_runs, || {
                turn = (turn + 1) % copies;
                black_box(cold_theirs[turn].forward(black_box(&one)).expect("forward"));
            }),
        );
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
            let mut acts = Acts::new();
            let mut out = vec![0f32; rows];
            let mine_cold = rate(
                1,
                median_of(cold_runs, || {
                    turn = (turn + 1) % copies;
                    acts.prepare(black_box(&inputs[0]), 1, cols, &[&cold[turn]]);
                    kernels::matmul(&pool, isa, &acts, &cold[turn], &mut out);
                    black_box(&out);
                }),
            );
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
            let (mine, candle) = (
                [mine[0], mine_cold, mine[1], mine[2]],
                [candle[0], candle_cold, candle[1], candle[2]],
            );
            let cells: Vec<String> = [10, 10, 11, 12]
                .into_iter()
                .enumerate()
                .map(|(i, width)| {
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

/// The size of the last-level cache (Linux's sysfs), or 32 MB when it cannot be read.
fn last_level_cache_bytes() -> usize {
    let read = |index: u32| {
        let path = format!("/sys/devices/system/cpu/cpu0/cache/index{index}/size");
        let text = std::fs::read_to_string(path).ok()?;
        let text = text.trim();
        let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
        let n: usize = digits.parse().ok()?;
        Some(match unit {
            "K" => n << 10,
            "M" => n << 20,
            _ => n,
        })
    };
    (0..8).rev().find_map(read).unwrap_or(32 << 20)
}
