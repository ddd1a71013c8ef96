#!/usr/bin/env bash
# One command from a fresh machine to a running my-claw: installs what is missing, makes
# sure a model is present (the small real demo model when no Qwen3 file is there), builds
# an optimised binary for this CPU and starts the server on 127.0.0.1:3000.
# Extra arguments are passed to `my-claw serve` (e.g. --bind 127.0.0.1:8080).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh build
./scripts/fetch-assets.sh models

# target-cpu=native comes from .cargo/config.toml: the binary is built where it runs.
cargo build --release --locked
exec ./target/release/my-claw serve "$@"
