//! With the `cuda` feature: compiles the fused decode kernels
//! (`src/llm/engine/kernels/cuda_decode.cu` and the `.cuh` files it includes) to PTX with
//! nvcc, for `cuda_decode.rs` to embed. The GPU's driver compiles the PTX for the card when
//! it first loads it (and caches the result). `CUDA_COMPUTE_CAP` (as for candle's kernels) picks the virtual architecture;
//! without it, 7.5, the oldest CUDA 13 targets. Without the feature this does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let source = "src/llm/engine/kernels/cuda_decode.cu";
    println!("cargo::rerun-if-changed={source}");
    // What it includes.
    println!("cargo::rerun-if-changed=src/llm/engine/kernels/cuda_common.cuh");
    println!("cargo::rerun-if-changed=src/llm/engine/kernels/cuda_matvec.cuh");
    println!("cargo::rerun-if-changed=src/llm/engine/kernels/cuda_norm.cuh");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".to_string());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out.join("cuda_decode.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("--gpu-architecture=compute_{cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg(source)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (scripts/cuda-toolchain.sh brings it): {e}"));
    assert!(status.success(), "{nvcc} failed on {source}");
}
