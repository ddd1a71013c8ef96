//! Our CUDA matrix-vector kernels (`src/llm/engine/kernels/cuda_matvec.cuh`) on a machine
//! without a GPU: their source, compiled by the host's C++ compiler under a CPU emulation
//! of CUDA's threads (`tests/cuda_emu/shim.h`: a thread per CUDA thread, warp barriers and
//! shuffles, aligned wide loads), against a reference written from ggml's block formats
//! (`tests/cuda_emu/matvec.cpp`). What only a GPU can check (nvcc's code, the hardware, the
//! speed) is `scripts/gpu-check.sh`'s; and every model load on a GPU checks the kernels
//! against candle's `mmvq` before a step uses them (`kernels::cuda_decode`).

use std::process::Command;

/// Every kernel the decode step may pick (Q4_K; Q6_K with 16-, 8-, 4- and 2-byte loads;
/// 1 to 8 activation rows): 10 matrix shapes x 8 = 80 runs, each within 1e-5 of the
/// largest output and writing exactly its cells.
#[test]
fn cuda_matvec_kernels_agree_with_the_block_formats_under_cpu_emulation() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("matvec");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas", "-o"])
        .arg(&exe)
        .arg(format!("{root}/tests/cuda_emu/matvec.cpp"))
        .output()
        .unwrap_or_else(|e| panic!("{cxx} (scripts/install-deps.sh test brings g++): {e}"));
    assert!(built.status.success(), "{cxx}: {}", String::from_utf8_lossy(&built.stderr));
    let run = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(run.status.success(), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("80 of 80 kernel runs agree with the reference"), "{stdout}");
}
