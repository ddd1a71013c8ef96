#!/usr/bin/env bash
# One command from a fresh machine to a running my-claw: installs what is missing, makes
# sure a model is present (the small real demo model when no Qwen3 file is there), builds
# an optimised binary for this CPU and starts the server on 127.0.0.1:3000.
# Extra arguments are passed to `my-claw serve` (e.g. --bind 127.0.0.1:8080).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh build
./scripts/fetch-assets.sh models

# With an NVIDIA GPU (the driver installed, so `nvidia-smi` sees it) the binary is built
# with CUDA: the compiler and libraries come from PyPI's NVIDIA wheels into a cache
# directory (scripts/cuda-toolchain.sh), and DEVICE=auto puts the models on the GPU.
features=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "nvidia-smi sees a GPU: building with CUDA (--features cuda)"
  eval "$(./scripts/cuda-toolchain.sh full)"
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$cap}
  features=(--features cuda)
else
  echo "no GPU seen by nvidia-smi: building for the CPU"
fi

# target-cpu=native comes from .cargo/config.toml: the binary is built where it runs.
cargo build --release --locked "${features[@]}"
exec ./target/release/my-claw serve "$@"
