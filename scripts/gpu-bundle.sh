#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine without Rust or network into .gpu/
# (git-ignored): the release binary built with `--features cuda`, the Qwen3 tokenizer and
# the first part of SmolLM2; the rest of SmolLM2 goes to .gpu-b/. Each folder stays under
# MAX_CARRY bytes together with the repository's tracked files, for tools that carry at
# most 64 MiB per call (send .gpu first, then .gpu-b in a second call; gpu-check.sh stashes
# the first part and joins them).
#   cargo build --release --locked --features cuda && scripts/gpu-bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
max=${MAX_CARRY:-66000000}
bin=target/release/my-claw
[ -x "$bin" ] || { echo "build first: cargo build --release --locked --features cuda" >&2; exit 1; }
if ! grep -q libcublas < <(readelf -d "$bin" 2>/dev/null || true); then
  echo "$bin was built without CUDA: cargo build --release --locked --features cuda" >&2
  exit 1
fi
rm -rf .gpu .gpu-b
mkdir -p .gpu .gpu-b
gzip -6 -c "$bin" > .gpu/my-claw.gz
gzip -9 -c tests/assets/qwen3/tokenizer.json > .gpu/tokenizer.json.gz
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
bundle=$(du -cb .gpu | tail -1 | cut -f1)
smollm2=$(ls models/SmolLM2-*.gguf | head -1)
gzip -1 -c "$smollm2" > .gpu-b/whole.gz
whole=$(stat -c %s .gpu-b/whole.gz)
first=$(( max - tracked - bundle ))
[ "$first" -gt 0 ] || { echo "the binary alone is over the carry limit" >&2; exit 1; }
[ "$first" -lt "$whole" ] || first=$whole
head -c "$first" .gpu-b/whole.gz > .gpu/smollm2.gz.part-a
tail -c +"$(( first + 1 ))" .gpu-b/whole.gz > .gpu-b/smollm2.gz.part-b
rm .gpu-b/whole.gz
rest=$(( $(stat -c %s .gpu-b/smollm2.gz.part-b) + tracked ))
[ "$rest" -le "$max" ] || { echo "the second part of SmolLM2 is over the carry limit ($rest bytes)" >&2; exit 1; }
du -b .gpu/* .gpu-b/*
