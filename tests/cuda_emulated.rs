//! Our own CUDA kernels on a machine without a GPU: the matrix-vector kernels
//! (`src/llm/engine/kernels/cuda_matvec.cuh`), the quantization that feeds them
//! (`cuda_common.cuh`), the one-pass RMSNorm (`cuda_norm.cuh`) and the decode step's glue
//! kernels (`cuda_decode.cu`, compiled whole), their own source compiled
//! by the host's C++ compiler under a CPU emulation of CUDA's threads (`tests/cuda_emu/
//! shim.h`: a thread per CUDA thread, warp and block barriers and shuffles, every wide load
//! checked for alignment, a hang at a diverged barrier turned into a failure) and the
//! address and undefined-behaviour sanitizers (every host buffer exactly its size), against
//! references written from ggml's block formats and candle's quantization
//! (`tests/cuda_emu/*.cpp`). What only a GPU can check (nvcc's code, the hardware, the speed)
//! is `scripts/gpu-check.sh`'s; and every model load on a GPU checks our matrix kernels
//! against candle's `mmvq` before a step uses them (`kernels::cuda_decode`).

use std::process::Command;

/// Builds `tests/cuda_emu/{program}.cpp` with the host's C++ compiler, runs it, and returns
/// what it printed, asserting that it exited 0.
fn build_and_run(program: &str) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join(program);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let built = Command::new(&cxx)
        // CUDA code reads bytes as wider types (`*(const uint4 *)bytes`), which nvcc
        // allows and C++'s aliasing rules do not: tell the host compiler so.
        .args(["-std=c++20", "-O1", "-g", "-fno-strict-aliasing", "-pthread"])
        .arg("-Wno-unknown-pragmas")
        // A read or write out of bounds here would be an illegal address on the GPU, and
        // undefined behaviour (a shift too far, an overflow) wrong numbers: both fail.
        .args(["-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
        // Where `#include <cuda_fp16.h>` finds the shim instead of CUDA's header.
        .arg(format!("-I{root}/tests/cuda_emu/include"))
        .arg("-o")
        .arg(&exe)
        .arg(format!("{root}/tests/cuda_emu/{program}.cpp"))
        .output()
        .unwrap_or_else(|e| panic!("{cxx} (scripts/install-deps.sh test brings g++): {e}"));
    assert!(built.status.success(), "{cxx}: {}", String::from_utf8_lossy(&built.stderr));
    let run = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    println!("{stdout}");
    assert!(run.status.success(), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
    stdout
}

/// Every matrix kernel the decode step may pick (Q4_K; Q6_K with 16-, 8-, 4- and 2-byte
/// loads; Q8_0; staged through registers, or copied by `cp.async` with 2 or 3 stages where
/// its loads allow; 1 to 8 activation rows): 13 matrix shapes, each on every kernel family
/// that takes it (32 pairs) x 8 = 256 runs, each within 1e-5 of the largest output and
/// writing exactly its cells, none reading its activations or writing before its
/// `pdl_wait` (programmatic dependent launch); and `quantize_warp` writing both layouts exactly as candle
/// quantizes.
#[test]
fn cuda_matvec_kernels_agree_with_the_block_formats_under_cpu_emulation() {
    let stdout = build_and_run("matvec");
    assert!(stdout.contains("quantize_warp: all 256 blocks as candle quantizes them"), "{stdout}");
    assert!(stdout.contains("256 of 256 kernel runs agree with the reference"), "{stdout}");
}

/// The one-pass RMSNorm on the row widths of our models (and the widest it takes), with
/// and without the residual and `x_out`, aliased or not: 6 widths x 3 = 18 cases.
#[test]
fn cuda_one_pass_rms_norm_agrees_with_the_reference_under_cpu_emulation() {
    let stdout = build_and_run("norm");
    assert!(stdout.contains("18 of 18 RMSNorm cases agree with the reference"), "{stdout}");
}

/// The decode step's glue kernels: split attention from the q/k/v projections (q/k norm +
/// RoPE, NeoX and interleaved pairs, with and without norms; the key and value stored at the
/// row's position and nothing else in the caches touched) to its quantized output (head
/// widths 64/128/256, 1 to 8 query heads per KV head, 1 to 32 splits from under one chunk to
/// several, joined by whichever block ends last, the blocks run in a shuffled order), the
/// two-pass RMSNorm and SwiGLU quantized: 17 cases.
#[test]
fn cuda_glue_kernels_agree_with_the_reference_under_cpu_emulation() {
    let stdout = build_and_run("glue");
    assert!(stdout.contains("17 of 17 glue kernel cases agree with the reference"), "{stdout}");
}
